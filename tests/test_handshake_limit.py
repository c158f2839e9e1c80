"""ServerLimits.max_handshakes (``--max-handshakes``): connections still in their handshake are bounded, so that
clients that stall there cannot grow the server's memory (bench/bench_stalled_handshakes.py measures it); a
connection beyond the bound is closed before the greeting, and clients whose handshake is over do not count."""

from __future__ import annotations

import socket
import time

import pytest

import nbdproto
import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from tests.serving import Export, serve_exports

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20
GREETING = 18


def _port(base: str) -> int:
    return int(base.split(":")[2].split("/")[0])


def _greeted(port: int) -> socket.socket | None:
    """A connection that got its greeting and then says nothing (a stalled handshake), or None when the server
    closed it first."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = b""
    while len(data) < GREETING:
        chunk = sock.recv(GREETING - len(data))
        if not chunk:
            sock.close()
            return None
        data += chunk
    return sock


def _greeted_within(port: int, timeout: float = 10.0) -> socket.socket:
    """A greeted connection, once a slot is free again (the server notices a closed one as soon as it reads)."""
    deadline = time.monotonic() + timeout
    while (sock := _greeted(port)) is None:
        assert time.monotonic() < deadline, "no handshake slot came free"
        time.sleep(0.01)
    return sock


def _connect_within(uri: str, timeout: float = 10.0) -> nt.Client:
    """A client connected once a slot is free (the server frees one as it reads the end of a closed one)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return nt.connect(uri, timeout=10)
        except (nbdproto.ProtocolError, ConnectionError):
            assert time.monotonic() < deadline, "no handshake slot came free"
            time.sleep(0.01)


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_connections_beyond_the_handshake_limit_are_closed_before_the_greeting(backend: str) -> None:
    limits = nbdproto.ServerLimits(max_handshakes=2)
    with serve_exports(backend, {"": Export(MemoryDevice(MIB))}, limits=limits) as base:
        port = _port(base)
        first, second = _greeted(port), _greeted(port)
        assert first is not None and second is not None
        assert _greeted(port) is None  # a third stalled handshake: refused
        first.close()
        third = _greeted_within(port)  # the slot the first one left
        second.close()
        # A client whose handshake is over does not count: with it connected, two stalled handshakes fit again.
        with _connect_within(base.format("")) as client:
            fourth = _greeted_within(port)
            assert _greeted(port) is None
            assert client.pread(4, 0) == bytes(4)
        for sock in (third, fourth):
            sock.close()


def test_the_limit_is_sixty_four_by_default_and_zero_lifts_it() -> None:
    assert nbdproto.ServerLimits().max_handshakes == 64
    assert nbdproto.ServerLimits(max_handshakes=0).max_handshakes == 0
    with pytest.raises(ValueError):
        nbdproto.ServerLimits(max_handshakes=-1)
