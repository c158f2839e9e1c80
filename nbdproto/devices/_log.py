"""LogFilter: one line per request and one per reply, to see what a client did.

Like nbdkit's log filter, in a format close to its own: every line starts with the local time and the
connection, then the command; the request line gives the request's id (unique in the log, to pair it with its
reply), offset, length and flags, the reply line the result (``ok`` or the errno's name) and the latency (the
seconds the inner device took)::

    2026-11-25 10:00:00.123456 connection=1 Write id=7 offset=0x1000 length=0x200 flags=fua
    2026-11-25 10:00:00.123501 connection=1 ...Write id=7 result=ok latency=0.000045

Requests of several connections (and several of one connection) may be in flight together, so lines of
different requests interleave; the id pairs them up.

The connection: a device does not see connections, only calls. The log takes the number from
``nbdproto.serving.current_connection``, a context variable both servers set for each connection in the thread or task
that serves it (their worker threads run in a copy of that context). Code that serves connections some other
way may call ``nbdproto.serving.enter_connection()``; where nobody did, the filter numbers the context it is called
in the first time it sees it.

Thread-safe: lines are written whole, under a lock, line-buffered (each line is in the file as soon as it is
logged). Capabilities, multi-conn safety and dispatch are the inner device's: a line is a write into the page
cache, which blocks no more than the memory copies of a device that servers already call inline.
"""

from __future__ import annotations

import datetime
import errno
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, TypeVar

from nbdproto.serving import BlockDevice, Buffer, current_connection, enter_connection

from ._filter import Filter

__all__ = ["LogFilter"]

T = TypeVar("T")


def _connection() -> int:
    return current_connection.get() or enter_connection()


class LogFilter(Filter):
    """``inner``, with every request and reply logged to ``file`` (a path, truncated unless ``append``, or an
    open text stream, which stays the caller's). ``export``, when given, is named on every line (for several
    exports logging to one file)."""

    def __init__(
        self,
        inner: BlockDevice,
        file: str | os.PathLike[str] | IO[str],
        *,
        append: bool = False,
        export: str | None = None,
    ) -> None:
        super().__init__(inner)
        if isinstance(file, (str, os.PathLike)):
            self._file: IO[str] = open(file, "a" if append else "w", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._owns_file = True
        else:
            self._file, self._owns_file = file, False
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._where = f" export={export!r}" if export is not None else ""

    def _line(self, connection: int, text: str) -> None:
        now = datetime.datetime.now().isoformat(" ", "microseconds")
        line = f"{now} connection={connection}{self._where} {text}\n"
        with self._lock:
            self._file.write(line)
            if not self._owns_file:
                self._file.flush()

    def _logged(
        self, command: str, details: str, call: Callable[[], T], summary: Callable[[T], str] | None = None
    ) -> T:
        connection, request = _connection(), next(self._ids)
        self._line(connection, f"{command} id={request}{details}")
        start = time.perf_counter()
        try:
            result = call()
        except BaseException as exc:
            latency = time.perf_counter() - start
            self._line(connection, f"...{command} id={request} result={_result(exc)} latency={latency:.6f}")
            raise
        latency = time.perf_counter() - start
        extra = f" {summary(result)}" if summary is not None else ""
        self._line(connection, f"...{command} id={request} result=ok latency={latency:.6f}{extra}")
        return result

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self._logged("Read", _range(offset, len(buffer)), lambda: self.inner.pread_into(buffer, offset))

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        details = _range(offset, memoryview(data).nbytes) + _flags(fua=fua)
        self._logged("Write", details, lambda: self.inner.pwrite(data, offset, fua))

    def flush(self) -> None:
        self._logged("Flush", "", self.inner.flush)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._logged("Trim", _range(offset, length) + _flags(fua=fua), lambda: self.inner.trim(offset, length, fua))

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        details = _range(offset, length) + _flags(fua=fua, no_hole=not may_trim, fast_zero=fast)
        zero = self.inner.write_zeroes
        self._logged("Zero", details, lambda: zero(offset, length, may_trim=may_trim, fast=fast, fua=fua))

    def cache(self, offset: int, length: int) -> None:
        self._logged("Cache", _range(offset, length), lambda: self.inner.cache(offset, length))

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return self._logged(
            "Extents",
            f"{_range(offset, length)} context={context}",
            lambda: self.inner.extents(context, offset, length),
            lambda runs: f"extents={len(runs)}",
        )

    def resize(self, size: int) -> None:
        self._logged("Resize", f" size={size:#x}", lambda: super(LogFilter, self).resize(size))

    def close(self) -> None:
        try:
            if self._owns_file:
                self._file.close()
        finally:
            self.inner.close()


def _range(offset: int, length: int) -> str:
    return f" offset={offset:#x} length={length:#x}"


def _flags(**flags: bool) -> str:
    names = [name for name, on in flags.items() if on]
    return f" flags={'|'.join(names) if names else 'none'}"


def _result(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return f"EIO({type(exc).__name__})"
