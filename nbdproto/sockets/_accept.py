"""What a server's accept loop does when accept() fails, for both backends: no sleeping here, only the rules.

A failed accept must never end a server: a client that gave up before it was accepted is simply gone; running
out of file descriptors or socket memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) passes when connections close, so
the loop says so once, waits a little longer each time (10 ms doubling to 1 s), and tries again, and says so
again when accepting works. Anything else is a real error (the listening socket was closed, say).
"""

from __future__ import annotations

import errno
import logging

__all__ = ["AcceptBackoff"]

_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.EPERM})
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class AcceptBackoff:
    """The accept loop's memory of a failing spell. ``delay_after(exc)``: seconds to wait before accepting
    again (0 for a client that vanished), or the exception re-raised when it is not a passing condition;
    ``accepted()`` after each success."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self.delay = 0.0

    def delay_after(self, exc: OSError) -> float:
        if exc.errno in _GONE:
            return 0.0
        if exc.errno not in _EXHAUSTED:
            raise exc
        if not self.delay:
            self._log.warning("cannot accept connections: %s; retrying until resources are freed", exc.strerror)
        self.delay = min(1.0, max(0.01, self.delay * 2))
        return self.delay

    def accepted(self) -> None:
        if self.delay:
            self._log.warning("accepting connections again")
            self.delay = 0.0
