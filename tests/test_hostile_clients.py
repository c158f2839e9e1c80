"""Clients that try to exhaust a server: memory, descriptors, time, the log, and its shutdown.

Each test runs ``nbdproto serve`` in a process of its own (so its memory, threads and descriptors can be read
from /proc) on each backend, attacks it, and checks that it holds within its limits while a well-behaved
client on another connection goes on being served.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import nbdproto as n
import nbdproto.wire
from tests.nbdbytes import client_flags, option, request
from tests.test_bad_input import GoodClient, RawClient
from tests.waiting import wait_until

MIB = 1 << 20
pytestmark = pytest.mark.timeout(120)
SERVERS = {"threads": ["--backend", "threads"], "asyncio": ["--backend", "anyio", "--loop", "asyncio"],
           "trio": ["--backend", "anyio", "--loop", "trio"]}  # fmt: skip


@pytest.fixture(params=["threads", "asyncio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    address: tuple[str, int]
    log_path: str
    final_log: str | None = None

    def rss(self) -> int:
        """The server's resident memory, in bytes."""
        return _status(self.proc.pid, "VmRSS") * 1024

    def threads(self) -> int:
        return _status(self.proc.pid, "Threads")

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log(self) -> str:
        """What the server logged (all of it, once it has stopped)."""
        if self.final_log is not None:
            return self.final_log
        with open(self.log_path) as f:
            return f.read()


def _unread(sock: socket.socket) -> int:
    """The bytes waiting unread in the socket's receive queue (FIONREAD on the socket itself: a lookup in
    /proc/net/tcp by local port alone could find another connection that shares the port, as loopback clients
    of different servers may, and read its queue instead)."""
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def serve(backend: str, *args: str, nofile: int | None = None, startup: float = 15) -> Iterator[Served]:
    """``nbdproto serve ARGS`` on 127.0.0.1, any port, its log (-v) in a file; stopped (SIGTERM, then SIGKILL)
    at the end."""
    with tempfile.NamedTemporaryFile(prefix="nbdproto-log-", delete=False) as log_file:
        log_path = log_file.name

    def limit_descriptors() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    command = [sys.executable, "-m", "nbdproto", "serve", "-v", "--port", "0", *SERVERS[backend], *args]
    with open(log_path, "wb") as log_out:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_out, preexec_fn=limit_descriptors)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], startup)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("serving "):
            raise AssertionError(f"nbdproto serve did not start within {startup} s: {line!r}")
        port = int(line.split(":")[2].split("/")[0])
        served = Served(proc, ("127.0.0.1", port), log_path)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        with open(log_path) as f:
            log = f.read()
        os.unlink(log_path)
        if "served" in locals():
            served.final_log = log


def well_behaved(address: tuple[str, int]) -> GoodClient:
    """A well-behaved client beside the attack: verified 4 KiB writes and reads, counted, until stopped."""
    return GoodClient(address, export="", block=4096, blocks=256, at_least=0)


def _serves(address: tuple[str, int], rounds: int) -> None:
    """A well-behaved client completes ``rounds`` verified rounds on the server (waited for, bounded)."""
    reader = well_behaved(address)
    reader.start()
    wait_until(lambda: reader.rounds >= rounds or not reader.is_alive(), f"{rounds} rounds of a good client")
    reader.finish()


def _peak_rss_while(served: Served, reader: GoodClient, rounds: int, seconds: float) -> int:
    """The server's peak RSS, sampled for ``seconds`` (the stretch measured) and until ``reader`` has done
    ``rounds`` rounds beside the attack (however long a loaded machine takes; the wait is bounded)."""
    peak, started = 0, time.monotonic()

    def sample() -> bool:
        nonlocal peak
        peak = max(peak, served.rss())
        return time.monotonic() - started >= seconds and (reader.rounds >= rounds or not reader.is_alive())

    wait_until(sample, f"{rounds} rounds of a good client beside the attack", timeout=60, every=0.05)
    return peak


# A delay filter's requests are carried out by a pool of threads, whose replies leave as they complete: what
# they hold is bounded by the memory limit (the replies made and not yet sent); inline, far less is ever made.
@pytest.mark.parametrize("dispatch", [[], ["--filter", "delay:write=1ms"]], ids=["inline", "pool"])
def test_unread_replies_of_huge_reads_hold_little_memory(backend: str, dispatch: list[str]) -> None:
    with serve(backend, "--memory", "1G", "--memory-limit", "128M", *dispatch) as served:
        _serves(served.address, 20)
        before = served.rss()
        hoarder = RawClient(served.address)
        hoarder.go("")
        # 64 reads of 32 MiB whose replies are never read: 28 bytes of request each, 2 GiB of replies.
        hoarder.sock.sendall(b"".join(request(n.Command.READ, i, i * 16 * MIB, 32 * MIB) for i in range(64)))
        reader = well_behaved(served.address)
        reader.start()
        # The other client is served all the while (its rounds, not its pace: the machine is shared).
        peak = _peak_rss_while(served, reader, 200, 3.0)
        assert reader.finish() >= 200
        assert peak - before < 192 * MIB, f"RSS grew by {(peak - before) / MIB:.0f} MiB"
        hoarder.close()


