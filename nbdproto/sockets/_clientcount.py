"""SharedClientCount: the connection policy's counts, shared by the processes that serve one listening socket.

``nbdproto serve --workers N`` forks N processes that accept on one socket, and ``--max-connections`` must mean
what it means for one process: at most that many clients at a time, server-wide, exactly. So the counts live
in shared memory made before the fork (a memfd, or an unlinked temporary file elsewhere), one word per worker
for its open connections plus the total admitted and the last connection number, and every admission checks
and counts under one lock:

- a POSIX record lock on the shared file (fcntl), which excludes the other processes and which the kernel
  releases when a process dies, so a worker killed while it held the lock cannot stop the others;
- and a thread lock, because record locks belong to a process and do not exclude its own threads.

Each worker counts only into its own word, so when a worker dies the supervisor sets that word to zero: its
clients died with it (``forget``). The words are read without the lock to tell how busy each worker is
(``open_connections``).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Iterator

from ._anonymous import anonymous_file

__all__ = ["SharedClientCount"]

_ADMITTED, _NUMBERED, _FIRST_SHARER = 0, 1, 2
_WORD = 8


class SharedClientCount:
    """Counts for ``sharers`` processes (see the module docstring): make it before forking them, then give
    each its ``sharer(index)`` (a ``nbdproto.serving.ClientCount``) as its server's ``clients``."""

    def __init__(self, sharers: int) -> None:
        if sharers < 1:
            raise ValueError(f"sharers {sharers} must be at least 1")
        self.sharers = sharers
        size = _WORD * (_FIRST_SHARER + sharers)
        self._fd = anonymous_file("nbdproto-clients")
        try:
            os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._words = memoryview(self._map).cast("q")
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[memoryview]:
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield self._words
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def sharer(self, index: int) -> _Sharer:
        """The ClientCount of the ``index``-th process (from 0)."""
        if not 0 <= index < self.sharers:
            raise ValueError(f"sharer {index} is not from 0 to {self.sharers - 1}")
        return _Sharer(self, index)

    def forget(self, index: int) -> None:
        """The ``index``-th process is gone, and its connections with it: they no longer count as open."""
        with self._locked() as words:
            words[_FIRST_SHARER + index] = 0

    def open_connections(self) -> list[int]:
        """Each process's open connections (read without the lock: a moment's picture)."""
        return list(self._words[_FIRST_SHARER:])

    def admitted(self) -> int:
        """Clients admitted since the server started, by all the processes."""
        return int(self._words[_ADMITTED])

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self._fd)


class _Sharer:
    """One process's view of a SharedClientCount (nbdproto.serving.ClientCount)."""

    def __init__(self, counts: SharedClientCount, index: int) -> None:
        self._counts = counts
        self._word = _FIRST_SHARER + index
        self.index = index

    def enter(self, refusal: Callable[[int, int], str | None]) -> str | None:
        with self._counts._locked() as words:
            open_connections = sum(words[_FIRST_SHARER:])
            reason = refusal(open_connections, int(words[_ADMITTED]))
            if reason is None:
                words[self._word] += 1
                words[_ADMITTED] += 1
            return reason

    def leave(self) -> None:
        with self._counts._locked() as words:
            if words[self._word] > 0:
                words[self._word] -= 1

    def number(self) -> int:
        with self._counts._locked() as words:
            words[_NUMBERED] += 1
            return int(words[_NUMBERED])

    def busier(self) -> bool:
        """Whether another process has fewer open connections than this one (read without the lock)."""
        words = self._counts._words
        mine = words[self._word]
        return any(words[i] < mine for i in range(_FIRST_SHARER, len(words)) if i != self._word)
