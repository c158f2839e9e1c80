"""The request and idle limits, on every backend and on both of the threads server's ways of timing a wait (a
receive timer armed once on a plaintext socket, a Python timeout on a TLS one, a wait for readability on a TLS
one whose replies a pool of threads sends): a client that stalls part-way
through a request is cut off after the request limit, an idle one after the idle limit and not before, and
a client that keeps sending is never cut off, however long it takes in all."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto
from nbdproto.devices import MemoryDevice
from tests.nbdbytes import client_flags, info_payload, option, request
from tests.serving import BACKENDS, Export, make_pki, serve_exports

pytestmark = pytest.mark.timeout(60)

REQUEST_LIMIT = 0.4
IDLE_LIMIT = 1.5
LIMITS = nbdproto.ServerLimits(request_timeout=REQUEST_LIMIT, idle_timeout=IDLE_LIMIT)


@pytest.fixture(params=[*BACKENDS, "threads-tls", "threads-tls-pool"])
def transmitting(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A function that connects a raw socket to a fresh server with LIMITS and takes it to transmission."""
    backend, *how = request.param.split("-")
    with make_pki() as pki:
        tls = pki.server_context if "tls" in how else None
        exports = {"": Export(MemoryDevice(1 << 20))}
        workers = 2 if "pool" in how else 0
        with serve_exports(backend, exports, tls=tls, limits=LIMITS, workers=workers) as uri:
            port = int(uri.split(":")[2].split("/")[0])

            def connect() -> socket.socket | ssl.SSLSocket:
                sock = socket.create_connection(("127.0.0.1", port), timeout=20)
                return _negotiate(sock, pki.client_context if tls else None)

            yield connect


def _negotiate(sock: socket.socket, tls: ssl.SSLContext | None) -> socket.socket | ssl.SSLSocket:
    _read(sock, 18)
    sock.sendall(client_flags())
    conn: socket.socket | ssl.SSLSocket = sock
    if tls is not None:
        sock.sendall(option(nbdproto.Option.STARTTLS))
        _read(sock, 20)
        conn = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    conn.sendall(option(nbdproto.Option.GO, info_payload("")))
    seen = b""
    ack = (0x3E889045565A9).to_bytes(8, "big") + int(nbdproto.Option.GO).to_bytes(4, "big") + (1).to_bytes(4, "big")
    while ack not in seen:
        chunk = conn.recv(4096)
        assert chunk, "the server closed during the handshake"
        seen += chunk
    return conn


def _read(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def _closed_after(sock: socket.socket | ssl.SSLSocket) -> float:
    """Seconds until the server closes the connection (reading and dropping anything it sends first)."""
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic() - started


def test_a_request_stalled_part_way_is_cut_off_after_the_request_limit(transmitting: Any) -> None:
    with transmitting() as sock:
        sock.sendall(request(nbdproto.Command.WRITE, 1, 0, 65536) + bytes(1000))  # most of the payload never comes
        waited = _closed_after(sock)
    assert REQUEST_LIMIT * 0.9 <= waited < IDLE_LIMIT


def test_a_half_header_is_cut_off_after_the_request_limit(transmitting: Any) -> None:
    with transmitting() as sock:
        sock.sendall(request(nbdproto.Command.READ, 1, 0, 512)[:10])
        waited = _closed_after(sock)
    assert REQUEST_LIMIT * 0.9 <= waited < IDLE_LIMIT


def test_an_idle_client_is_cut_off_after_the_idle_limit_not_the_request_limit(transmitting: Any) -> None:
    with transmitting() as sock:
        sock.sendall(request(nbdproto.Command.READ, 1, 0, 512))
        assert len(_read(sock, 16 + 512)) == 16 + 512
        waited = _closed_after(sock)
    assert IDLE_LIMIT * 0.9 <= waited < IDLE_LIMIT + 5


def test_a_slow_but_steady_client_is_never_cut_off(transmitting: Any) -> None:
    # A write whose payload trickles in, each piece well inside the request limit, for longer than both limits.
    with transmitting() as sock:
        sock.sendall(request(nbdproto.Command.WRITE, 7, 0, 16 * 1024))
        for _ in range(16):
            time.sleep(REQUEST_LIMIT / 3)
            sock.sendall(b"s" * 1024)
        reply = _read(sock, 16)
        assert reply[4:8] == bytes(4) and reply[8:16] == (7).to_bytes(8, "big")
        # Requests one after another, each idle gap within the idle limit and longer than the request limit.
        for cookie in range(2):
            time.sleep(REQUEST_LIMIT * 1.5)
            sock.sendall(request(nbdproto.Command.READ, cookie, 0, 1024))
            assert _read(sock, 16 + 1024)[16:] == b"s" * 1024
