"""RawSocketStream.send_now: one sendmsg of a reply's pieces without waiting, and what is left of them for
``send_pieces``. The anyio server's one-request road sends every reply with it, so what it leaves must be
exactly the bytes that did not go: the peer must see the pieces whole, in order, whatever the socket took."""

from __future__ import annotations

import os
import socket
import tempfile
import threading

import anyio
import pytest

from nbdproto import FileRegion
from nbdproto_anyio._socket import RawSocketStream


def _receive_all(sock: socket.socket, size: int, into: list[bytes]) -> None:
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    into.append(bytes(got))


def test_pieces_the_socket_takes_at_once_leave_nothing() -> None:
    left, right = socket.socketpair()
    with left, right:
        stream = RawSocketStream(right)
        assert stream.send_now([b"header", memoryview(b"data" * 100)]) is None
        left.settimeout(10)
        assert _exactly(left, 406) == b"header" + b"data" * 100


def test_what_a_full_socket_leaves_is_exactly_the_bytes_that_did_not_go() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        left.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stream = RawSocketStream(right)
        header, data = os.urandom(16), os.urandom(4 << 20)
        rest = stream.send_now([header, memoryview(data)])
        assert rest is not None and 0 < sum(map(len, rest)) < len(header) + len(data)  # some went, not all
        got: list[bytes] = []
        left.settimeout(10)
        reader = threading.Thread(target=_receive_all, args=(left, len(header) + len(data), got))
        reader.start()

        async def send_rest() -> None:
            with anyio.fail_after(10):
                await stream.send_pieces(rest)

        anyio.run(send_rest)
        reader.join(10)
        assert got == [header + data]


def test_a_file_region_among_the_pieces_sends_nothing_and_leaves_them_all() -> None:
    left, right = socket.socketpair()
    with left, right, tempfile.TemporaryFile() as file:
        file.write(b"from the file")
        file.flush()
        stream = RawSocketStream(right)
        pieces = [b"header", FileRegion(file.fileno(), 0, 13)]
        assert stream.send_now(pieces) is pieces
        left.setblocking(False)
        with pytest.raises(BlockingIOError):
            left.recv(1)  # nothing went


def test_a_peer_that_is_gone_is_a_broken_resource() -> None:
    left, right = socket.socketpair()
    with right:
        left.close()
        stream = RawSocketStream(right)
        with pytest.raises(anyio.BrokenResourceError):
            stream.send_now([b"header", b"data"])


def _exactly(sock: socket.socket, size: int) -> bytes:
    got: list[bytes] = []
    _receive_all(sock, size, got)
    return got[0]
