"""The per-command table (nbdproto.engine._commands): one statement of each command's rules, read by the server's full
check, its fast paths for READ and WRITE, and the client's check. These tests prove the three agree."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto as n
from nbdproto.engine._commands import COMMANDS, RULE_OF
from nbdproto.engine._server import ServerConnection
from tests.nbdbytes import request
from tests.test_server import export, handshake, joined

TF = n.TransmissionFlags
F = n.CommandFlags
MIB = 1 << 20

EXPORT_FLAGS = st.sampled_from(
    [
        TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO,
        TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH,
        TF.HAS_FLAGS,
        TF.HAS_FLAGS | TF.SEND_FUA | TF.SEND_CACHE,
    ]
)
OFFSETS = [0, 512, 4096, MIB - 4096, MIB - 1, MIB, 2 * MIB]  # the export is 1 MiB
LENGTHS = [0, 1, 512, 4096, 65536, MIB, 32 * MIB + 1]
HEADERS = st.tuples(
    st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 9]),  # commands, DISC aside (it ends the stream), 9 unknown
    st.one_of(st.just(0), st.integers(0, 63)),  # every flag combination, PAYLOAD_LEN included; none often
    st.sampled_from(OFFSETS),
    st.sampled_from(LENGTHS),
)


class _FullCheckOnly(ServerConnection):
    _fast_paths = False


LEAD = 4096
"""The length of the write received in place before the request under test, on the in-place roads."""


def _serve(
    kind: type[ServerConnection],
    mode: str,
    flags: int,
    minimum: int,
    data: bytes,
    *,
    lone: bool = False,
    after_in_place: str = "",
    own_buffer: bool = False,
    stream_writes_over: int | None = None,
) -> tuple[Any, bytes]:
    """The events and reply bytes of ``data``, taken by the usual road or the one-request road (``lone``); or,
    with ``after_in_place``, right behind a write whose payload arrives in place (ServerConnection.write_view):
    that payload and the header of ``data`` in one receive, taken by ServerConnection.received_in_place
    ("one call") or by ``received_into`` and ``receive_data`` ("two calls"), the rest of ``data`` after; with
    ``own_buffer``, no write is received in place: the payload arrives into a buffer of its own (or, over
    ``stream_writes_over`` bytes, is handed over in parts)."""
    s = kind(stream_writes_over=stream_writes_over)
    joined(s)
    exp = export(flags=flags, minimum_block_size=minimum, preferred_block_size=max(minimum, 4096))
    contexts = () if mode == "simple" else (n.BASE_ALLOCATION,)
    extended = mode == "extended"
    handshake(s, structured=mode != "simple", extended=extended, exp=exp, contexts=contexts)
    seen: list[Any] = []

    def take(first: Any = None) -> bool:
        """Record the events until the engine wants bytes or waits; False once it is over (or broken)."""
        events = iter([first] if first is not None else [])
        while True:
            try:
                event = next(events, None) or s.next_event()
            except n.RemoteProtocolError as exc:
                seen.append(str(exc))
                return False
            if event is n.NEED_DATA or event is n.PAUSED:
                return True
            if isinstance(event, n.ConnectionClosed):
                return False
            seen.append((type(event).__name__, getattr(event, "cookie", None), getattr(event, "offset", None),
                         bytes(getattr(event, "data", b"")), getattr(event, "flags", None)))  # fmt: skip

    if after_in_place:
        if not own_buffer:
            s.write_view = lambda offset, length: memoryview(bytearray(length))  # (a device's storage)
        lead = F.PAYLOAD_LEN if extended else 0
        s.receive_data(request(n.Command.WRITE, 1, 0, LEAD, lead, extended=extended))
        assert s.next_event() is n.NEED_DATA
        target, size = s.write_buffer(), len(request(0, 0, extended=extended))
        payload = bytes(range(256)) * (LEAD // 256)
        first: Any = None
        if target is None:  # refused (a read-only export): its payload is skipped as it arrives
            s.receive_data(payload + data[:size])
        elif after_in_place == "one call":
            target[:] = payload
            first = s.received_in_place(LEAD + size, memoryview(bytearray(data[:size])))
            assert type(first) is n.WriteRequest and first.cookie == 1  # the write is handed over at once
        else:
            target[:] = payload
            s.received_into(LEAD)
            s.receive_data(data[:size])
        # The header is taken before the rest arrives, as a server's next batch takes it (a write's payload
        # then arrives into its buffer, or in parts), and then the rest.
        if take(first) and len(data) > size:
            s.receive_data(data[size:])
            take()
    else:
        take(s.receive_lone_read(data) if lone else s.receive_data(data))  # the one-request road, or the usual one
    return seen, b"".join(bytes(piece) for piece in s.data_to_send())


@settings(max_examples=400, deadline=None)
@given(
    mode=st.sampled_from(["simple", "structured", "extended"]),
    flags=EXPORT_FLAGS,
    minimum=st.sampled_from([1, 512, 4096]),
    header=HEADERS,
)
def test_the_fast_paths_answer_as_the_full_check_does(mode: str, flags: int, minimum: int, header: Any) -> None:
    command, request_flags, offset, length = header
    extended = mode == "extended"
    payload = b""
    if command == n.Command.WRITE and length <= MIB:
        payload = bytes(length)
        if extended:
            request_flags |= F.PAYLOAD_LEN
    data = request(command, 7, offset, length, request_flags, extended=extended) + payload
    fast = _serve(ServerConnection, mode, flags, minimum, data)
    full = _serve(_FullCheckOnly, mode, flags, minimum, data)
    lone = _serve(ServerConnection, mode, flags, minimum, data, lone=True)
    assert fast == full == lone
    # Right behind a write received in place: the road that takes its payload and this header in one call.
    # Cookie 1 is the write's before it, in flight still; a magic with its lowest bit flipped is no request's.
    # Writes over LEAD bytes streamed in parts, the one before them not.
    for own_buffer, cookie, bad_magic, streams in (
        (False, 7, False, None), (True, 7, False, None), (True, 7, False, LEAD), (False, 1, False, None),
        (False, 7, True, None),
    ):  # fmt: skip
        header = bytearray(request(command, cookie, offset, length, request_flags, extended=extended))
        header[3] ^= bad_magic
        data = bytes(header) + payload
        roads = [_serve(kind, mode, flags, minimum, data, after_in_place=road, own_buffer=own_buffer,
                        stream_writes_over=streams)
                 for kind, road in ((ServerConnection, "one call"), (ServerConnection, "two calls"),
                                    (_FullCheckOnly, "two calls"))]  # fmt: skip
        assert roads[0] == roads[1] == roads[2]


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
@pytest.mark.parametrize("minimum", [1, 512, 4096])
def test_every_read_without_flags_is_checked_alike_on_every_road(mode: str, minimum: int) -> None:
    """The READs the short roads take (no flags), at every offset and length above: the commonest request,
    checked on three roads (the fast path, the one-request road, the full check)."""
    flags = TF.HAS_FLAGS | TF.SEND_FLUSH
    for offset in OFFSETS:
        for length in LENGTHS:
            data = request(n.Command.READ, 7, offset, length, extended=mode == "extended")
            full = _serve(_FullCheckOnly, mode, flags, minimum, data)
            assert _serve(ServerConnection, mode, flags, minimum, data) == full, (offset, length)
            assert _serve(ServerConnection, mode, flags, minimum, data, lone=True) == full, (offset, length)


def test_the_table_covers_every_command_and_request_type() -> None:
    assert set(COMMANDS) == set(n.Command)
    assert set(RULE_OF) == {
        n.ReadRequest, n.WriteRequest, n.DisconnectRequest, n.FlushRequest, n.TrimRequest, n.CacheRequest,
        n.WriteZeroesRequest, n.BlockStatusRequest, n.ResizeRequest,
    }  # fmt: skip
