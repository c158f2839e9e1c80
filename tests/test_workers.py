"""``nbdproto serve --workers N``: real servers of worker processes, proved to share their exports across
processes (a write through one worker's connection is read through another's; a flush on one flushes what the
others wrote), to survive and replace a killed worker without losing acknowledged writes, to stop cleanly on
SIGTERM, to apply the connection policy across workers, and to refuse exports they cannot share. Which worker
serves a connection is read from the server's log (each line carries its process id, and -v names the client's
address and port); the shared pieces (SharedClientCount, SharedMemoryDevice) are tested across fork too."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import nbdproto
import nbdproto.serving
import nbdproto_threads
from nbdproto.cli._workers import Supervisor
from nbdproto.devices import SharedMemoryDevice
from nbdproto.sockets import SharedClientCount
from tests.activation import ended
from tests.conftest import PEER_ENV
from tests.serving import make_pki
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.timeout(120),
    # Some tests fork this process, which pytest-xdist's threads make multi-threaded (Python 3.12+ warns); the
    # children only touch what the test made for them and exit with os._exit. serve's supervisor forks with
    # no thread of its own.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"),
]
MIB = 1 << 20
SERVE = [sys.executable, "-m", "nbdproto", "serve"]
BACKENDS = ["threads", "anyio"]
GREETING = 18


def poll(condition: Callable[[], Any], what: str, timeout: float = 20.0, log: Callable[[], str] = str) -> Any:
    try:
        return wait_until(condition, what, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the log:\n{log()}") from None


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(child) for child in f.read().split()}


@dataclass
class Served:
    """A ``serve --workers`` process: its URI, its log (stderr, with -v), and the clients opened on it."""

    proc: subprocess.Popen[str]
    uri: str
    log_path: Path
    clients: list[nbdproto_threads.Client] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> set[int]:
        return children(self.proc.pid)

    def connect(self, **options: Any) -> tuple[nbdproto_threads.Client, int]:
        """A new connection, and the pid of the worker that serves it (from its log line)."""
        client = nbdproto_threads.connect(self.uri, timeout=30, **options)
        self.clients.append(client)
        port = client.stream.sock.getsockname()[1]
        line = re.compile(rf"\[(\d+)\]: client 127\.0\.0\.1:{port} uses export")
        match = poll(lambda: line.search(self.log()), f"the connection from port {port} logged", log=self.log)
        return client, int(match.group(1))

    def connect_elsewhere(
        self, taken: set[int], *, close_misses: bool = False, **options: Any
    ) -> tuple[nbdproto_threads.Client, int]:
        """A connection served by a worker not in ``taken``. Connections are opened until one lands on another
        worker (a busier worker leaves new connections to the others, most of the time); those that do not are
        kept open, or with ``close_misses`` closed, and their end logged, before the next is tried (so that a
        connection limit is not reached)."""
        for _ in range(20):
            client, pid = self.connect(**options)
            if pid not in taken:
                return client, pid
            if close_misses:
                port = client.stream.sock.getsockname()[1]
                client.close()
                self.clients.remove(client)
                gone = re.compile(rf"client 127\.0\.0\.1:{port} disconnected")
                poll(functools.partial(_logged, self, gone), f"the connection from port {port} closed", log=self.log)
        raise AssertionError(f"20 connections all went to workers {taken}")

    def close_clients(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.close()
        self.clients.clear()


def _logged(served: Served, line: re.Pattern[str]) -> re.Match[str] | None:
    return line.search(served.log())


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str, workers: str = "2", count: int = 2, startup: float = 30) -> Iterator[Served]:
    """``nbdproto serve ARGS --workers WORKERS -v`` on a free port, once every worker serves (the pid file is
    written only then), checked to have ``count`` workers; stopped with SIGTERM at the end."""
    pid_file, log_path = tmp_path / "serve.pid", tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*SERVE, "--port", "0", "--workers", workers, "-v", "--pid-file", str(pid_file),
                                 *args], stdout=subprocess.PIPE, stderr=log, text=True, env=PEER_ENV)  # fmt: skip
    served = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed before the workers start
        assert line.startswith("serving "), (line, log_path.read_text())
        served = Served(proc, line.split()[1], log_path)
        poll(lambda: pid_file.exists() or proc.poll() is not None, "serving", timeout=startup)
        assert proc.poll() is None, served.log()
        assert len(served.workers()) == count
        yield served
    finally:
        if served is not None:
            served.close_clients()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        if proc.stdout is not None:
            proc.stdout.close()


# --- One export, many processes ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["file", "memory"])
def test_a_write_on_one_worker_is_read_back_on_another(backend: str, kind: str, tmp_path: Path) -> None:
    source = str(tmp_path / "disk.img") if kind == "file" else "memory:64M"
    if kind == "file":
        with open(source, "wb") as f:
            f.truncate(64 * MIB)
    with serving(tmp_path, source, "--backend", backend) as served:
        a, pid_a = served.connect()
        b, _pid_b = served.connect_elsewhere({pid_a})
        assert a.can(nbdproto.TransmissionFlags.CAN_MULTI_CONN) and b.can(nbdproto.TransmissionFlags.CAN_MULTI_CONN)
        data = os.urandom(3 * MIB + 512)
        a.pwrite(data, 5 * MIB)  # no flush, no FUA: acknowledged is enough for multi-conn
        assert b.pread(len(data), 5 * MIB) == data
        # Block status seen from another process: the written range is data, the rest holes.
        assert b.block_status(4 * MIB, 0)["base:allocation"][0][1] & nbdproto.AllocationState.HOLE
        extents = b.block_status(MIB, 5 * MIB)["base:allocation"]
        assert not extents[0][1] & nbdproto.AllocationState.HOLE
        # ... and a trim by the other worker frees it for the first.
        b.trim(2 * MIB, 6 * MIB)
        assert a.pread(2 * MIB, 6 * MIB) == bytes(2 * MIB)
        assert a.block_status(2 * MIB, 6 * MIB)["base:allocation"][0] == (2 * MIB, 3)


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def dirty_pages(path: str, offset: int, length: int) -> int | None:
    """Pages of ``path``'s range waiting to be written to its disk (dirty or under writeback), from Linux's
    cachestat(2) (6.5+); None where it is missing."""
    libc = ctypes.CDLL(None, use_errno=True)
    stat = _CacheStat()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, ctypes.byref(_CacheStatRange(offset, length)), ctypes.byref(stat), 0) != 0:
            return None
    finally:
        os.close(fd)
    return int(stat.dirty + stat.writeback)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flush_on_one_worker_flushes_what_another_wrote(backend: str, tmp_path: Path) -> None:
    path = str(tmp_path / "disk.img")  # on a disk's file system (tmpfs pages never reach a disk)
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        os.fsync(f.fileno())
    with serving(tmp_path, path, "--backend", backend) as served:
        a, pid_a = served.connect()
        b, _pid_b = served.connect_elsewhere({pid_a})
        data = os.urandom(4 * MIB)
        a.pwrite(data, 8 * MIB)
        before = dirty_pages(path, 8 * MIB, 4 * MIB)
        if before is not None:
            assert before > 0, "the write reached the disk before any flush: nothing left to prove"
        b.flush()
        if before is not None:
            assert dirty_pages(path, 8 * MIB, 4 * MIB) == 0, "worker B's flush left worker A's write unwritten"
        # Kill everything at once: what was acknowledged is in the file, not in a worker.
        for pid in (*served.workers(), served.proc.pid):
            os.kill(pid, signal.SIGKILL)
        served.proc.wait(10)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * MIB, 8 * MIB) == data
    finally:
        os.close(fd)


@pytest.mark.parametrize(("backend", "source"), [("anyio", "memory:32M"), ("threads", "file")])
def test_a_killed_worker_is_replaced_and_its_acknowledged_writes_stay(
    backend: str, source: str, tmp_path: Path
) -> None:
    if source == "file":
        source = str(tmp_path / "disk.img")
        with open(source, "wb") as f:
            f.truncate(32 * MIB)
    with serving(tmp_path, source, "--backend", backend) as served:
        a, pid_a = served.connect()
        data = os.urandom(MIB)
        a.pwrite(data, 3 * MIB)
        os.kill(pid_a, signal.SIGKILL)
        assert a.wait_closed(10)
        replaced = re.compile(rf"worker \d \(pid {pid_a}\) was killed by signal 9 \(SIGKILL\): replacing it")
        poll(lambda: replaced.search(served.log()), "the death logged")
        poll(lambda: len(served.workers()) == 2 and pid_a not in served.workers(), "a new worker started")
        serves = re.compile(r"worker \d \(pid (\d+)\) serves")
        poll(lambda: {int(pid) for pid in serves.findall(served.log())} >= served.workers(), "every worker serving",
             log=served.log)  # fmt: skip
        c, pid_c = served.connect()
        assert c.pread(MIB, 3 * MIB) == data
        # Both workers serve, the new one included, and see what the dead one acknowledged.
        d, pid_d = served.connect_elsewhere({pid_c})
        assert {pid_c, pid_d} == served.workers()
        assert d.pread(MIB, 3 * MIB) == data


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_stops_every_worker_and_the_server_exits_0(backend: str, tmp_path: Path) -> None:
    sock, pid_file = str(tmp_path / "nbd.sock"), tmp_path / "pid"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MIB))
    proc = subprocess.Popen([*SERVE, str(disk), "--socket", sock, "--workers", "3", "--backend", backend,
                             "--pid-file", str(pid_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=PEER_ENV)  # fmt: skip
    try:
        poll(pid_file.exists, "serving")
        assert int(pid_file.read_text()) == proc.pid  # the supervisor's: the one to signal
        workers = children(proc.pid)
        assert len(workers) == 3
        with nbdproto_threads.connect(f"nbd+unix:///?socket={sock}", timeout=30) as client:
            client.pwrite(b"x" * 4096, 0)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "stopped"
    assert all(ended(pid) for pid in workers)
    assert not os.path.exists(sock) and not pid_file.exists()
    assert disk.read_bytes()[:4096] == b"x" * 4096
    assert "Traceback" not in err


def test_a_worker_that_fails_before_serving_stops_the_server(caplog: pytest.LogCaptureFixture) -> None:
    def start(index: int, clients: nbdproto.serving.ClientCount, ready: Callable[[], None]) -> None:
        raise RuntimeError("no event loop today")

    supervisor = Supervisor(2, start, stop_timeout=10)
    stop = threading.Event()
    with caplog.at_level(logging.ERROR, "nbdproto.cli"):
        assert supervisor.run(stop, lambda: pytest.fail("ready without a serving worker")) == 1
    assert re.search(r"worker \d \(pid \d+\) exited with status 1 before serving: stopping", caplog.text)
    assert all(slot.pid is None for slot in supervisor.slots)


# --- The policy across workers -------------------------------------------------------------------------------


def refused(served: Served) -> bool:
    """Whether a new connection is closed before the greeting (refused by the policy)."""
    host, port = served.uri.removeprefix("nbd://").rstrip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        received = b""
        while len(received) < GREETING and (chunk := sock.recv(GREETING - len(received))):
            received += chunk
    return received == b""


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_connections_counts_the_clients_of_every_worker(backend: str, tmp_path: Path) -> None:
    with serving(tmp_path, "--memory", "1M", "--backend", backend, "--max-connections", "2") as served:
        a, pid_a = served.connect()
        _b, pid_b = served.connect_elsewhere({pid_a}, close_misses=True)
        assert len(served.clients) == 2, "a connection was refused below the limit"
        # Each worker has one client, and no room for another: the limit is the server's, not each worker's.
        assert all(refused(served) for _ in range(4))
        if backend == "threads":
            # Every worker refuses, not only one. The kernel hands new connections to the workers waiting in
            # accept, most of the time in turn, but not always (a worker still busy with its last refusal
            # leaves the next to the other): connections are tried, each refused, until both have refused one.
            refusal = re.compile(r"\[(\d+)\]: client \S+ refused: too many connections")

            def both_refused() -> bool:
                if {int(m) for m in refusal.findall(served.log())} == {pid_a, pid_b}:
                    return True
                assert refused(served)  # one more try: each is refused, by one worker or the other
                return False

            wait_until(both_refused, "a refusal by each worker", every=0.05)
        a.close()
        poll(lambda: not refused(served), "room again once a client left")
        # A worker's death frees the places of its clients.
        os.kill(pid_b, signal.SIGKILL)
        poll(lambda: len(served.workers()) == 2 and pid_b not in served.workers(), "a new worker started")
        served.close_clients()
        c, _ = served.connect()
        d, _ = served.connect()
        assert c.size == d.size == MIB


def test_connection_numbers_are_unique_across_workers(tmp_path: Path) -> None:
    log_file = tmp_path / "requests.log"
    with serving(tmp_path, "--memory", "1M", "--filter", f"log:file={log_file}") as served:
        _a, pid_a = served.connect()
        _b, _pid_b = served.connect_elsewhere({pid_a})
        for client in served.clients:
            client.pread(512, 0)
        opened = len(served.clients)
    numbers = {m for m in re.findall(r"connection=(\d+) Read", log_file.read_text())}
    assert opened >= 2 and len(numbers) == opened


def test_stats_are_reported_by_each_worker_on_sigusr1(tmp_path: Path) -> None:
    stats = tmp_path / "stats.txt"
    with serving(tmp_path, "--memory", "1M", "--filter", f"stats:file={stats}") as served:
        a, pid_a = served.connect()
        b, pid_b = served.connect_elsewhere({pid_a})
        a.pread(512, 0)
        b.pwrite(b"y" * 1024, 0)
        os.kill(served.proc.pid, signal.SIGUSR1)
        files = [Path(f"{stats}.1"), Path(f"{stats}.2")]
        poll(lambda: all(f.exists() and "stats over" in f.read_text() for f in files), "both workers' reports")
        text = "".join(f.read_text() for f in files)
        assert f"(pid {pid_a})" in text and f"(pid {pid_b})" in text
        assert re.search(r"read\s+1\s+512 B", text) and re.search(r"write\s+1\s+1\.0 KiB", text)


# --- What can be shared, and how it starts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nbd://127.0.0.1:1/x"], "--workers: an NBD URI is served over connections to the remote server"),
        (["s3://bucket/key"], "--workers: an s3:// export keeps its allocation map"),
        (["--memory", "1M", "--filter", "cow"], "--workers: --filter cow keeps its overlay"),
        (["--memory", "1M", "--filter", "blocksize:minimum=4K"], "--workers: --filter blocksize keeps the locks"),
        (["--memory", "1M", "--oneshot"], "--oneshot serves one connection, which one process serves"),
        (["--memory", "1M", "--workers", "0"], "--workers 0: expected a number of processes"),
        (["--memory", "1M", "--workers", "many"], "--workers many: expected a number of processes"),
    ],
)
def test_what_workers_cannot_share_is_a_usage_error(args: list[str], message: str) -> None:
    result = subprocess.run([*SERVE, "--port", "0", "--workers", "2", *args], capture_output=True, text=True,
                            timeout=60, env=PEER_ENV)  # fmt: skip
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_mirror_has_no_workers(tmp_path: Path) -> None:
    primary = tmp_path / "a.img"
    primary.write_bytes(bytes(MIB))
    result = subprocess.run([sys.executable, "-m", "nbdproto", "mirror", str(primary), str(tmp_path / "b.img"),
                             "--workers", "2"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "unrecognized arguments: --workers" in result.stderr


def test_workers_auto_is_one_per_core(tmp_path: Path) -> None:
    cores = min(len(os.sched_getaffinity(0)), 8)
    with serving(tmp_path, "--memory", "1M", workers="auto", count=cores) as served:
        client, _ = served.connect()
        assert client.size == MIB


@pytest.mark.parametrize("backend", BACKENDS)
def test_nbdcopy_with_four_connections_to_two_workers(backend: str, peers: Any, tmp_path: Path) -> None:
    peers("nbdcopy")
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(40 * MIB) + bytes(16 * MIB) + os.urandom(8 * MIB))
    with serving(tmp_path, "--memory", "64M", "--backend", backend) as served:
        for command in (["nbdcopy", "--connections=4", "--threads=4", str(src), served.uri],
                        ["nbdcopy", "--connections=4", "--threads=4", served.uri, str(back)]):  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=PEER_ENV)
            assert result.returncode == 0, result.stderr
        serving_pids = {int(m) for m in re.findall(r"\[(\d+)\]: client \S+ uses export", served.log())}
        assert len(re.findall(r"uses export", served.log())) >= 8  # 4 connections each way
        if backend == "threads":  # the kernel hands connections to the waiting workers in turn
            assert serving_pids == served.workers()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()


def test_socket_activation_run_and_tls_with_workers(peers: Any, tmp_path: Path) -> None:
    peers("nbdinfo")
    result = subprocess.run(["nbdinfo", "--size", "--", "[", *SERVE, "--memory", "3M", "--workers", "2", "]"],
                            capture_output=True, text=True, timeout=60, env=PEER_ENV)  # fmt: skip
    assert (result.returncode, result.stdout) == (0, f"{3 * MIB}\n"), result.stderr
    result = subprocess.run([*SERVE, "--memory", "2M", "--workers", "2", "--run", 'nbdinfo --size "$uri"'],
                            capture_output=True, text=True, timeout=60, env=PEER_ENV)  # fmt: skip
    assert (result.returncode, result.stdout) == (0, f"{2 * MIB}\n"), result.stderr
    with make_pki() as pki:
        key, cert = os.path.join(pki.directory, "server-key.pem"), os.path.join(pki.directory, "server-cert.pem")
        with serving(tmp_path, "--memory", "1M", "--tls", "require", "--tls-cert", cert, "--tls-key", key) as served:
            served.uri = served.uri.replace("nbd://", "nbds://") + f"?tls-certificates={pki.directory}"
            a, pid_a = served.connect()
            b, _pid_b = served.connect_elsewhere({pid_a})
            a.pwrite(b"secret", 0)
            assert b.pread(6, 0) == b"secret"


def test_fork_returns_once_every_worker_serves(tmp_path: Path) -> None:
    sock, pid_file = str(tmp_path / "nbd.sock"), tmp_path / "pid"
    # capture_output: the call returns only when every holder of serve's stdout has let it go, workers too.
    result = subprocess.run([*SERVE, "--memory", "1M", "--socket", sock, "--workers", "2", "--fork", "--pid-file",
                             str(pid_file)], capture_output=True, text=True, timeout=30, env=PEER_ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    try:
        assert len(children(pid)) == 2
        with nbdproto_threads.connect(f"nbd+unix:///?socket={sock}", timeout=30) as client:
            assert client.size == MIB
    finally:
        os.kill(pid, signal.SIGTERM)
    poll(lambda: ended(pid) and not os.path.exists(sock), "stopped and cleaned up")


# --- The shared pieces, across fork --------------------------------------------------------------------------


def _in_child(work: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = work()
        finally:
            os._exit(status)
    return pid


def test_shared_client_count_admits_exactly_the_limit_across_processes() -> None:
    counts = SharedClientCount(4)

    def admit_200(index: int) -> int:
        share = counts.sharer(index)
        return sum(share.enter(lambda open_, total: "full" if open_ >= 10 else None) is None for _ in range(200))

    pids = [_in_child(functools.partial(admit_200, i)) for i in range(4)]
    admitted = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert sum(admitted) == 10 and counts.admitted() == 10
    assert sum(counts.open_connections()) == 10
    for index in range(4):
        counts.forget(index)  # the processes are gone, and their clients with them
    assert counts.open_connections() == [0, 0, 0, 0]
    numbers = {counts.sharer(0).number() for _ in range(5)} | {counts.sharer(1).number() for _ in range(5)}
    assert numbers == set(range(1, 11))
    counts.close()


def test_a_process_killed_while_holding_the_count_lock_blocks_no_one() -> None:
    counts = SharedClientCount(2)
    read_end, write_end = os.pipe()

    def hold() -> int:
        with counts._locked():
            os.write(write_end, b"x")
            time.sleep(60)  # the process under test holds the lock until it is killed
        return 0

    pid = _in_child(hold)
    assert os.read(read_end, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert counts.sharer(1).enter(lambda open_, total: None) is None
    assert counts.open_connections() == [0, 1]
    counts.close()


def test_shared_memory_device_is_one_disk_for_forked_processes() -> None:
    device = SharedMemoryDevice(64 * MIB)
    assert device.capabilities.can_multi_conn and device.allocated == 0
    data = os.urandom(MIB)

    def write() -> int:
        device.pwrite(data, 10 * MIB)
        return 0

    pid = _in_child(write)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    buffer = bytearray(MIB)
    device.pread_into(memoryview(buffer), 10 * MIB)
    assert buffer == data and device.allocated >= MIB
    assert device.extents(nbdproto.BASE_ALLOCATION, 8 * MIB, 4 * MIB) == [(2 * MIB, 3), (MIB, 0), (MIB, 3)]
    device.trim(10 * MIB, MIB)
    assert device.allocated == 0
    device.close()