def test_stalled_write_payloads_hold_little_memory(backend: str, tmp_path: Any) -> None:
    # A file export: the parts of a write that arrived go to the file as they arrive (the page cache, not the
    # server's memory); what the server itself holds is what is measured.
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(2048 * MIB)
    with serve(backend, str(image)) as served:
        before = served.rss()
        chunk = os.urandom(MIB)
        hoarders = []
        for i in range(48):
            client = RawClient(served.address)
            client.go("")
            # 32 MiB of payload announced, all but the last byte sent: the write can never complete.
            client.sock.sendall(request(n.Command.WRITE, 1, i * 32 * MIB, 32 * MIB))
            hoarders.append(client)
        senders = [threading.Thread(target=_send_all_but_one, args=(c.sock, chunk), daemon=True) for c in hoarders]
        for sender in senders:
            sender.start()
        reader = well_behaved(served.address)
        reader.start()
        peak = _peak_rss_while(served, reader, 50, 4.0)
        assert reader.finish() >= 50
        for sender in senders:
            sender.join(30)
        assert peak - before < 1024 * MIB, f"RSS grew by {(peak - before) / MIB:.0f} MiB"
        for client in hoarders:
            client.close()


def _send_all_but_one(sock: socket.socket, chunk: bytes) -> None:
    with contextlib.suppress(OSError):
        for _ in range(31):
            sock.sendall(chunk)
        sock.sendall(chunk[:-1])


def test_running_out_of_descriptors_then_serving_again(backend: str) -> None:
    with serve(backend, "--memory", "64M", nofile=64) as served:
        crowd = []
        for _ in range(100):
            with contextlib.suppress(OSError):
                crowd.append(socket.create_connection(served.address, timeout=5))
        wait_until(lambda: "cannot accept connections: Too many open files" in served.log(), "the server at its limit")
        for sock in crowd:
            sock.close()
        # The descriptors come back; the server accepts and serves again (its accept loop backs off, then goes on).
        client = RawClient(served.address)  # waits in the listen queue until the server accepts it again
        client.go("")
        wait_until(lambda: "accepting connections again" in served.log(), "the server accepting again")
        client.sock.sendall(request(n.Command.READ, 1, 0, 4096))
        assert client.simple_reply(1, 4096) == (0, bytes(4096))
        client.close()
        assert served.proc.poll() is None
        assert "Traceback" not in served.log()


def test_a_stalled_handshake_is_closed_by_the_default_limit() -> None:
    # Both backends at once: the default limit is 10 s, and the suite should not wait for it twice.
    with serve("threads", "--memory", "1M") as threads, serve("asyncio", "--memory", "1M") as anyio_served:
        socks = [socket.create_connection(served.address, timeout=30) for served in (threads, anyio_served)]
        for sock in socks:
            sock.recv(18)  # the greeting; then nothing from us
        started = time.monotonic()
        for sock in socks:
            assert sock.recv(100) == b""  # closed by the server
        waited = time.monotonic() - started
        assert waited >= 9.0, waited
        for served, sock in zip((threads, anyio_served), socks, strict=True):  # the handshake limit closed them
            timed_out = f"client 127.0.0.1:{sock.getsockname()[1]} timed out"
            wait_until(lambda s=served, line=timed_out: line in s.log(), timed_out)
            sock.close()


def test_500_stalled_handshakes_are_all_closed_and_forgotten(backend: str) -> None:
    limit = 2.0
    with serve(backend, "--memory", "1M", "--handshake-timeout", str(limit)) as served:
        with socket.create_connection(served.address, timeout=30) as first:  # the server is up and serving
            assert len(first.recv(18)) == 18
        threads_before, fds_before = served.threads(), served.descriptors()
        opened = time.monotonic()  # before the first connection: the last one closes at least a limit after it
        stalled = [socket.create_connection(served.address, timeout=30) for _ in range(250)]
        starttls = [socket.create_connection(served.address, timeout=30) for _ in range(250)]
        for sock in starttls:  # STARTTLS asked for (refused: no TLS here), then nothing more
            sock.sendall(client_flags() + option(n.Option.STARTTLS, b""))
        for sock in stalled + starttls:  # each ends when the server closes it (a socket timeout is a failure)
            sock.settimeout(30)
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
        assert time.monotonic() - opened >= limit * 0.9
        wait_until(lambda: " timed out" in served.log(), "closed by the handshake limit (its log line)")
        # The 500 sockets and their threads are gone (an event loop may open one or two of its own).
        wait_until(lambda: served.threads() <= threads_before + 2, "the server's threads back to what they were")
        wait_until(lambda: served.descriptors() <= fds_before + 4, "the server's descriptors back to what they were")
        for sock in stalled + starttls:
            sock.close()


