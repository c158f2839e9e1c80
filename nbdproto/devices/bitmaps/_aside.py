"""Where a backup view keeps the blocks it copied aside before the live export overwrote them.

A checkpoint's view (``_view.BackupView``) reads the export as it was at the checkpoint: granules nobody has
written since are read from the export itself, and a granule about to be overwritten is first copied aside
(copy-before-write) into one of these stores, one record per granule, read back from there from then on. What
is kept is transient: a view ends with its server, so nothing here needs to survive a crash, and nothing is
synced.

- ``MemoryAside``: in the server's memory (small exports: every granule of a 64 MiB export fits);
- ``ScratchFileAside``: one scratch file, never visible under any name (``O_TMPFILE``; where the file system
  lacks it, a random name created with ``O_EXCL | O_NOFOLLOW``, mode 0600, and unlinked at once), so that
  nothing in the directory is ever followed, replaced or left behind;
- ``ObjectAside``: objects under an S3 image's key, ``KEY/views/NAME/%016x`` (the image's own objects,
  ``KEY/%016x``, never collide with these, and S3Device passes them over); deleted when the view ends, and
  any a crash left behind when a view of that name starts again.

``aside_store_for`` picks one for a device as the command line does. A view bounds what it keeps (its limit)
and reports it; a store only keeps and gives back.
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from nbdproto.devices import FileDevice, MemoryDevice, S3Device, SharedMemoryDevice
from nbdproto.serving import BlockDevice, Buffer, Dispatch

from ._sidecar import in_memory_filesystem
from ._where import is_block_device, source_of

__all__ = [
    "AsideStore",
    "MemoryAside",
    "ScratchFileAside",
    "ObjectAside",
    "aside_store_for",
    "SMALL_EXPORT",
]

SMALL_EXPORT = 64 << 20
"""Exports up to this size keep their views' copies in memory (all of it fits); larger ones in a scratch file,
or as objects for S3 images."""


class AsideStore(Protocol):
    """The granules one view copied aside, by granule index. Thread-safe; ``close`` frees everything."""

    @property
    def where(self) -> str:
        """Where the copies are, for ``status`` (memory, a directory, an s3 prefix)."""

    @property
    def dispatch(self) -> Dispatch:
        """How long a put or a read may take: "inline" where they never wait on a disk or network."""

    def put(self, index: int, data: Buffer) -> None:
        """Keep ``data`` (granule ``index``, whole: the last granule of a disk may be shorter) until ``close``.
        OSError when it cannot be kept (a full disk): the view that asked then breaks."""

    def read_into(self, index: int, start: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes of granule ``index`` from ``start`` on (a granule ``put`` gave)."""

    def close(self) -> None:
        """Free every copy."""


class MemoryAside:
    """Copies kept in memory."""

    where = "memory"
    dispatch: Dispatch = "inline"

    def __init__(self) -> None:
        self._blocks: dict[int, bytes] = {}

    def put(self, index: int, data: Buffer) -> None:
        self._blocks[index] = bytes(data)

    def read_into(self, index: int, start: int, buffer: memoryview) -> None:
        buffer[:] = self._blocks[index][start : start + len(buffer)]

    def close(self) -> None:
        self._blocks.clear()


class ScratchFileAside:
    """Copies kept in a scratch file in ``directory``, granule ``i`` in the i-th slot filled (module docstring).
    OSError when no file can be made there."""

    def __init__(self, directory: str | os.PathLike[str], granularity: int) -> None:
        self.where = os.fspath(directory)
        self._granularity = granularity
        self._fd = _scratch_file(self.where)
        self.dispatch: Dispatch = "inline" if in_memory_filesystem(self._fd) else "batch"
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()

    def put(self, index: int, data: Buffer) -> None:
        # A view puts each granule once, and reads it only after the put returned.
        with self._lock:
            if self._fd < 0:
                raise OSError(errno.EBADF, "the scratch file was closed")
            slot = self._slots.setdefault(index, len(self._slots))
        view = memoryview(data).cast("B")
        position = slot * self._granularity
        while view:
            written = os.pwrite(self._fd, view, position)
            view, position = view[written:], position + written

    def read_into(self, index: int, start: int, buffer: memoryview) -> None:
        position = self._slots[index] * self._granularity + start
        while buffer:
            count = os.preadv(self._fd, [buffer], position)
            if not count:
                raise OSError(errno.EIO, f"the scratch file in {self.where} is shorter than what was put there")
            buffer, position = buffer[count:], position + count

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._slots.clear()


def _scratch_file(directory: str) -> int:
    """A new file in ``directory`` that no name reaches (module docstring)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(directory, flags | tmpfile, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        name = f".nbdproto-scratch-{secrets.token_hex(8)}"
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent)
        os.unlink(name, dir_fd=parent)
        return fd
    finally:
        os.close(parent)


class Bucket(Protocol):
    """The calls of S3Device's ``object_store`` this store makes."""

    def put(self, name: str, data: Any) -> None: ...

    def get_range(self, name: str, start: int, end: int) -> tuple[Any, int] | None: ...

    def delete(self, names: Sequence[str]) -> None: ...

    def list(self, prefix: str) -> Iterator[tuple[str, int]]: ...


class ObjectAside:
    """Copies kept as objects ``PREFIX%016x`` in ``bucket`` (S3Device's ``object_store``); what an earlier run
    left under ``prefix`` is deleted first."""

    dispatch: Dispatch = "threads"

    def __init__(self, bucket: Bucket, prefix: str) -> None:
        self._bucket = bucket
        self.where = prefix
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._delete([name for name, _ in bucket.list(prefix)])

    def _name(self, index: int) -> str:
        return f"{self.where}{index:016x}"

    def put(self, index: int, data: Buffer) -> None:
        name = self._name(index)
        self._bucket.put(name, bytes(data))
        with self._lock:
            self._names.add(name)

    def read_into(self, index: int, start: int, buffer: memoryview) -> None:
        name = self._name(index)
        got = self._bucket.get_range(name, start, start + len(buffer))
        if got is None or len(got[0]) != len(buffer):
            raise OSError(errno.EIO, f"the copy {name} is missing or short")
        buffer[:] = got[0]

    def close(self) -> None:
        with self._lock:
            names, self._names = sorted(self._names), set()
        self._delete(names)

    def _delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            self._bucket.delete(names[start : start + 1000])


def aside_store_for(
    device: BlockDevice, name: str, size: int, granularity: int, directory: str | os.PathLike[str] | None = None
) -> AsideStore:
    """Where view ``name`` of ``device`` (``size`` bytes, copied aside in granules of ``granularity``) keeps
    its copies: in memory for a small export, as objects for a writable S3 image, else in a scratch file in
    ``directory`` (default: beside an image file, else the system's temporary directory). OSError when no
    scratch file can be made there."""
    source = source_of(device)
    if size <= SMALL_EXPORT:
        return MemoryAside()
    if isinstance(source, S3Device) and source.object_size:
        return ObjectAside(source.object_store, f"{source.key}/views/{name}/")
    if directory is None:
        directory = tempfile.gettempdir()
        if (
            isinstance(source, FileDevice)
            and not isinstance(source, (SharedMemoryDevice, MemoryDevice))
            and not is_block_device(source)
        ):
            directory = os.path.dirname(os.path.abspath(source.path))
    return ScratchFileAside(directory, granularity)
