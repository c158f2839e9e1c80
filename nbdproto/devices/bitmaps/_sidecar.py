"""SidecarBitmapStore: a file image's bitmaps as files in a directory beside it (``disk.img.bitmaps/``).

One file per bitmap, ``NAME.bitmap``: a header of 4096 bytes (magic ``NBDPBMAP``, format version, granularity,
the image size it covers, the number of granules, a CRC-32 of those fields), then the bits, one per granule
(``_bits``). Marking granules dirty writes the bytes of the bits that changed in place and fdatasyncs the file
before returning (on tmpfs and ramfs, with no disk to sync to, the write alone: what a killed process wrote to
the page cache stays, and the image beside it ends with the machine too); bits only ever turn from 0 to 1
that way, so a torn write is safe. A whole new record (a new bitmap, a clear, a resize) is written to a new
file, synced, and renamed over the old one, then the directory synced: after a crash the old record or the
new one, never a mix.

The directory is created mode 0700 (an existing one must be the server user's, writable by no other user), and
every file in it with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600, relative to the directory's descriptor (no
symlink in it is ever followed), as nbdproto.files creates every file. While a store is open it holds an
exclusive ``flock`` on the directory, so that two servers never track one image's bitmaps at once (the second
fails to open them). Temporary files a crash left behind are removed when the store opens.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import stat
import struct
import zlib
from collections.abc import Sequence

from nbdproto.files import DATA_MODE, new_file, private_directory
from nbdproto.serving import Dispatch

from . import _bits
from ._bitmap import BitmapError, check_granularity, check_name
from ._store import BitmapSink, StoredBitmap

__all__ = ["SidecarBitmapStore", "SUFFIX", "sidecar_of", "in_memory_filesystem"]

SUFFIX = ".bitmap"
_MAGIC = b"NBDPBMAP"
_VERSION = 1
_FIELDS = struct.Struct(">8sIIQQQ")  # magic, version, header size, granularity, image size, granules
_CRC = struct.Struct(">I")
_HEADER_SIZE = 4096
_TEMPORARY = ".tmp"
_OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
_MEMORY_FILESYSTEMS = {0x01021994, 0x858458F6}  # tmpfs, ramfs (statfs f_type, linux/magic.h)


def sidecar_of(image: str) -> str:
    """The directory that holds the bitmaps of the image file ``image`` by default: ``IMAGE.bitmaps``."""
    return os.fspath(image) + ".bitmaps"


def _header(record: StoredBitmap) -> bytes:
    count = _bits.granule_count(record.size, record.granularity)
    fields = _FIELDS.pack(_MAGIC, _VERSION, _HEADER_SIZE, record.granularity, record.size, count)
    return (fields + _CRC.pack(zlib.crc32(fields))).ljust(_HEADER_SIZE, b"\0")


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


def in_memory_filesystem(fd: int) -> bool:
    """Whether ``fd`` lives on tmpfs or ramfs, where a sync never waits on a disk."""
    buf = _StatFs()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return (buf.f_type & 0xFFFFFFFF) in _MEMORY_FILESYSTEMS


class SidecarBitmapStore:
    """The bitmaps in ``directory`` (created, mode 0700, if missing). OSError when the directory cannot be
    used or another process holds it (EBUSY)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        # Made 0700 if missing; an existing one must be ours and writable by no other user (nbdproto.files),
        # or another user could change what the bitmaps say.
        self._dir = private_directory(self.directory)
        try:
            fcntl.flock(self._dir, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dir)
            raise OSError(errno.EBUSY, "the bitmaps there are in use by another server", self.directory) from None
        except BaseException:
            os.close(self._dir)
            raise
        self._files: dict[str, int] = {}
        # On tmpfs and ramfs a sync has nothing to write to (the files end with the machine, as the image
        # beside them does): a write reaches the page cache, which a killed process cannot take back.
        self._in_memory = in_memory_filesystem(self._dir)
        self.dispatch: Dispatch = "inline" if self._in_memory else "batch"
        for entry in os.listdir(self._dir):
            if entry.startswith(".") and entry.endswith(_TEMPORARY):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=self._dir)

    @property
    def where(self) -> str:
        return self.directory

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name + SUFFIX)

    def load(self) -> list[StoredBitmap]:
        records = []
        for entry in sorted(os.listdir(self._dir)):
            if not entry.endswith(SUFFIX) or entry.startswith("."):
                continue
            name = entry[: -len(SUFFIX)]
            try:
                check_name(name)
            except BitmapError:
                continue
            fd = os.open(entry, _OPEN, dir_fd=self._dir)
            try:
                records.append(self._read(fd, name))
            except BaseException:
                os.close(fd)
                raise
            self._files[name] = fd
        return records

    def _read(self, fd: int, name: str) -> StoredBitmap:
        path = self._path(name)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        header = os.pread(fd, _HEADER_SIZE, 0)
        size = _FIELDS.size + _CRC.size
        if len(header) < _HEADER_SIZE or header[:8] != _MAGIC:
            raise OSError(errno.EINVAL, "not a bitmap file (no NBDPBMAP header)", path)
        _, version, header_size, granularity, image_size, count = _FIELDS.unpack_from(header)
        (crc,) = _CRC.unpack_from(header, _FIELDS.size)
        if crc != zlib.crc32(header[: _FIELDS.size]) or any(header[size:]):
            raise OSError(errno.EINVAL, "the bitmap header is damaged (checksum)", path)
        if version != _VERSION or header_size != _HEADER_SIZE:
            raise OSError(errno.EINVAL, f"bitmap format version {version} is not one this server reads", path)
        try:
            check_granularity(granularity)
        except BitmapError as exc:
            raise OSError(errno.EINVAL, str(exc), path) from None
        if count != _bits.granule_count(image_size, granularity):
            raise OSError(errno.EINVAL, "the bitmap header is inconsistent", path)
        length = _bits.byte_count(count)
        bits = bytearray(length)
        done = os.preadv(fd, [bits], _HEADER_SIZE) if length else 0
        if done != length or os.fstat(fd).st_size != _HEADER_SIZE + length:
            raise OSError(errno.EINVAL, f"the bitmap file is not {_HEADER_SIZE + length} bytes long", path)
        if count & 7:
            bits[-1] &= (1 << (count & 7)) - 1
        return StoredBitmap(name, granularity, image_size, bits)

    def create(self, record: StoredBitmap) -> BitmapSink:
        self.write_record(record)
        return _FileSink(self, record.name)

    def sink(self, name: str) -> BitmapSink:
        return _FileSink(self, name)

    def write_record(self, record: StoredBitmap) -> None:
        """``record`` in a new file, synced, renamed over the old one, the directory synced."""
        temporary = f".{record.name}.{secrets.token_hex(8)}{_TEMPORARY}"
        fd = new_file(temporary, DATA_MODE, read=True, dir_fd=self._dir)
        try:
            data = memoryview(_header(record) + bytes(record.bits))
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
            os.fsync(fd)
            os.replace(temporary, record.name + SUFFIX, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=self._dir)
            raise
        old = self._files.get(record.name)
        self._files[record.name] = fd
        if old is not None:
            os.close(old)
        os.fsync(self._dir)

    def update(self, name: str, bits: bytearray, spans: Sequence[tuple[int, int]]) -> None:
        fd = self._files[name]
        view = memoryview(bits)
        for start, end in spans:
            done = start
            while done < end:
                done += os.pwrite(fd, view[done:end], _HEADER_SIZE + done)
        if not self._in_memory:
            os.fdatasync(fd)

    def remove(self, name: str) -> None:
        fd = self._files.pop(name, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name + SUFFIX, dir_fd=self._dir)
        os.fsync(self._dir)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if self._dir >= 0:
            os.close(self._dir)  # and with it the lock
            self._dir = -1


class _FileSink:
    """One bitmap's file, kept up to date."""

    def __init__(self, store: SidecarBitmapStore, name: str) -> None:
        self._store, self._name = store, name

    def write(self, bits: bytearray, spans: Sequence[tuple[int, int]]) -> None:
        self._store.update(self._name, bits, spans)

    def replace(self, record: StoredBitmap) -> None:
        self._store.write_record(record)
