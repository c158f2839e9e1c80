"""Real NBD servers for tests that need a remote export: nbdkit and qemu-nbd on free loopback ports, and our
own ``nbdproto serve`` / ``nbdproto mirror`` run as subprocesses. Every start-up is bounded; every process is
stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from tests.conftest import PEER_ENV
from tests.waiting import tcp_listening, unix_listening, wait_until

CLI = [sys.executable, "-m", "nbdproto"]


_PORT_BASE = 12000
_PORTS_PER_WORKER = 2000
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
_first = _PORT_BASE + (int(_worker[2:]) % 10 if _worker[2:].isdigit() else 0) * _PORTS_PER_WORKER
_turn = [os.getpid() % _PORTS_PER_WORKER]


def free_port() -> int:
    """A loopback port for a server this test starts (or for nothing to listen on): free now, and one no other
    test of the run is given. A port the kernel picks (bind to port 0) comes from the range every outgoing
    connection takes its port from, and another pytest-xdist worker may be given it the moment it is let go: a
    server started on it then lost the race to another test's server, and the test talked to the wrong one
    (a qemu-nbd with TLS answered by a plain one). Here each worker takes ports from a block of its own, below
    the kernel's range (32768 and up), in turn, each checked free."""
    for _ in range(_PORTS_PER_WORKER):
        port = _first + _turn[0]
        _turn[0] = (_turn[0] + 1) % _PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port in {_first}-{_first + _PORTS_PER_WORKER - 1}")


def wait_for_port(port: int | str, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    """Wait until ``proc`` listens on ``port`` (on 127.0.0.1, or a unix socket path), bounded; seen in /proc
    without connecting (a unix socket's file appears at bind, before listen; a probe would be a client)."""

    def up() -> bool:
        listening = tcp_listening(port) if isinstance(port, int) else unix_listening(port)
        return listening or proc.poll() is not None

    wait_until(up, f"{what} listening", timeout)
    if proc.poll() is not None:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"{what} exited with {proc.returncode} before it listened: {err}")


@contextlib.contextmanager
def nbdkit(*args: str, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """nbdkit ARGS on a loopback port; yields its URI and process."""
    port = port or free_port()
    proc = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), *args],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc, "nbdkit")
        yield f"nbd://127.0.0.1:{port}/", proc
    finally:
        stop(proc)


@contextlib.contextmanager
def qemu_nbd(image: str, *args: str, image_format: str = "raw", shared: int = 8) -> Iterator[str]:
    """qemu-nbd serving ``image`` (persistent, to ``shared`` clients at once); yields its URI."""
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-t", "-e", str(shared), "-f", image_format, "-b", "127.0.0.1", "-p", str(port), *args, image],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc, "qemu-nbd")
        yield f"nbd://127.0.0.1:{port}/"
    finally:
        stop(proc)


@contextlib.contextmanager
def serving_on_socket(command: list[str], sock: str, what: str, timeout: float = 15.0) -> Iterator[None]:
    """Run ``command``, a server that listens on the unix socket ``sock``, until it accepts connections there
    (bounded); stopped at the end."""
    proc = subprocess.Popen(command, env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(sock, proc, what, timeout)
        yield
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL for a server that does not go within 5 s (nbdkit waits for its clients)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Cli:
    """An ``nbdproto`` subprocess whose stdout (URIs) and stderr (progress) are read line by line, bounded."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environment = PEER_ENV if env is None else {**PEER_ENV, **env}
        self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
        self.out: list[str] = []
        self.err: list[str] = []
        self._partial = {"out": b"", "err": b""}
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ, "out")
        self._selector.register(self.proc.stderr, selectors.EVENT_READ, "err")

    def _read(self, timeout: float) -> bool:
        """Take in what the process printed within ``timeout``; False once both streams are closed."""
        if not self._selector.get_map():
            return False
        for key, _ in self._selector.select(timeout):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                self._selector.unregister(key.fileobj)
                continue
            data = self._partial[key.data] + chunk
            *lines, self._partial[key.data] = data.split(b"\n")
            (self.out if key.data == "out" else self.err).extend(line.decode() for line in lines)
        return True

    def wait_for(self, stream: str, predicate: object, timeout: float = 60.0) -> str:
        """The first line of ``stream`` ("out" or "err") for which ``predicate(line)`` holds."""
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        seen = 0
        ended = False
        while True:
            for line in lines[seen:]:
                if predicate(line):  # type: ignore[operator]
                    return line
            seen = len(lines)
            left = deadline - time.monotonic()
            if left <= 0 or ended:
                raise AssertionError(f"no such line within {timeout} s; stdout {self.out!r}, stderr {self.err!r}")
            if not self._read(min(left, 1.0)):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(min(left, 1.0))
                    ended = True  # both streams closed and the process gone: one last look at the lines

    def uri(self) -> str:
        return self.wait_for("out", lambda line: line.startswith("serving "), 30).split()[1]

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        deadline = time.monotonic() + timeout
        while self._read(max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)
        self._selector.close()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()


@contextlib.contextmanager
def cli(*args: str) -> Iterator[Cli]:
    process = Cli(*args)
    try:
        yield process
    finally:
        process.close()


@contextlib.contextmanager
def stopped(proc: subprocess.Popen[bytes]) -> Iterator[float]:
    """``proc`` stopped (SIGSTOP) for the block, continued after it whatever happens; yields when it stopped:
    when every thread of it is, not when the signal was sent (on a loaded machine the thread that takes the
    signal may wait for a core while the others still answer requests)."""
    proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: all_stopped(proc.pid), f"every thread of {proc.pid} stopped", 10)
        yield time.monotonic()
    finally:
        proc.send_signal(signal.SIGCONT)


def all_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state T in /proc)."""
    tasks = os.listdir(f"/proc/{pid}/task")
    states = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/stat") as stat:
            states.append(stat.read().rsplit(")", 1)[1].split()[0])  # (a thread that ended meanwhile: skipped)
    return bool(states) and all(state in ("T", "t") for state in states)
