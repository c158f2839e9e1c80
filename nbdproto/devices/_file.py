"""FileDevice: a block device over a regular file or a Linux block device.

Reads and writes are os.preadv / os.pwritev straight from and into the caller's buffers (positional, so many
threads share one descriptor safely). Flush and FUA are fdatasync. Trim punches a hole and write-zeroes uses
fallocate (ZERO_RANGE, or PUNCH_HOLE when a hole is allowed), falling back to writing zeroes unless the
client asked for a fast zero. Block status for ``base:allocation`` comes from SEEK_DATA / SEEK_HOLE. For
block devices: BLKZEROOUT and BLKDISCARD ioctls, and every byte reported as data.

Reads can also skip the copy into Python altogether: the file is memory-mapped (read-only, shared) and
``read_view()`` hands out slices of the mapping, which a server queues as the reply's data. The kernel then
copies the bytes from the page cache into the socket once, and the request costs no system call of its own
(less server CPU per read than preadv into a buffer: bench/bench_table.py's 4k reads). The mapping sees every
write made through the descriptor (one page cache). ``fileno()`` lets a backend use os.sendfile instead.

On tmpfs and memfds (shared memory), touching a hole through a mapping allocates a page for it, where pread
reads the hole as zeroes for free: served through views, every read of a sparse in-memory file would fill it
in. So views are handed out there only while the file has no holes (checked when it is opened, and given up
at the first hole this device punches); a sparse one is read with pread_into. Holes punched by another
process (another worker serving the same file) are not seen: reading them through views costs memory, never
correctness.

Writes can skip a copy too, on tmpfs, ramfs and memfds: there the mapping is writable, and ``write_view()``
hands out the slice a write's payload belongs in, for a server to receive it straight into (recv_into), where
it would otherwise be received into a buffer and copied from there into the page cache by pwrite (the server
CPU per GiB of bench/bench_table.py's nbdcopy write shows the copy saved). On a file on disk every
write through a mapping costs a page fault (again after each writeback), so there writes stay with pwrite.

A view must only be read or written by the kernel (a plaintext socket's sendmsg and recv_into): if the file is
truncated by someone else while it is served, touching the vanished pages from user space is a SIGBUS that
kills the process, while the system call merely fails with EFAULT and ends that one connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Sequence

from nbdproto.serving import Buffer, DeviceCapabilities, Dispatch
from nbdproto.wire import BASE_ALLOCATION

from ._ranges import HOLE, check_range

__all__ = ["FileDevice"]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_MAX_EXTENTS = 1024
_ZERO_CHUNK = bytes(1 << 20)

_libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on (find_library forks ldconfig)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _map(fd: int, size: int, writable: bool) -> mmap.mmap | None:
    """The whole file mapped shared (read-only unless ``writable``), or None where it cannot be (an empty
    file, a file system without mmap, no address space left)."""
    if size == 0:
        return None
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    except (OSError, ValueError, OverflowError):
        return None


_MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14
_PAGE_MASK = ~(mmap.PAGESIZE - 1)
_MAPPED_SHIFT = 20  # write_view: a file without holes is faulted in a MiB at a time, each MiB once


_MEMORY_FILESYSTEMS = {0x01021994, 0x858458F6}  # tmpfs, ramfs (statfs f_type, linux/magic.h)


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


def _in_memory_filesystem(fd: int) -> bool:
    """True when ``fd`` lives on tmpfs or ramfs: its reads and writes are memory copies that never wait on a
    disk, so an event loop may make them inline."""
    buf = _StatFs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) in _MEMORY_FILESYSTEMS


class FileDevice:
    """A regular file or block device at ``path``; writable unless ``read_only``."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self._adopt(os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC), read_only)

    @classmethod
    def from_descriptor(cls, fd: int, path: str | os.PathLike[str], *, read_only: bool = False) -> FileDevice:
        """Serve ``fd``, open already (the device owns it from now on), as the file at ``path``: for a file
        created safely (nbdproto.files), which reopening by its path could not guarantee to be the same."""
        device = cls.__new__(cls)
        device.path = os.fspath(path)
        device._adopt(fd, read_only)
        return device

    def _adopt(self, fd: int, read_only: bool) -> None:
        """Serve the open descriptor ``fd`` (closed here if it is not a file or block device): for subclasses
        that make their file another way (SharedMemoryDevice)."""
        self._fd = fd
        mode = os.fstat(self._fd).st_mode
        self._block_device = stat.S_ISBLK(mode)
        if not (stat.S_ISREG(mode) or self._block_device):
            os.close(self._fd)
            raise OSError(errno.EINVAL, f"{self.path} is neither a regular file nor a block device")
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        # tmpfs and ramfs: memory copies that never wait on a disk, so a server may call them inline. Not a block
        # device, whose node lives on devtmpfs (a tmpfs) whatever disk is behind it.
        self.in_memory = not self._block_device and _in_memory_filesystem(self._fd)
        self.dispatch: Dispatch = "inline" if self.in_memory else "batch"
        # Reading a hole of a shared-memory file through the mapping would allocate it (module docstring).
        self._holes_cost_memory = self.in_memory and os.fstat(self._fd).st_blocks * 512 < self._size
        # Writes are received in place only on tmpfs and ramfs (write_view), so only there is the mapping writable.
        in_place = self.in_memory and not read_only
        self._mmap = _map(self._fd, self._size, in_place)
        self._mapping = memoryview(self._mmap).toreadonly() if self._mmap is not None else None
        self._write_mapping = memoryview(self._mmap) if self._mmap is not None and in_place else None
        # write_view: which MiBs of the file this process has faulted in (while it has no holes), one byte each.
        self._mapped = bytearray(((self._size - 1) >> _MAPPED_SHIFT) + 1 if self._write_mapping is not None else 0)
        self._capabilities = DeviceCapabilities(
            can_write=not read_only,
            can_trim=True,
            can_zero=True,
            can_fast_zero=True,
            can_cache=True,
            # Every connection reads and writes through the same page cache, and fdatasync flushes all of it.
            can_multi_conn=True,
            meta_contexts=() if self._block_device else (BASE_ALLOCATION,),
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._capabilities

    def fileno(self) -> int:
        return self._fd

    def _check(self, offset: int, length: int, writing: bool = False) -> None:
        check_range(self._size, offset, length, writing=writing, can_write=self._capabilities.can_write)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        size = len(buffer)
        if offset < 0 or offset + size > self._size:
            self._check(offset, size)
        done = os.preadv(self._fd, [buffer], offset)
        while done < size:
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got == 0:  # the file shrank under us: what is gone reads as zero
                buffer[done:] = bytes(len(buffer) - done)
                return
            done += got

    def read_view(self, offset: int, length: int) -> memoryview | None:
        """The ``length`` bytes at ``offset`` as a read-only view of the file's mapping (no copy, no system
        call), or None when the file could not be mapped (then use pread_into). See the module docstring for
        who may read the view."""
        mapping = self._mapping
        if mapping is None or self._holes_cost_memory:
            return None
        if offset < 0 or length < 0 or offset + length > self._size:
            self._check(offset, length)
        return mapping[offset : offset + length]

    def write_view(self, offset: int, length: int) -> memoryview | None:
        """The ``length`` bytes at ``offset`` as a writable view of the file's mapping, for a server to receive
        a write's payload into (in place: no copy out of a receive buffer, no pwrite), or None where the write
        goes through pwrite: a file on a disk (every write through a mapping would cost a page fault, and
        another after each writeback), a read-only device, a range outside the file, or pages that cannot be
        had (a full tmpfs: pwrite then says ENOSPC). The pages are faulted in first, in one system call
        (MADV_POPULATE_READ), so that the receive does not fault them in one at a time: on tmpfs a shared
        mapping is writable from the first fault (nothing tracks its dirty pages), and read faults map the
        pages around them too (MADV_POPULATE_WRITE would fault every page, at a cost bench/bench_table.py's
        nbdcopy write to a fresh server shows). A file without holes is faulted in a MiB at a time, each MiB once
        (then a write costs no system call of its own); pages another process takes away afterwards (a worker
        punching a hole) are faulted in again by the receive itself, which on a full tmpfs fails it with
        EFAULT and ends that connection. Only the kernel may write into the view (module docstring)."""
        mapping = self._write_mapping
        if mapping is None or offset < 0 or length <= 0 or offset + length > self._size:
            return None
        first, last = offset >> _MAPPED_SHIFT, (offset + length - 1) >> _MAPPED_SHIFT
        whole = not self._holes_cost_memory
        if not whole:  # fault in only these pages: faulting in a hole allocates it
            start, end = offset & _PAGE_MASK, offset + length
        elif self._mapped.find(0, first, last + 1) < 0:  # every page exists, and these are faulted in
            return mapping[offset : offset + length]
        else:  # fault in whole MiBs, each once (a system call for every write would cost one per write)
            start, end = first << _MAPPED_SHIFT, min((last + 1) << _MAPPED_SHIFT, self._size)
        try:
            self._mmap.madvise(_MADV_POPULATE_READ, start, end - start)  # type: ignore[union-attr]
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # a kernel older than 5.14: never in place
                self._write_mapping = None
            return None
        if whole:
            self._mapped[first : last + 1] = bytes([1]) * (last + 1 - first)
        return mapping[offset : offset + length]

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        view = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
        size = view.nbytes
        if offset < 0 or offset + size > self._size or not self._capabilities.can_write:
            self._check(offset, size, writing=True)
        done = os.pwrite(self._fd, view, offset)
        while done < size:  # a short write (a signal, a nearly full disk): the rest, until an error says why
            done += os.pwrite(self._fd, view[done:], offset + done)
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        if self._capabilities.can_write:
            os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check(offset, length, writing=True)
        try:
            if self._block_device:
                fcntl.ioctl(self._fd, _BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
                self._holes_cost_memory |= self.in_memory
        except OSError as exc:
            # Trim is advisory: a file system that cannot punch holes simply keeps the data.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY):
                raise
        if fua:
            os.fdatasync(self._fd)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, writing=True)
        if not self._zero_fast(offset, length, may_trim):
            if fast:
                raise OSError(errno.ENOTSUP, "this file cannot be zeroed without writing zeroes")
            done = 0
            while done < length:
                step = min(length - done, len(_ZERO_CHUNK))
                self.pwrite(memoryview(_ZERO_CHUNK)[:step], offset + done)
                done += step
        if fua:
            os.fdatasync(self._fd)

    def _zero_fast(self, offset: int, length: int, may_trim: bool) -> bool:
        unsupported = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EINVAL)
        if self._block_device:
            try:
                fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
                return True
            except OSError as exc:
                if exc.errno in unsupported:
                    return False
                raise
        modes = [_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE] if may_trim else []
        modes.append(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                _fallocate(self._fd, mode, offset, length)
                self._holes_cost_memory |= self.in_memory and bool(mode & _FALLOC_FL_PUNCH_HOLE)
                return True
            except OSError as exc:
                if exc.errno not in unsupported:
                    raise
        return False

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        self._check(offset, length)
        if context != BASE_ALLOCATION or self._block_device:
            return [(length, 0)]
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < _MAX_EXTENTS:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: only a hole from here to the end
                    raise
                data = self._size
            if data > pos:
                hole_end = min(data, end)
                out.append((hole_end - pos, HOLE))
                pos = hole_end
                continue
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            out.append((hole - pos, 0))
            pos = hole
        return out

    def close(self) -> None:
        mapping, self._mapping, self._write_mapping, self._mmap = self._mmap, None, None, None
        if mapping is not None:
            # Views still queued for sending keep the mapping alive; it is unmapped when the last one goes.
            with contextlib.suppress(BufferError):
                mapping.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
