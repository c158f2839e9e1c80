"""The blocking NBD server: listens (TCP or unix socket), maps export names to devices (or asks a resolver), and
runs a session per connection (``_session.ServerSession``) in its own thread, until ``shutdown()``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

import nbdproto
import nbdproto.serving
import nbdproto.tls
from nbdproto.sockets import AcceptBackoff, client_info, listen_socket

from ._session import PEER_ERRORS, ServerSession, SharedBudget, WaitingShare, log

__all__ = ["Server"]

SHARED_ACCEPT_WAKE = 0.5
"""Seconds an accept on a listening socket that other processes share waits at most before it looks whether
the server is stopping: such a socket cannot be shut down to wake the accept (that would stop every process
accepting on it), so it waits with SO_RCVTIMEO and stays a blocking accept, which the kernel hands each new
connection to one waiter at a time, in turn."""
_NO_WAKE = struct.pack("ll", 0, 0)


class Server(nbdproto.serving.ServerCore):
    """Serves exports to many clients at once: a thread per connection, until ``shutdown()``.

    ``exports``, ``tls``, ``tls_mode``, ``list_exports``, ``limits``, ``policy``: as nbdproto.serving.ServerCore says.
    ``listen`` is a ``(host, port)`` pair, a unix socket path, an already bound and listening socket, or
    several such sockets (all served alike: those socket activation passed, say); ``workers`` and ``poll``
    as for ServerSession. ``shared_sockets``: other processes accept on the same listening sockets (forked
    servers, ``nbdproto serve --workers``): stopping then closes this process's sockets without shutting them
    down, and an accept looks every SHARED_ACCEPT_WAKE seconds whether to stop.
    """

    logger = log
    peer_errors = PEER_ERRORS
    clock = staticmethod(time.monotonic)

    def __init__(
        self,
        exports: Mapping[str, nbdproto.BlockDevice | nbdproto.ExportSpec[Any]] | nbdproto.serving.Resolver,
        listen: tuple[str, int] | str | socket.socket | Sequence[socket.socket] = ("127.0.0.1", nbdproto.DEFAULT_PORT),
        *,
        workers: int | None = None,
        poll: float = 0.0,
        shared_sockets: bool = False,
        **options: Unpack[nbdproto.serving.ServerOptions],
    ) -> None:
        super().__init__(exports, **options)
        self._shared = shared_sockets
        self._workers = workers
        self._poll = poll
        self._memory = SharedBudget(self.limits.memory_limit)
        if isinstance(listen, socket.socket):
            self.sockets = [listen]
        elif isinstance(listen, (str, tuple)):
            self.sockets = [listen_socket(listen)]
        else:
            self.sockets = list(listen)
        if not self.sockets:
            raise ValueError("a server needs a socket to listen on")
        self.sock = self.sockets[0]
        if shared_sockets:
            wake = struct.pack("ll", int(SHARED_ACCEPT_WAKE), int(SHARED_ACCEPT_WAKE % 1 * 1e6))
            for sock in self.sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wake)
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._accepting = threading.Event()
        self._accepting.set()

    @property
    def address(self) -> Any:
        """What the (first) listening socket is bound to: (host, port) or the unix socket path."""
        return self.sock.getsockname()

    def serve_forever(self) -> None:
        """Accept and serve connections on every listening socket until shutdown() is called (or, for a
        oneshot policy, its client is gone). Running out of file descriptors (or of kernel memory for sockets)
        does not end it: it says so once, waits for some to be freed, and goes on; established connections are
        never dropped because an accept failed."""
        others = [threading.Thread(target=self._accept_on, args=(sock,), daemon=True) for sock in self.sockets[1:]]
        for thread in others:
            thread.start()
        self._accept_on(self.sock)
        for thread in others:
            thread.join()

    def _accept_on(self, sock: socket.socket) -> None:
        backoff = AcceptBackoff(log)
        stopped = threading.Event()
        while self._accepting.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if not self._accepting.is_set():
                    break
                stopped.wait(backoff.delay_after(exc))
                continue
            backoff.accepted()
            if self._shared:
                if not self._accepting.is_set():  # the accept outlived the stop: the server is ending
                    conn.close()
                    break
                with contextlib.suppress(OSError):  # the listener's wake-up was inherited: not for the connection
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_WAKE)
            thread = threading.Thread(target=self._serve_one, args=(conn,), daemon=True)
            with self._lock:
                self._threads.add(thread)
            try:
                thread.start()
            except RuntimeError as exc:  # no memory for another thread: refuse this client, keep serving
                with self._lock:
                    self._threads.discard(thread)
                conn.close()
                self.log.refused("?", f"cannot start a thread: {exc}")

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            client = client_info(conn)
            with self._lock:  # accept loops on several sockets admit clients at once
                admitted = self.admit(client)
            if not admitted:
                conn.close()
                return
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            share = WaitingShare(self._memory)
            session = ServerSession(
                conn, self.settings, workers=self._workers, poll=self._poll, share=share, log=self.log, client=client
            )
            with self.serving(session, client), session:
                spec = self.spec_for(session.negotiate(), client)
                if spec is not None:
                    session.serve(spec)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def stop_accepting(self) -> None:
        """Stop accepting: every accept loop ends, and serve_forever returns (shutdown() ends the sessions)."""
        self._accepting.clear()
        for sock in self.sockets:
            if not self._shared:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
            sock.close()

    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting; let in-flight requests finish within ``grace`` seconds (ServerLimits.shutdown_grace
        by default), answering new ones with ESHUTDOWN; then close every connection, flushing every device."""
        grace = self.limits.shutdown_grace if grace is None else grace
        self.stop_accepting()
        self.stop_sessions()
        deadline = time.monotonic() + grace
        for thread in self._live_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        for session in list(self.sessions):
            session.abort()
        for thread in self._live_threads():
            thread.join(5.0)

    def _live_threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
