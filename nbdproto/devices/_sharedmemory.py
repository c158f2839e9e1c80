"""SharedMemoryDevice: a sparse in-memory disk that several processes serve at once.

``nbdproto serve --workers N memory:SIZE`` runs N processes that must all see one disk: a MemoryDevice's pages
live in one process's heap, so its writes would be seen by the connections of that process alone. This device
is a FileDevice over shared memory made before the processes fork (a memfd on Linux, an unlinked temporary
file elsewhere): every process that inherits it maps and writes the same pages, so a write acknowledged by one
is read by all, and multi-conn holds across processes.

It keeps a MemoryDevice's nature where it matters: the memory is sparse (only written pages cost memory,
``allocated`` says how much), trim and zeroing punch holes that free it, and block status reports the holes
(SEEK_DATA / SEEK_HOLE work on a memfd as on tmpfs). Reads are preads, which leave holes unallocated
(FileDevice's views would fill them: see its docstring).
Like a file on tmpfs, a write-zeroes that must not leave a hole (NBD_CMD_FLAG_NO_HOLE) writes zeroes, and so
cannot be fast. Flush has nothing to do. The memory is freed when the last process holding it closes it.
"""

from __future__ import annotations

import os
import sys

from nbdproto.sockets import anonymous_file

from ._file import FileDevice

__all__ = ["SharedMemoryDevice"]


class SharedMemoryDevice(FileDevice):
    """A sparse, writable in-memory device of ``size`` bytes that forked processes share (see the module
    docstring); ``name`` shows in /proc/PID/fd and /proc/PID/maps. OSError when the memory cannot be made."""

    def __init__(self, size: int, *, name: str = "nbdproto-memory") -> None:
        if size < 0:
            raise ValueError(f"size {size} is negative")
        self.path = f"memfd:{name}" if sys.platform.startswith("linux") else name
        fd = anonymous_file(name)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._adopt(fd, read_only=False)

    @property
    def allocated(self) -> int:
        """Bytes of memory the written pages hold (what the device really costs)."""
        return os.fstat(self.fileno()).st_blocks * 512
