"""Strict mode: every request the server said it cannot serve is refused before a byte of it is sent.

Each case runs against our server through a recording proxy: the refused request raises LocalProtocolError
with the errno a server would answer in ``error_code``, the connection goes on, and the bytes the client sent
after the handshake are exactly the valid request that follows (nothing of the refused one).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

import nbdproto as n
import nbdproto_anyio as na
import nbdproto_threads as nt
from nbdproto.devices import Filter, MemoryDevice
from tests.recording_proxy import RecordingProxy
from tests.serving import Export, serve_exports

pytestmark = pytest.mark.timeout(60)
KIB = 1024
E = n.Errno


class Constrained(Filter):
    """A memory disk that states block sizes (512 minimum, 64 KiB payloads) and no TRIM, FUA, FAST_ZERO, CACHE."""

    def _capabilities_over(self, inner: n.DeviceCapabilities) -> n.DeviceCapabilities:
        return dataclasses.replace(inner, minimum_block_size=512, preferred_block_size=4096, maximum_payload=64 * KIB,
                                   can_trim=False, can_fua=False, can_fast_zero=False, can_cache=False)  # fmt: skip


@pytest.fixture
def proxied() -> Iterator[RecordingProxy]:
    exports = {"disk": Export(Constrained(MemoryDevice(1 << 20))), "ro": Export(MemoryDevice(1 << 20), read_only=True)}
    with serve_exports("threads", exports) as base:
        port = int(base.split(":")[2].split("/")[0])
        with RecordingProxy(("127.0.0.1", port)) as proxy:
            yield proxy


def sent_requests(proxy: RecordingProxy, after: int) -> list[tuple[int, int, int]]:
    """(command, offset, length) of each request header the client sent after byte ``after`` of its stream
    (extended headers: 32 bytes each; write payloads skipped)."""
    stream = b"".join(data for direction, data in proxy.chunks if direction == "c2s")[after:]
    found = []
    while stream:
        magic, _flags, command, _cookie, offset, length = struct.unpack(">IHHQQQ", stream[:32])
        assert magic == 0x21E41C71
        found.append((command, offset, length))
        stream = stream[32 + (length if command == n.Command.WRITE else 0) :]
    return found


def client_bytes(proxy: RecordingProxy) -> int:
    return sum(len(data) for direction, data in proxy.chunks if direction == "c2s")


# (what the request is, how to make it, the errno, words of the message, strict only)
CASES: list[tuple[str, Callable[[Any], Any], int, str, bool]] = [
    ("unaligned read", lambda c: c.pread(100, 0), E.EINVAL, "not aligned to 512", False),
    ("unaligned offset", lambda c: c.pwrite(bytes(512), 100), E.EINVAL, "not aligned to 512", False),
    ("unaligned zero", lambda c: c.zero(1000, 512), E.EINVAL, "not aligned to 512", False),
    (
        "write over the maximum payload",
        lambda c: c.pwrite(bytes(128 * KIB), 0),
        E.EINVAL,
        "exceeds the maximum payload 65536",
        True,
    ),
    (
        "read over the maximum payload",
        lambda c: c.pread(128 * KIB, 0),
        E.EOVERFLOW,
        "exceeds the maximum payload",
        False,
    ),
    ("trim not advertised", lambda c: c.trim(512, 0), E.EINVAL, "TRIM was not advertised", False),
    ("cache not advertised", lambda c: c.cache(512, 0), E.EINVAL, "CACHE was not advertised", False),
    ("FUA not advertised", lambda c: c.pwrite(bytes(512), 0, fua=True), E.EINVAL, "flags 0x1 are not valid", False),
    ("FAST_ZERO not advertised", lambda c: c.zero(512, 0, fast=True), E.EINVAL, "FAST_ZERO", False),
    ("past the end", lambda c: c.pread(512, 1 << 20), E.EINVAL, "past the export size", False),
    ("write past the end", lambda c: c.pwrite(bytes(512), (1 << 20) - 256), E.ENOSPC, "past the export size", False),
    ("empty range", lambda c: c.zero(0, 0), E.EINVAL, "of length 0", False),
    (
        "unknown context",
        lambda c: c.block_status(512, 0, context="qemu:dirty-bitmap:x"),
        0,
        "was not negotiated",
        False,
    ),
]


@pytest.mark.parametrize(("what", "make", "errno", "words", "strict_only"), CASES, ids=[c[0] for c in CASES])
def test_each_refused_request_raises_and_sends_nothing(
    proxied: RecordingProxy, what: str, make: Callable[[Any], Any], errno: int, words: str, strict_only: bool
) -> None:
    with nt.connect(f"nbd://127.0.0.1:{proxied.port}/disk", strict=True) as client:
        assert client.strict
        before = client_bytes(proxied)
        with pytest.raises(n.LocalProtocolError, match=words) as refused:
            make(client)
        assert refused.value.error_code == errno, what
        client.pread(512, 512)  # the connection goes on, and this is the first thing sent since
        assert sent_requests(proxied, before) == [(n.Command.READ, 512, 512)]
        if strict_only:
            client.strict = False
            with pytest.raises((n.NBDError, ConnectionError)):
                make(client)  # sent: our server answers it with an error, or drops a connection that broke a MUST
            assert len(sent_requests(proxied, before)) == 2


def test_writes_on_a_read_only_export_are_refused_with_eperm(proxied: RecordingProxy) -> None:
    with nt.connect(f"nbd://127.0.0.1:{proxied.port}/ro", strict=True) as client:
        before = client_bytes(proxied)
        for write in (lambda: client.pwrite(b"x", 0), lambda: client.zero(512, 0), lambda: client.trim(512, 0)):
            with pytest.raises(n.LocalProtocolError) as refused:
                write()
            assert refused.value.error_code == E.EPERM
        assert client_bytes(proxied) == before


def test_strict_is_a_connect_option_of_the_async_client_too(proxied: RecordingProxy) -> None:
    async def main() -> None:
        async with await na.connect(f"nbd://127.0.0.1:{proxied.port}/disk", strict=True) as c:
            before = client_bytes(proxied)
            with pytest.raises(n.LocalProtocolError, match="maximum payload") as refused:
                await c.pwrite(bytes(65536 + 512), 0)
            assert refused.value.error_code == E.EINVAL
            assert await c.pread(512, 0) == bytes(512)
            assert sent_requests(proxied, before) == [(n.Command.READ, 0, 512)]

    anyio.run(main)


def test_without_strict_an_unasked_minimum_does_not_bind() -> None:
    # The engine alone, against a server that states a 512-byte minimum although the client did not ask for
    # block sizes (spec: it may; qemu-nbd always does): the client may send unaligned requests (the server must
    # fail them cleanly); strict mode refuses them.
    client = n.ClientConnection()
    client.receive_data(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    assert isinstance(client.next_event(), n.ServerGreeting)
    client.send(n.OptionGo("disk", ()))
    client.data_to_send()
    reply = struct.Struct(">QIII")
    export = struct.pack(">HQH", n.InfoType.EXPORT, 1 << 20, n.TransmissionFlags.HAS_FLAGS)
    sizes = struct.pack(">HIII", n.InfoType.BLOCK_SIZE, 512, 4096, 65536)
    for kind, payload in (
        (n.OptionReplyType.INFO, export),
        (n.OptionReplyType.INFO, sizes),
        (n.OptionReplyType.ACK, b""),
    ):
        client.receive_data(reply.pack(0x3E889045565A9, n.Option.GO, kind, len(payload)) + payload)
    done = client.next_event()
    assert isinstance(done, n.HandshakeComplete) and done.export.minimum_block_size == 512
    client.send(n.ReadRequest(1, 0, 100))
    assert client.data_to_send()
    client.strict = True
    with pytest.raises(n.LocalProtocolError, match="not aligned to 512 bytes") as refused:
        client.send(n.ReadRequest(2, 0, 100))
    assert refused.value.error_code == E.EINVAL and client.data_to_send() == []
    with pytest.raises(n.LocalProtocolError, match="write of 66048 bytes exceeds the maximum payload 65536"):
        client.send(n.WriteRequest(3, 0, bytes(65536 + 512)))
    assert client.data_to_send() == []
    client.send(n.ReadRequest(4, 0, 512))
    assert len(b"".join(client.data_to_send())) == 28