BAD_CLIENTS = {
    "bad request magic": lambda c: c.sock.sendall(b"\x00" * 28),
    "oversized payload": lambda c: c.sock.sendall(request(n.Command.WRITE, 1, 0, 1 << 31)),
    "reset while replying": lambda c: (c.sock.sendall(request(n.Command.READ, 1, 0, 32 * MIB)), _reset(c.sock)),
    "bad flags": lambda c: c.sock.sendall(struct.pack(">IHHQQI", n.wire.REQUEST_MAGIC, 0xFF, 0, 1, 0, 0)),
}


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("server", ["threads", "asyncio", "trio"])
def test_client_protocol_errors_print_no_traceback(server: str) -> None:
    with serve(server, "--memory", "64M") as served:
        for attack in BAD_CLIENTS.values():
            client = RawClient(served.address)
            client.go("")
            attack(client)
            client.close()
        tls_quitter = RawClient(served.address)  # closes during what would be the TLS handshake
        tls_quitter.sock.sendall(client_flags() + option(n.Option.STARTTLS, b"") + b"\x16\x03\x01\x00")
        tls_quitter.close()
        _serves(served.address, 3)
    log = served.log()
    assert "Traceback" not in log, log
    assert "broke the protocol" in log


def test_sigterm_with_clients_that_never_read(backend: str, tmp_path: Any) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * MIB))
    with serve(backend, str(image)) as served:
        writer = RawClient(served.address)
        writer.go("")
        written = {}
        for cookie in range(1, 17):
            block = os.urandom(65536)
            writer.sock.sendall(request(n.Command.WRITE, cookie, cookie * MIB, len(block)) + block)
            assert writer.simple_reply(cookie) == (0, b"")
            written[cookie * MIB] = block
        sleepers = []
        for _ in range(4):
            client = RawClient(served.address)
            client.go("")
            client.sock.sendall(b"".join(request(n.Command.READ, i, 0, 32 * MIB) for i in range(1, 64)))
            sleepers.append(client)
        for client in sleepers:  # their replies fill the socket buffers (unread, in their receive queues)
            try:
                wait_until(lambda c=client: _unread(c.sock) >= 65536, "replies piling up unread")
            except AssertionError as exc:  # say what each client had, and what the server logged
                unread = [_unread(c.sock) for c in sleepers]
                log = served.log()[-4000:]
                raise AssertionError(f"{exc}; unread per client {unread}; server log:\n{log}") from None
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(30)  # it ends: it does not wait for ever on clients that do not read...
        assert served.proc.returncode == 0
        assert time.monotonic() - started >= 3.0 * 0.9  # ... once their requests had the shutdown grace (3 s)
    after = served.log().split("shutting down", 1)[1]
    for client in sleepers:  # the server ended theirs (the line says how: a broken pipe, or a disconnect)
        assert f"client 127.0.0.1:{client.sock.getsockname()[1]}" in after, after
    data = image.read_bytes()
    for offset, block in written.items():
        assert data[offset : offset + len(block)] == block


@pytest.mark.parametrize("server", ["threads", "asyncio", "trio"])
def test_sigterm_during_pipelined_reads_cuts_no_reply_short(server: str) -> None:
    with serve(server, "--memory", "256M") as served:
        client = RawClient(served.address)
        client.go("")
        client.sock.sendall(b"".join(request(n.Command.READ, i, (i % 200) * MIB, MIB) for i in range(1, 201)))
        # Read the first replies, then ask the server to stop while the rest are on their way.
        for cookie in range(1, 4):
            assert client.simple_reply(cookie, MIB) == (0, bytes(MIB))
        served.proc.send_signal(signal.SIGTERM)
        answered = 3
        while True:
            try:
                header = client.recv_exactly(16)
            except ConnectionError as exc:
                assert "after 0 of 16" in str(exc), f"a reply header was cut short: {exc}"
                break
            magic, error, cookie = struct.unpack(">IIQ", header)
            assert magic == n.wire.SIMPLE_REPLY_MAGIC
            if error == 0:
                assert client.recv_exactly(MIB) == bytes(MIB)  # never cut short
            else:
                assert error == n.Errno.ESHUTDOWN
            answered += 1
        assert answered >= 3
        served.proc.wait(15)
        assert served.proc.returncode == 0


@pytest.mark.parametrize("server", ["threads", "asyncio"])
def test_two_reads_with_one_cookie_are_both_answered(server: str) -> None:
    with serve(server, "--memory", "16M") as served:
        client = RawClient(served.address)
        client.go("")
        client.sock.sendall(
            client_flags()[:0] + request(n.Command.READ, 7, 0, 4096) + request(n.Command.READ, 7, 8192, 4096)
        )
        assert client.simple_reply(7, 4096) == (0, bytes(4096))
        assert client.simple_reply(7, 4096) == (0, bytes(4096))
        client.sock.sendall(request(n.Command.DISC, 8, 0, 0))
        assert client.closed_by_server()
        client.close()
