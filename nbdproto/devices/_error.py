"""ErrorFilter: make chosen commands fail on purpose, to test how a client handles errors.

Like nbdkit's error filter: each request of a chosen command kind (``read``, ``write``, ``zero``, ``trim``,
``flush``, ``extents``, ``cache``; all by default) fails with ``error`` (an errno: EIO by default; the NBD
protocol carries EPERM, EIO, ENOMEM, EINVAL, ENOSPC and ESHUTDOWN) with probability ``rate`` (1: every time),
before the inner device sees it, so a failed write changes nothing. With ``trigger``, errors are injected
only while that file exists: create it to start failing at a chosen moment, remove it to let the client
recover. Command kinds not chosen go straight to the inner device (reads too, views and sendfile included);
chosen reads are still answered from the inner device's views where it has them, so an error filter that is
armed but not firing costs a plaintext read nothing more than a random draw.

Thread-safe (the random source is one ``random.Random``, whose draws are atomic) and multi-conn safe whenever
the inner device is; capabilities are the inner device's.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Collection, Sequence
from typing import Any

from nbdproto.serving import BlockDevice, Buffer

from ._filter import FILTER_COMMANDS, Filter

__all__ = ["ErrorFilter", "ERROR_COMMANDS", "INJECTABLE_ERRORS"]

ERROR_COMMANDS = FILTER_COMMANDS
"""The command names errors can be injected into, and the device call each one fails."""

INJECTABLE_ERRORS = {name: getattr(errno, name) for name in ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "ESHUTDOWN")}
"""The errors the NBD protocol can report (spec: "Error values"), by name."""


class ErrorFilter(Filter):
    """``inner`` with errors injected into ``commands`` (see the module docstring). ``chance``: the random
    source the rate is drawn from (a ``random.Random`` made with a fixed value gives a repeatable pattern)."""

    def __init__(
        self,
        inner: BlockDevice,
        *,
        error: int = errno.EIO,
        rate: float = 1.0,
        commands: Collection[str] = tuple(ERROR_COMMANDS),
        trigger: str | os.PathLike[str] | None = None,
        chance: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        if error not in INJECTABLE_ERRORS.values():
            raise ValueError(f"error {error} is not one of the NBD errors {', '.join(INJECTABLE_ERRORS)}")
        if not 0 <= rate <= 1:
            raise ValueError(f"rate {rate} must be a probability from 0 to 1")
        unknown = set(commands) - set(ERROR_COMMANDS)
        if unknown:
            raise ValueError(f"no such command {sorted(unknown)[0]!r} (commands: {', '.join(ERROR_COMMANDS)})")
        self.error = error
        self.rate = rate
        self.commands = frozenset(commands)
        self.trigger = os.fspath(trigger) if trigger is not None else None
        self._random = chance if chance is not None else random.Random()
        self._inner_view: Any = getattr(inner, "read_view", None)
        self._pass_through(*(method for command, method in ERROR_COMMANDS.items() if command not in self.commands))

    def _inject(self, command: str) -> None:
        if self.trigger is not None and not os.path.exists(self.trigger):
            return
        if self.rate >= 1 or self._random.random() < self.rate:
            name = errno.errorcode[self.error]
            raise OSError(self.error, f"{os.strerror(self.error)} (error filter: {name} injected into {command})")

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self._inject("read")
        self.inner.pread_into(buffer, offset)

    def read_view(self, offset: int, length: int) -> Any:
        """The inner device's view (None where it has none), or the injected error: a read answered without a
        copy fails like one through pread_into."""
        view = self._inner_view(offset, length) if self._inner_view is not None else None
        if view is not None:
            self._inject("read")
        return view

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        self._inject("write")
        self.inner.pwrite(data, offset, fua)

    def flush(self) -> None:
        self._inject("flush")
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._inject("trim")
        self.inner.trim(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        self._inject("zero")
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def cache(self, offset: int, length: int) -> None:
        self._inject("cache")
        self.inner.cache(offset, length)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        self._inject("extents")
        return self.inner.extents(context, offset, length)
