"""The copy's event loop: one thread driving every NBD connection's sans-IO engine over non-blocking sockets
(``selectors``), and running the completions that local I/O in worker threads hands back (see ``_copy``)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import nbdproto
from nbdproto import NBDError
from nbdproto.sockets import step_past

from ._client import Connection

if TYPE_CHECKING:
    import concurrent.futures

__all__ = ["REQUEST_SIZE", "RECV_SIZE", "Done", "CopyConnection", "CopyLoop", "checked"]

REQUEST_SIZE = 1 << 20
"""Bytes per request: large enough that Python's per-request cost vanishes, within every server's limit."""
RECV_SIZE = 16 << 10
"""Bytes asked of each recv outside read data (reply headers, block status, write acknowledgements)."""

Done = Callable[[], None]
"""Called back in the copy's thread when an operation an end started has completed."""

# --- The event loop ---------------------------------------------------------------------------------------


class CopyConnection:
    """One NBD connection of the copy: a non-blocking socket, its engine, and what is queued to send."""

    def __init__(self, connection: Connection) -> None:
        self.sock = connection.stream.sock
        self.sock.setblocking(False)
        self.tls = isinstance(self.sock, ssl.SSLSocket)
        self.engine = connection.engine
        self.export: nbdproto.Export = connection.result.export
        self.out: list[Any] = []
        self.callbacks: dict[int, Callable[[Any], None]] = {}
        self.sent_at: dict[int, float] = {}  # in the order sent: the first is the oldest request waiting
        self._cookies = itertools.count(1)
        self.writing = False  # registered for EVENT_WRITE
        self.discard = False  # read data is dropped in the kernel (``discard_reads``)

    def discard_reads(self) -> None:
        """Read data is not wanted (the copy goes to ``null:``): on a plaintext socket the kernel drops it
        without copying it out (recv with MSG_TRUNC, which TCP and unix stream sockets take to mean "discard"),
        and the read buffers are left as they were. The copy then spends its CPU on nothing else, which leaves
        the server more of a shared machine."""
        self.discard = not self.tls and hasattr(socket, "MSG_TRUNC")

    def request(self, make: Callable[[int], Any], done: Callable[[Any], None]) -> None:
        """Queue the request ``make(cookie)``; ``done(reply)`` runs when its reply is in."""
        cookie = next(self._cookies)
        self.engine.send(make(cookie))
        self.out += self.engine.data_to_send()
        self.callbacks[cookie] = done
        self.sent_at[cookie] = time.monotonic()

    def oldest(self) -> float | None:
        """When the oldest request still waiting for its reply was sent (None: none is waiting)."""
        return next(iter(self.sent_at.values()), None)

    def flush(self) -> None:
        """Send what the socket takes now; the rest stays queued."""
        out = self.out
        try:
            while out:
                if self.tls:
                    sent = self.sock.send(b"".join(out) if len(out) > 1 else out[0])
                else:
                    sent = self.sock.sendmsg(out[:1024])
                del out[: step_past(out, 0, sent)]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass

    def receive(self) -> None:
        """Take in what has arrived (read data straight into its buffer) and run the callbacks of the replies."""
        engine, sock = self.engine, self.sock
        while True:
            target = engine.read_buffer()
            try:
                if target is not None:
                    count = sock.recv_into(target, 0, socket.MSG_TRUNC) if self.discard else sock.recv_into(target)
                    engine.received_into(count)
                    short = count < len(target)
                else:
                    data = sock.recv(RECV_SIZE)
                    engine.receive_data(data)
                    short = len(data) < RECV_SIZE
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            while True:
                event = engine.next_event()
                if event is nbdproto.NEED_DATA or event is nbdproto.PAUSED:
                    break
                if isinstance(event, nbdproto.ConnectionClosed):
                    raise ConnectionError("the server closed the connection")
                del self.sent_at[event.cookie]  # type: ignore[union-attr]
                self.callbacks.pop(event.cookie)(event)  # type: ignore[union-attr]
            if short and not self.tls:
                return  # the socket had no more for now; a TLS socket may still hold decrypted bytes

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close, ignoring a server that is already gone. A copy cut short (its
        requests still in flight: an error, Ctrl-C) closes without it: the replies will not be read, and the
        server need not finish them first."""
        try:
            if self.engine.phase is nbdproto.Phase.TRANSMISSION and not self.callbacks:
                self.engine.send(nbdproto.DisconnectRequest())
                self.sock.setblocking(True)
                self.sock.settimeout(5)
                self.out += self.engine.data_to_send()
                self.sock.sendall(b"".join(bytes(piece) for piece in self.out))
        except (OSError, nbdproto.ProtocolError):
            pass
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class CopyLoop:
    """Waits for any connection to be readable (or writable, while it has bytes queued) and serves it, and runs
    the completions that file I/O in worker threads hands back (``from_thread``)."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        """Seconds a request may wait for its reply before the copy ends with TimeoutError (None: no limit)."""
        self.selector = selectors.DefaultSelector()
        self._completions: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)  # a full pipe already holds a wake-up: never wait on it
        self.selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._wake_lock = threading.Lock()
        self._closed = False
        """Set by close() under the lock: work still running after a close(wait=False) must not write to the
        wake pipe then, whose descriptor may already belong to another file."""
        self.workers: concurrent.futures.ThreadPoolExecutor | None = None
        self.worker_count = 1
        """Threads for local file I/O, raised by files on disks: I/O that waits gains from overlapping. Files in
        memory (tmpfs) want one: their writes serialize on the inode lock anyway, and threads contending for it
        only slow a copy down (bench/bench_copy.sh)."""

    def in_thread(self, work: Callable[[], None], done: Done) -> None:
        """Run blocking ``work`` in a worker thread (the GIL is let go in its system calls, so local file I/O
        overlaps with the network), then ``done`` back in the loop; an exception from work raises there."""
        if self.workers is None:
            import concurrent.futures  # only a copy with a local file needs the pool (and its start-up time)

            self.workers = concurrent.futures.ThreadPoolExecutor(self.worker_count, thread_name_prefix="nbd-copy-file")

        def finished(future: concurrent.futures.Future[None]) -> None:
            if future.cancelled():  # dropped by close(wait=False): nobody waits for it
                return
            failure = future.exception()
            self._completions.put(done if failure is None else functools.partial(_reraise, failure))
            with self._wake_lock:
                if not self._closed:
                    with contextlib.suppress(BlockingIOError):
                        os.write(self._wake_write, b"x")

        self.workers.submit(work).add_done_callback(finished)

    def add(self, connection: CopyConnection) -> None:
        self.selector.register(connection.sock, selectors.EVENT_READ, connection)

    def step(self) -> None:
        for key in list(self.selector.get_map().values()):
            connection: CopyConnection | None = key.data
            if connection is None:
                continue
            if connection.out:
                connection.flush()
            if bool(connection.out) != connection.writing:
                connection.writing = bool(connection.out)
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.writing else 0)
                self.selector.modify(connection.sock, events, connection)
        ready = self.selector.select(self._wait())
        if self.timeout is not None and not ready and self._wait() == 0:
            raise TimeoutError(f"timed out: a request got no reply within {self.timeout} s")
        for key, mask in ready:
            connection = key.data
            if connection is None:
                self._run_completions()
                continue
            if mask & selectors.EVENT_READ:
                connection.receive()
            if mask & selectors.EVENT_WRITE:
                connection.flush()

    def _wait(self) -> float | None:
        """How long the next select may wait: until the oldest request waiting for a reply is out of time
        (nothing but local file I/O outstanding: as long as it takes)."""
        if self.timeout is None:
            return None
        sent: list[float] = []
        for key in self.selector.get_map().values():
            when = key.data.oldest() if key.data is not None else None
            if when is not None:
                sent.append(when)
        if not sent:
            return None
        return max(0.0, min(sent) + self.timeout - time.monotonic())

    def wait(self, finished: Callable[[], bool]) -> None:
        while not finished():
            self.step()

    def _run_completions(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while not self._completions.empty():
            self._completions.get()()

    def close(self, wait: bool = True) -> None:
        """Stop the worker threads (``wait``: for the work they have; else only what has not started is dropped,
        so that a copy that failed or was interrupted does not wait on a read of standard input)."""
        if self.workers is not None:
            self.workers.shutdown(wait=wait, cancel_futures=not wait)
        self.selector.close()
        with self._wake_lock:
            self._closed = True
            os.close(self._wake_read)
            os.close(self._wake_write)


def _reraise(failure: BaseException) -> None:
    raise failure


def checked(done: Done) -> Callable[[Any], None]:
    def reply(event: Any) -> None:
        if isinstance(event, nbdproto.ErrorReply):
            raise NBDError(int(event.error), event.message or os.strerror(int(event.error)))
        done()

    return reply
