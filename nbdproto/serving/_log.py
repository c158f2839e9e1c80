"""What a server says about its connections, shared by both backends: one line per event, at a level that says
whose fault it was, tracebacks only for our own bugs, and repeated lines counted and rate-limited.

A client that breaks the protocol, resets the connection or stalls is the client's business: one line at INFO
or WARNING naming the peer and the reason. Anything else that ends a connection is a bug in the server or a
device (ERROR, with the traceback). A flood of bad clients must not become a flood of log lines: each kind of
line is written at most ``burst`` times per ``interval`` seconds, and the next one after a quiet spell says how
many were held back. The clock is the backend's to give (this package reads none).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

from nbdproto.wire import RemoteProtocolError

__all__ = ["ConnectionLog"]


class _Limit:
    __slots__ = ("start", "count", "held")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.held = 0


class ConnectionLog:
    """Logs a server's connection events to ``logger`` (see the module docstring).

    ``peer_errors`` are the exception types by which the backend's I/O says the peer went away or broke the
    connection (ConnectionError, ssl.SSLError, TimeoutError, the event loop's own); they and nbdproto's
    RemoteProtocolError are the client's doing. ``clock`` returns seconds (time.monotonic).
    """

    def __init__(
        self,
        logger: logging.Logger,
        clock: Callable[[], float],
        peer_errors: tuple[type[BaseException], ...],
        *,
        burst: int = 10,
        interval: float = 60.0,
    ) -> None:
        self.logger = logger
        self._clock = clock
        self._peer_errors = peer_errors
        self._burst = burst
        self._interval = interval
        self._limits: dict[str, _Limit] = {}

    def _emit(self, kind: str, level: int, message: str, *args: Any, exc: BaseException | None = None) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        limit = self._limits.get(kind)
        if limit is None or now - limit.start >= self._interval:
            held = limit.held if limit is not None else 0
            limit = self._limits[kind] = _Limit(now)
            if held:
                self.logger.log(level, "(%d more %s lines were held back)", held, kind)
        limit.count += 1
        if limit.count > self._burst:
            limit.held += 1
            return
        self.logger.log(level, message, *args, exc_info=exc)

    def chose(self, peer: object, name: str) -> None:
        """The client chose an export; a ClientInfo's credentials (certificate subject, PSK identity) are named."""
        credentials = getattr(peer, "credentials", "")
        if credentials:
            self._emit("export", logging.INFO, "client %s (%s) uses export %r", peer, credentials, name)
        else:
            self._emit("export", logging.INFO, "client %s uses export %r", peer, name)

    def aborted(self, peer: object) -> None:
        self._emit("abort", logging.INFO, "client %s aborted the handshake", peer)

    def refused(self, peer: object, reason: str) -> None:
        """A connection turned away by policy before or during the handshake."""
        self._emit("refused", logging.WARNING, "client %s refused: %s", peer, reason)

    def ended(self, peer: object, failure: BaseException | None) -> None:
        """The connection to ``peer`` ended, cleanly (``failure`` None) or because of ``failure``."""
        if failure is None:
            self._emit("disconnect", logging.INFO, "client %s disconnected", peer)
            return
        cause = _unwrap(failure)
        if isinstance(cause, RemoteProtocolError):
            self._emit("protocol", logging.WARNING, "client %s broke the protocol: %s", peer, cause)
        elif isinstance(cause, TimeoutError):
            self._emit("timeout", logging.WARNING, "client %s timed out: %s", peer, str(cause) or "no progress")
        elif isinstance(cause, self._peer_errors):
            reason = str(cause) or type(cause).__name__
            self._emit("connection", logging.INFO, "client %s: connection ended: %s", peer, reason)
        else:
            self._emit("bug", logging.ERROR, "client %s: server error", peer, exc=cause)

    def flush_failed(self, peer: object, export: str, failure: OSError) -> None:
        """The flush as ``peer``'s connection to ``export`` ended failed: one line with the errno's name and
        the device's message (which names the remote, for remote devices), never a traceback: a remote that
        stalls or goes away is not a bug of ours."""
        code = errno.errorcode.get(failure.errno, str(failure.errno)) if failure.errno else type(failure).__name__
        self._emit(
            "flush",
            logging.WARNING,
            "client %s: flushing export %r as the connection ended failed: %s: %s",
            peer,
            export,
            code,
            failure.strerror or str(failure),
        )

    def device_failed(self, request: object, failure: BaseException, peer: object = None) -> None:
        """A device call failed for ``request`` (of client ``peer``). An OSError is the device's report: one
        WARNING line with the errno's name and the whole detail, which the client is not told (it gets the
        errno's text alone: nbdproto.serving.error_reply_for), never a traceback. Anything else is a bug in the
        device (the client got EIO): ERROR, with the traceback."""
        who = f"client {peer}: " if peer is not None else ""
        if isinstance(failure, OSError):
            code = errno.errorcode.get(failure.errno, str(failure.errno)) if failure.errno else type(failure).__name__
            detail = failure.strerror or str(failure)
            if failure.filename is not None:
                detail = f"{detail}: {failure.filename}"
            self._emit("device", logging.WARNING, "%s%s failed: %s: %s", who, _described(request), code, detail)
            return
        self._emit("device", logging.ERROR, "%sdevice failed on %s", who, _described(request), exc=failure)


def _described(request: object) -> str:
    """A request as a log line names it: the command, its length and offset (never a write's data)."""
    name = type(request).__name__.removesuffix("Request").upper() or "REQUEST"
    offset, length = getattr(request, "offset", None), getattr(request, "length", None)
    if length is None and hasattr(request, "data"):
        length = len(request.data)
    if offset is None:
        return name
    return f"{name} of {length} bytes at {offset}" if length is not None else f"{name} at {offset}"


def _unwrap(failure: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of a single failure, else the failure itself."""
    # Duck-typed: on Python 3.10 the event loops' groups come from the exceptiongroup backport.
    while True:
        inner = getattr(failure, "exceptions", None)
        if not (isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], BaseException)):
            return failure
        failure = inner[0]
