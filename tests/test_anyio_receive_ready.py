"""The anyio server's streams take what has arrived without waiting (``receive_ready``, ``receive_ready_into``):
None while nothing has, the bytes once some have, the end of the stream once the peer closed. The server arms
its time limit only for a receive that has to wait, so these must never wait themselves."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import pytest

from nbdproto_anyio._socket import RawSocketStream, receive_ready
from nbdproto_anyio._tls import TlsSocketStream
from tests.serving import Pki, make_pki, tls_socket_pair


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with make_pki() as made:
        yield made


def _check(stream: RawSocketStream | TlsSocketStream, peer: socket.socket) -> None:
    async def main() -> None:
        with anyio.fail_after(10):
            assert await receive_ready(stream) is None
            assert await stream.receive_ready_into(memoryview(bytearray(8))) is None
            peer.sendall(b"hello")
            got = None
            while got is None:  # the bytes cross the socket pair (and TLS) in their own time
                await anyio.wait_readable(stream.sock)
                got = await receive_ready(stream)
            assert got == b"hello"
            peer.sendall(b"0123456789")
            buffer = bytearray(4)
            count = None
            while count is None:
                await anyio.wait_readable(stream.sock)
                count = await stream.receive_ready_into(memoryview(buffer))
            assert count == 4 and buffer == b"0123"
            assert await receive_ready(stream, 100) == b"456789"
            assert await receive_ready(stream) is None
            peer.close()
            end = None
            while end is None:
                await anyio.wait_readable(stream.sock)
                end = await receive_ready(stream)
            assert end == b""

    anyio.run(main)


def test_a_raw_stream_takes_what_has_arrived_and_never_waits() -> None:
    left, right = socket.socketpair()
    with left, right:
        _check(RawSocketStream(right), left)


def test_a_tls_stream_takes_what_has_arrived_and_never_waits(pki: Pki) -> None:
    client, server = tls_socket_pair(pki)
    server.setblocking(False)
    try:
        _check(TlsSocketStream(server), client)
    finally:
        server.close()
