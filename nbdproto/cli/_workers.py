"""``nbdproto serve --workers N``: N processes serving one listening socket, and the supervisor that keeps them.

One Python process is held to about one core by the interpreter lock, while nbdkit spreads its connections over
threads on every core. So serve can fork N worker processes, each a whole server (either backend, TLS, PSK,
filters, the connection policy) serving whole connections. Everything is opened and checked first, in the
process that then supervises them, so a bad option or an export that cannot be shared is a usage error before
anything forks; and it forks before any thread is started (a forked child has only the thread that forked).

**One listening socket, shared.** The socket is made before the fork (bound, or passed by socket activation,
or --run's private one) and every worker accepts on it, rather than each binding its own with SO_REUSEPORT:

- it works for every way serve listens: unix sockets (SO_REUSEPORT is for TCP), the sockets a service manager
  passes (one socket, made by someone else), --run's private socket;
- a worker that dies loses no connection waiting to be accepted: the backlog belongs to the one socket and the
  other workers take it, where a SO_REUSEPORT socket's queued connections are reset with it;
- the kernel gives each connection to a worker waiting for one (the threads backend waits in a blocking
  accept, woken one at a time in turn), where SO_REUSEPORT hashes addresses whatever the load (4 connections
  of nbdcopy over 2 workers would all go to one of them 1 time in 8).
The price: an event loop waits for readiness, so each new connection wakes every idle worker of the anyio
backend and one wins the accept; nothing beside NBD's long-lived connections.

**The export, shared.** A file (or block device) is opened before the fork and inherited: every worker reads
and writes one page cache, so a write completed by one is read by all, and a flush (fdatasync of the file) on
any connection flushes what every worker wrote; multi-conn stays true. ``memory:SIZE`` becomes shared memory
(nbdproto.devices.SharedMemoryDevice, a memfd) for the same reasons. Sources and filters that keep state in
one process are refused (``check_shareable``): an NBD URI (the connection to the remote server), s3:// (its
allocation map, object locks and write-back cache), ``--filter cow`` (the overlay and its map) and
``--filter blocksize`` (the locks that keep concurrent read-modify-writes from losing each other).

**The policy.** ``--max-connections`` counts the clients of all workers, exactly: admissions check and count
under one lock in shared memory (nbdproto.sockets.SharedClientCount), and a dead worker's clients stop
counting. Connection numbers (logs, the log filter) are unique across workers. ``--oneshot`` serves one
connection, which one process serves: it needs ``--workers 1``. ``--memory-limit`` is divided among the
workers, so that it still bounds what all connections together hold.

**Signals, death and logs.** The supervisor forwards SIGTERM and SIGINT (and SIGUSR1, with stats filters) to
the workers, which stop as one server does (``--shutdown-grace``), and waits for them (the grace, plus
STOP_MARGIN for flushing; then SIGKILL, logged). A worker that dies otherwise is replaced and the death logged;
one that dies again within STABLE seconds of starting is replaced after a delay that doubles, up to
MAX_BACKOFF. Acknowledged writes are not lost when a worker dies: they are in the page cache or the shared
memory, not in the worker. Each log line carries the pid of the process that wrote it, and the supervisor
logs which worker has which pid. Stats filters count per worker (see ``Filtering.worker``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from nbdproto.serving import ClientCount
from nbdproto.sockets import SharedClientCount

from ._errors import UsageError
from ._filters import FilterSpec
from ._helper import set_parent_death_signal

__all__ = ["MAX_AUTO_WORKERS", "STOP_MARGIN", "parse_workers", "check_shareable", "Supervisor"]

log = logging.getLogger("nbdproto.cli")

MAX_AUTO_WORKERS = 8
"""``--workers auto`` starts one worker per core this process may run on, at most this many."""
STABLE = 10.0
"""Seconds a worker must have lived for its death to be replaced at once."""
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
"""A worker that dies soon after starting is replaced after FIRST_BACKOFF seconds, doubling up to MAX_BACKOFF."""
STOP_MARGIN = 10.0
"""Seconds the supervisor waits beyond the shutdown grace for its workers to close and flush, before SIGKILL."""

_READY = struct.Struct("=I")  # a worker's pid, written to the supervisor's pipe once it serves


def parse_workers(text: str) -> int:
    """The number ``--workers`` asks for: a positive integer, or "auto" (one per usable core, at most
    MAX_AUTO_WORKERS); a UsageError otherwise."""
    if text == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(cores, MAX_AUTO_WORKERS))
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"--workers {text}: expected a number of processes (1 or more) or auto")
    if count > 0xFFFF:
        raise UsageError(f"--workers {text}: at most 65535")
    return count


def check_shareable(kinds: Iterable[str], filters: Sequence[FilterSpec]) -> None:
    """A UsageError when an export of these source ``kinds`` through these ``filters`` cannot be served by
    several processes (see the module docstring)."""
    why = {
        "nbd": "an NBD URI is served over connections to the remote server that one process holds",
        "s3": "an s3:// export keeps its allocation map, object locks and write-back cache in one process",
    }
    for kind in kinds:
        if kind in why:
            raise UsageError(f"--workers: {why[kind]}; serve it with --workers 1")
    for spec in filters:
        if spec.name == "cow":
            raise UsageError("--workers: --filter cow keeps its overlay (and which blocks it holds) in one process; "
                             "serve it with --workers 1")  # fmt: skip
        if spec.name == "blocksize":
            raise UsageError("--workers: --filter blocksize keeps the locks that stop concurrent read-modify-writes "
                             "from losing each other in one process; serve it with --workers 1")  # fmt: skip


StartWorker = Callable[[int, ClientCount, Callable[[], None]], None]
"""What a worker does, in the forked child: ``start(index, clients, ready)`` serves (calling ``ready()`` once
it accepts connections) until the server stops, then returns; the child then exits 0 (1 if it raised)."""


@dataclass
class _Slot:
    """One worker's place: the process in it now, if any."""

    number: int
    pid: int | None = None
    started: float = 0.0
    ready: bool = False
    quick_deaths: int = 0
    due: float | None = None
    """When a replacement is to be started (None: none waiting)."""


