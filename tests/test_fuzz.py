"""A seeded, bounded fuzzer of client byte streams against every server (tests/fuzzstreams.py makes them).

Each case connects, sends its stream, half-closes, and reads until the server closes. The server must stay up
and keep serving a well-behaved client, never log a bug (an ERROR: a traceback), and never leave a case
hanging: every case ends within its timeout. CI runs a few thousand cases; ``python bench/fuzz_servers.py
--cases 1000000`` runs as many as you like.
"""

from __future__ import annotations

import errno
import logging
import socket
import time

import pytest

import nbdproto as n
from nbdproto.devices import MemoryDevice
from tests.fuzzstreams import client_stream
from tests.nbdbytes import request
from tests.serving import BACKENDS, Export, serve_exports
from tests.test_bad_input import RawClient

CASES = 1000
pytestmark = pytest.mark.timeout(300)


def run_case(address: tuple[str, int], seed: int, timeout: float = 5.0) -> None:
    """Send client stream ``seed`` and read until the server closes; TimeoutError if it does not."""
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(client_stream(seed))
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + timeout
            while sock.recv(1 << 20):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"case {seed}: the server kept answering past {timeout} s")
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server dropped a client that broke the protocol: allowed
        except OSError as exc:
            # The same, when the server's reset comes in before our half-close: shutdown() finds the
            # connection gone (seen once in CI, on 3.10).
            if exc.errno != errno.ENOTCONN:
                raise


@pytest.mark.parametrize("backend", BACKENDS)
def test_mutated_client_streams(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    device = MemoryDevice(1 << 20)
    with caplog.at_level(logging.WARNING), serve_exports(backend, {"": Export(device)}) as base:
        port = int(base.split(":")[2].split("/")[0])
        address = ("127.0.0.1", port)
        first = {"threads": 0, "asyncio": CASES, "trio": 2 * CASES}.get(backend, 0)
        for seed in range(first, first + CASES):
            run_case(address, seed)
        # Still serving, and correctly.
        client = RawClient(address)
        client.go("")
        client.sock.sendall(request(n.Command.WRITE, 1, 0, 4) + b"live" + request(n.Command.READ, 2, 0, 4))
        assert client.simple_reply(1) == (0, b"")
        assert client.simple_reply(2, 4) == (0, b"live")
        client.close()
    bugs = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not bugs, [record.getMessage() for record in bugs[:5]]
