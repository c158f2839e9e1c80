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


def _serve(
    kind: type[ServerConnection], mode: str, flags: int, minimum: int, data: bytes, *, lone: bool = False
) -> tuple[Any, bytes]:
    s = kind()
    joined(s)
    exp = export(flags=flags, minimum_block_size=minimum, preferred_block_size=max(minimum, 4096))
    contexts = () if mode == "simple" else (n.BASE_ALLOCATION,)
    handshake(s, structured=mode != "simple", extended=mode == "extended", exp=exp, contexts=contexts)
    seen: list[Any] = []
    first = s.receive_lone_read(data) if lone else s.receive_data(data)  # the one-request road, or the usual one
    events = iter([first] if first is not None else [])
    while True:
        try:
            event = next(events, None) or s.next_event()
        except n.RemoteProtocolError as exc:
            seen.append(str(exc))
            break
        if event is n.NEED_DATA or event is n.PAUSED or isinstance(event, n.ConnectionClosed):
            break
        seen.append((type(event).__name__, getattr(event, "cookie", None), getattr(event, "offset", None),
                     bytes(getattr(event, "data", b"")), getattr(event, "flags", None)))  # fmt: skip
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