class Supervisor:
    """Forks ``count`` workers that each run ``start`` (see StartWorker) and keeps them until the server stops
    (see the module docstring). ``stop_timeout``: how long stopping waits for them before SIGKILL;
    ``forward_usr1``: pass SIGUSR1 on (stats filters report on it)."""

    def __init__(self, count: int, start: StartWorker, *, stop_timeout: float, forward_usr1: bool = False) -> None:
        self.slots = [_Slot(i + 1) for i in range(count)]
        self.clients = SharedClientCount(count)
        self._start = start
        self._stop_timeout = stop_timeout
        self._forward_usr1 = forward_usr1
        self._pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_bytes = b""

    def run(
        self,
        stop: threading.Event,
        on_ready: Callable[[], None],
        command: Callable[[], subprocess.Popen[bytes] | None] = lambda: None,
    ) -> int:
        """Start the workers, call ``on_ready`` once each serves, and supervise them until ``stop`` is set (the
        caller's SIGTERM and SIGINT handlers set it) or the ``command`` (--run's) exits; then stop them. The
        status: 0, or 1 when a worker failed before serving (its error is on stderr)."""
        saved = {signum: signal.getsignal(signum) for signum in (signal.SIGCHLD, signal.SIGUSR1)}
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake the loop (the wakeup fd)
        if self._forward_usr1:
            signal.signal(signal.SIGUSR1, lambda signum, frame: self._signal_all(signal.SIGUSR1))
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            for slot in self.slots:
                self._spawn(slot)
            return self._supervise(stop, on_ready, command)
        finally:
            self._stop_all()
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in saved.items():
                signal.signal(signum, handler)
            for fd in (self._wake_r, self._wake_w, self._ready_r, self._ready_w):
                os.close(fd)
            self.clients.close()

    def worker_pids(self) -> list[int]:
        return [slot.pid for slot in self.slots if slot.pid is not None]

    # --- The workers --------------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        slot.due = None
        slot.ready = False
        slot.started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                self._become_worker()
                index = slot.number - 1
                self._start(index, self.clients.sharer(index), self._tell_ready)
                status = 0
            except BaseException:
                log.exception("worker %d failed", slot.number)
            finally:
                logging.shutdown()
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        slot.pid = pid
        log.info("worker %d started (pid %d)", slot.number, pid)

    def _become_worker(self) -> None:
        """In the forked child: the supervisor's signal plumbing is not the worker's; the worker stops with
        its supervisor (SIGTERM, a clean stop, when the supervisor exits however it does)."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        for fd in (self._wake_r, self._wake_w, self._ready_r):
            os.close(fd)
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self._pid:  # the supervisor died before the kernel was told to watch it
            os.kill(os.getpid(), signal.SIGTERM)

    def _tell_ready(self) -> None:
        os.write(self._ready_w, _READY.pack(os.getpid()))
        os.close(self._ready_w)

    def _signal_all(self, signum: int) -> None:
        if os.getpid() != self._pid:  # a worker between its fork and _become_worker
            return
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # --- Supervising ----------------------------------------------------------------------------------------

    def _supervise(
        self, stop: threading.Event, on_ready: Callable[[], None], command: Callable[[], subprocess.Popen[bytes] | None]
    ) -> int:
        serving = False
        while not stop.is_set():
            run = command()
            if run is not None and run.poll() is not None:
                break
            now = time.monotonic()
            dues = [slot.due for slot in self.slots if slot.due is not None]
            timeout = max(0.0, min([1.0, *(due - now for due in dues)]))
            with contextlib.suppress(InterruptedError):
                select.select([self._wake_r, self._ready_r], [], [], timeout)
            self._drain_wakeups()
            self._read_ready()
            for slot, description in self._reap():
                if not serving:
                    log.error("worker %d (pid %s) %s before serving: stopping", slot.number, slot.pid, description)
                    return 1
                self._schedule_replacement(slot, description)
            now = time.monotonic()
            for slot in self.slots:
                if slot.due is not None and slot.due <= now and not stop.is_set():
                    self._spawn(slot)
            if not serving and all(slot.ready for slot in self.slots):
                serving = True
                on_ready()
        return 0

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _read_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._ready_r, 4096):
                self._ready_bytes += chunk
        usable = len(self._ready_bytes) - len(self._ready_bytes) % _READY.size
        for (pid,) in _READY.iter_unpack(self._ready_bytes[:usable]):
            for slot in self.slots:
                if slot.pid == pid:
                    slot.ready = True
                    log.info("worker %d (pid %d) serves", slot.number, pid)
        self._ready_bytes = self._ready_bytes[usable:]

    def _reap(self) -> list[tuple[_Slot, str]]:
        """The workers that ended since the last look, each with how (their places are emptied; the clients
        they counted no longer count)."""
        ended = []
        for slot in self.slots:
            if slot.pid is None:
                continue
            try:
                pid, wait_status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:
                pid, wait_status = slot.pid, 0
            if pid == 0:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            if code < 0:
                description = f"was killed by signal {-code} ({signal.Signals(-code).name})"
            else:
                description = f"exited with status {code}"
            self.clients.forget(slot.number - 1)
            ended.append((_Slot(slot.number, slot.pid, slot.started), description))
            slot.pid = None
            slot.ready = False
        return ended

    def _schedule_replacement(self, ended: _Slot, description: str) -> None:
        slot = self.slots[ended.number - 1]
        now = time.monotonic()
        slot.quick_deaths = slot.quick_deaths + 1 if now - ended.started < STABLE else 0
        delay = 0.0 if not slot.quick_deaths else min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (slot.quick_deaths - 1))
        slot.due = now + delay
        when = f" in {delay:g} s" if delay else ""
        log.warning("worker %d (pid %d) %s: replacing it%s", slot.number, ended.pid, description, when)

    # --- Stopping -------------------------------------------------------------------------------------------

    def _stop_all(self) -> None:
        """SIGTERM to every worker, then wait for them all (SIGKILL after ``stop_timeout``)."""
        for slot in self.slots:
            slot.due = None
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout
        while self.worker_pids():
            for slot, description in self._reap():
                if description != "exited with status 0":
                    log.warning("worker %d (pid %d) %s while stopping", slot.number, slot.pid, description)
            remaining = deadline - time.monotonic()
            if not self.worker_pids():
                break
            if remaining <= 0:
                for slot in self.slots:
                    if slot.pid is not None:
                        log.warning("worker %d (pid %d) did not stop within %g s: killing it", slot.number,
                                    slot.pid, self._stop_timeout)  # fmt: skip
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(slot.pid, signal.SIGKILL)
                        with contextlib.suppress(ChildProcessError):
                            os.waitpid(slot.pid, 0)
                        slot.pid = None
                break
            with contextlib.suppress(InterruptedError):
                select.select([self._wake_r], [], [], min(remaining, 0.5))
            self._drain_wakeups()
