"""The request and idle limits, on every backend and on both of the threads server's ways of timing a wait (a
receive timer armed once on a plaintext socket, a Python timeout on a TLS one, a wait for readability on a TLS
one whose replies a pool of threads sends): a client that stalls part-way
through a request is cut off after the request limit, an idle one after the idle limit and not before, and
a client that keeps sending is never cut off, however long it takes in all."""

from __future__ import annotations

import contextlib
import logging
import select
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
from tests.waiting import wait_until

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


def _ended(caplog: pytest.LogCaptureFixture) -> str:
    """How the server says the connection ended (its log line, which it may write a moment after the close)."""
    ended = ("timed out", "disconnected", "connection ended", "broke the protocol")

    def line() -> str | None:
        return next((r.getMessage() for r in caplog.records if any(e in r.getMessage() for e in ended)), None)

    return wait_until(line, "the server's line on the end of the connection")


# Which limit ended a connection is read from the server's log, not from when: on a loaded machine a close at
# the request limit can come later than the idle limit. The time gives the lower bound only.


def test_a_request_stalled_part_way_is_cut_off_after_the_request_limit(
    transmitting: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "nbdproto"), transmitting() as sock:
        sock.sendall(request(nbdproto.Command.WRITE, 1, 0, 65536) + bytes(1000))  # most of the payload never comes
        waited = _closed_after(sock)
        assert f"timed out: the rest of a request did not arrive within {REQUEST_LIMIT} s" in _ended(caplog)
    assert waited >= REQUEST_LIMIT * 0.9


def test_a_half_header_is_cut_off_after_the_request_limit(transmitting: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "nbdproto"), transmitting() as sock:
        sock.sendall(request(nbdproto.Command.READ, 1, 0, 512)[:10])
        waited = _closed_after(sock)
        assert f"timed out: the rest of a request did not arrive within {REQUEST_LIMIT} s" in _ended(caplog)
    assert waited >= REQUEST_LIMIT * 0.9


def test_an_idle_client_is_cut_off_after_the_idle_limit_not_the_request_limit(
    transmitting: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "nbdproto"), transmitting() as sock:
        sock.sendall(request(nbdproto.Command.READ, 1, 0, 512))
        assert len(_read(sock, 16 + 512)) == 16 + 512
        waited = _closed_after(sock)
        assert _ended(caplog).endswith("disconnected")  # as if it had closed: idle, not stalled mid-request
    assert waited >= IDLE_LIMIT * 0.9


def test_a_slow_but_steady_client_is_never_cut_off(transmitting: Any) -> None:
    # A write whose payload trickles in, each piece well inside the request limit, for longer than both limits.
    with transmitting() as sock:
        sock.sendall(request(nbdproto.Command.WRITE, 7, 0, 16 * 1024))
        for _ in range(16):
            time.sleep(REQUEST_LIMIT / 3)  # the client under test: slow on purpose, each pause inside the limit
            sock.sendall(b"s" * 1024)
        reply = _read(sock, 16)
        assert reply[4:8] == bytes(4) and reply[8:16] == (7).to_bytes(8, "big")
        # Requests one after another, each idle gap within the idle limit and longer than the request limit.
        for cookie in range(2):
            time.sleep(REQUEST_LIMIT * 1.5)  # the client under test: idle on purpose, longer than the request limit
            sock.sendall(request(nbdproto.Command.READ, cookie, 0, 1024))
            assert _read(sock, 16 + 1024)[16:] == b"s" * 1024


# --- The handshake limit: the whole handshake, however it is cut up ---------------------------------------

HANDSHAKE_LIMIT = 1.0
PACE = HANDSHAKE_LIMIT / 8  # one byte at a time, each far inside the limit


def _trickle(sock: socket.socket, data: bytes) -> tuple[int, float]:
    """Send ``data`` a byte every PACE seconds until the server closes the connection (or all of it went):
    the bytes sent, and the seconds from the first to the server's close. Each pause between bytes is a wait
    for the server to close, which ends it at once."""
    started = time.monotonic()
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent : sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent, time.monotonic() - started
        readable, _, _ = select.select([sock], [], [], PACE)  # the client's pace is the case under test
        if readable:
            try:
                if sock.recv(65536) == b"":
                    return sent + 1, time.monotonic() - started
            except ConnectionResetError:
                return sent + 1, time.monotonic() - started
    raise AssertionError(f"the server took all {len(data)} bytes in {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_handshake_trickled_a_byte_at_a_time_is_cut_off_at_the_handshake_limit(backend: str) -> None:
    """Each byte well inside the limit, all of them far beyond it (a server that restarts its clock at every
    step of the handshake never stops this client): the connection ends at the limit, before the choice of
    export is complete."""
    name = "x" * 80
    limits = nbdproto.ServerLimits(handshake_timeout=HANDSHAKE_LIMIT)
    with serve_exports(backend, {name: Export(MemoryDevice(1 << 20))}, limits=limits) as uri:
        port = int(uri.split(":")[2].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            _read(sock, 18)
            handshake = client_flags() + option(nbdproto.Option.GO, info_payload(name))
            sent, waited = _trickle(sock, handshake)
    assert sent < len(handshake) and waited >= HANDSHAKE_LIMIT * 0.9, (sent, waited)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tls_handshake_trickled_a_byte_at_a_time_is_cut_off_at_the_handshake_limit(backend: str) -> None:
    """The same for the TLS handshake, which the limit includes: a ClientHello sent a byte at a time."""
    limits = nbdproto.ServerLimits(handshake_timeout=HANDSHAKE_LIMIT)
    with make_pki() as pki, serve_exports(backend, {"": Export(MemoryDevice(1 << 20))}, tls=pki.server_context,
                                          limits=limits) as uri:  # fmt: skip
        port = int(uri.split(":")[2].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            _read(sock, 18)
            sock.sendall(client_flags() + option(nbdproto.Option.STARTTLS))
            _read(sock, 20)
            hello = pki.client_context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x")
            with contextlib.suppress(ssl.SSLWantReadError):
                hello.do_handshake()
            client_hello = outgoing.read()
            sent, waited = _trickle(sock, client_hello)
    assert sent < len(client_hello) and waited >= HANDSHAKE_LIMIT * 0.9, (sent, waited)
