"""ControlServer: the control socket served by blocking threads, beside whatever serves NBD.

A thread accepts; each client gets a thread of its own (at most ``max_clients`` at once: one more is told
``busy`` and closed), which reads request lines and writes each answer before it reads the next. Nothing a
client does stops the server or the other clients:

- a line longer than MAX_LINE is answered ``too-long`` and the connection closed (what follows could not be
  told apart from the rest of the line);
- a line must be whole within ``line_timeout`` seconds of its first byte, and a client that sends nothing for
  ``idle_timeout`` seconds is closed (``too-slow``): a client that connects and stalls holds a thread and a
  descriptor only that long;
- an answer the client does not read within ``line_timeout`` seconds closes the connection;
- anything else wrong is an error answer (``Controller``), and the connection goes on.

It imports no NBD backend: it serves the same whatever serves the exports.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time

from ._commands import Controller
from ._listen import ControlSocket
from ._protocol import MAX_LINE, encode_answer, error_answer

__all__ = ["ControlServer"]

log = logging.getLogger("nbdproto.control")

_ACCEPT_POLL = 0.25  # seconds between looks at whether the server is stopping, while accepting
_EMFILE_PAUSE = 0.1
_LINGER = 0.5  # seconds a connection being closed with an error is read and dropped, so the answer arrives
_LINGER_BYTES = 4 << 20


class ControlServer:
    """Serves ``controller`` on ``listening`` (see the module docstring) from ``start()`` until ``close()``."""

    def __init__(
        self,
        listening: ControlSocket,
        controller: Controller,
        *,
        line_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        max_clients: int = 16,
    ) -> None:
        self.listening = listening
        self.controller = controller
        self.line_timeout = line_timeout
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.listening.path

    def start(self) -> None:
        self.listening.sock.settimeout(_ACCEPT_POLL)
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, end every client's connection, remove the socket's file."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(_ACCEPT_POLL * 4 + 1)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        self.listening.close()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        sock = self.listening.sock
        while not self._stopping.is_set():
            try:
                client, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("control socket: cannot accept a client: %s", exc.strerror)
                    self._stopping.wait(_EMFILE_PAUSE)
                    continue
                log.error("control socket %s stopped accepting: %s", self.path, exc)
                return
            with self._lock:
                busy = len(self._clients) >= self.max_clients
                if not busy:
                    self._clients.add(client)
            if busy:
                message = f"{self.max_clients} control clients are connected already"
                self._say_and_close(client, error_answer("busy", message))
                continue
            threading.Thread(target=self._serve_client, args=(client,), name="nbd-control-client", daemon=True).start()

    def _say_and_close(self, client: socket.socket, answer: dict[str, object]) -> None:
        """Send ``answer`` and close. What the client is still sending is read and dropped for a moment first
        (at most _LINGER_BYTES, _LINGER seconds): a socket closed with bytes unread resets the connection, and
        the client would get that instead of the answer."""
        with contextlib.suppress(OSError):
            client.settimeout(self.line_timeout)
            client.sendall(encode_answer(answer))
            client.shutdown(socket.SHUT_WR)
            deadline, dropped = time.monotonic() + _LINGER, 0
            while dropped < _LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                client.settimeout(left)
                data = client.recv(65536)
                if not data:
                    break
                dropped += len(data)
        client.close()

    def _serve_client(self, client: socket.socket) -> None:
        try:
            self._converse(client)
        except OSError as exc:  # the client went away, or stopped reading its answers
            log.debug("control client gone: %s", exc)
        except Exception:  # a bug: logged, and this connection ends; the server goes on
            log.exception("control client failed")
        finally:
            with self._lock:
                self._clients.discard(client)
            client.close()

    def _converse(self, client: socket.socket) -> None:
        pending = bytearray()
        started: float | None = None  # when the first byte of the line now arriving came
        while not self._stopping.is_set():
            newline = pending.find(b"\n")
            if newline >= 0:
                line = bytes(pending[:newline]).rstrip(b"\r")
                del pending[: newline + 1]
                started = time.monotonic() if pending else None
                if line.strip():
                    client.settimeout(self.line_timeout)
                    client.sendall(self.controller.handle_line(line))
                continue
            if len(pending) > MAX_LINE:
                self._say_and_close(client, error_answer("too-long", f"a request line holds at most {MAX_LINE} bytes"))
                return
            wait = self.idle_timeout if started is None else started + self.line_timeout - time.monotonic()
            if wait <= 0:
                self._too_slow(client, started)
                return
            client.settimeout(wait)
            try:
                data = client.recv(MAX_LINE + 2 - len(pending))
            except TimeoutError:
                self._too_slow(client, started)
                return
            if not data:
                return
            if started is None:
                started = time.monotonic()
            pending += data

    def _too_slow(self, client: socket.socket, started: float | None) -> None:
        if started is None:
            message = f"nothing was asked for {self.idle_timeout:g} s"
        else:
            message = f"the rest of the line did not arrive within {self.line_timeout:g} s"
        self._say_and_close(client, error_answer("too-slow", message))
