"""An NBD export as one regular file in a FUSE mount, like libnbd's nbdfuse (``nbdproto fuse URI MOUNTPOINT``).

``mount_export`` connects first (a server that cannot be reached fails before anything is mounted), then mounts
MOUNTPOINT holding one file, ``nbd`` by default (as nbdfuse names it), whose size is the export's: reads and
writes of the file are NBD reads and writes, ``fsync`` is NBD_CMD_FLUSH. It returns once the file system is unmounted.

- The binding is mfusepy (ctypes over libfuse 3, pure Python: ``pip install mfusepy`` and Debian's fuse3),
  chosen over pyfuse3 by bench/bench_fuse.py: as fast for sequential reads and it needs no compiler or
  libfuse3-dev (pyfuse3 builds from source for 40 s). Its read and write callbacks are replaced here by ones
  that hand the kernel's buffer itself to the NBD client: a read is received from the socket straight into
  FUSE's buffer, a write is sent from it, with no copy in Python.
- libfuse runs its multi-threaded loop: the kernel's requests are served by several threads at once, spread
  over ``connections`` NBD connections when the server promises multi-conn (one otherwise), each taking any
  number of requests in flight. The file is opened with direct I/O, so each read or write of the file is one
  request of up to 1 MiB (``max_write`` and the kernel's max_pages), and nothing is cached that another
  client of the export could change.
- Unmounting: Ctrl-C, SIGTERM and SIGHUP end the loop and unmount (libfuse's handlers). When a connection is
  lost, the file answers EIO at once (never a hang: ``timeout`` bounds a server that stops answering), like a
  disk that went away, and once no handle of it is open the loop is stopped the same way, so the mount goes
  away by itself (a program that has the file open sees EIO, never a vanished file).
- Requests not aligned to the export's minimum block size (an odd-sized write) are widened to whole blocks:
  reads read the blocks around them; writes read, patch and write the blocks under a lock.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import nbdproto

from ._client import Client, connect

__all__ = ["mount_export", "MAX_REQUEST"]

MAX_REQUEST = 1 << 20
"""The largest read or write the kernel is asked to send (FUSE's largest: 256 pages)."""

log = logging.getLogger("nbdproto.fuse")


class _Export:
    """The file's contents: the export through a pool of clients, whole-block access for unaligned requests."""

    def __init__(self, clients: list[Client], read_only: bool) -> None:
        self.clients = clients
        self._next = itertools.cycle(clients)
        export = clients[0].export
        self.size = export.size
        self.read_only = read_only or export.read_only
        self.block = export.minimum_block_size
        self.can_flush = bool(export.flags & nbdproto.TransmissionFlags.SEND_FLUSH)
        self._patching = threading.Lock()

    def client(self) -> Client:
        return next(self._next)

    def read_into(self, view: memoryview, offset: int) -> int:
        length = min(len(view), self.size - offset)
        if length <= 0:
            return 0
        block = self.block
        if (offset | length) % block and offset + length != self.size:
            start, end = offset - offset % block, -(-(offset + length) // block) * block
            whole = self.client().pread(min(end, self.size) - start, start)
            view[:length] = whole[offset - start : offset - start + length]
            return length
        self.client().pread_into(view[:length], offset)
        return length

    def write_from(self, view: memoryview, offset: int) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "the export is read-only")
        if offset + len(view) > self.size:
            raise OSError(errno.ENOSPC, "writes cannot grow the export")
        block = self.block
        if (offset | len(view)) % block:
            with self._patching:
                start, end = offset - offset % block, -(-(offset + len(view)) // block) * block
                whole = bytearray(self.client().pread(end - start, start))
                whole[offset - start : offset - start + len(view)] = view
                self.client().pwrite(whole, start)
            return len(view)
        self.client().pwrite(view, offset)
        return len(view)

    def flush(self) -> int:
        """NBD_CMD_FLUSH, where the server takes it (one connection's flush covers all with multi-conn, and
        without multi-conn there is only one); 0 for FUSE."""
        if self.can_flush and not self.read_only:
            self.clients[0].flush()
        return 0


def _errors(call: Callable[[], int]) -> int:
    """Run a file operation; any failure becomes the errno FUSE hands to the caller (EIO for a lost
    connection or a broken protocol: never a hang and never a crash of the loop)."""
    try:
        return call()
    except OSError as exc:
        code = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO
        log.debug("request failed: %s", exc)
        return -code
    except nbdproto.ProtocolError as exc:
        log.warning("request failed: %s", exc)
        return -errno.EIO


def _buffer(pointer: Any, size: int) -> memoryview:
    """A view of ``size`` bytes of the C buffer FUSE handed over (no copy)."""
    return memoryview((ctypes.c_char * size).from_address(ctypes.addressof(pointer.contents))).cast("B")


class _Session:
    """What the mount went through: whether libfuse got as far as serving, whether a connection was lost, and
    how many handles of the file are open (a lost connection unmounts once none is)."""

    def __init__(self) -> None:
        self.serving = False
        self.stopping = threading.Event()
        self.lost: Client | None = None
        self._lock = threading.Lock()
        self._open = 0
        self._stopped = False

    def opened(self) -> None:
        with self._lock:
            self._open += 1

    def released(self) -> None:
        with self._lock:
            self._open -= 1
        self._stop_if_lost()

    def connection_lost(self, client: Client) -> None:
        if self.stopping.is_set():
            return  # our own close at the end
        with self._lock:
            first, still_open = self.lost is None, self._open > 0
            if first:
                self.lost = client
        if first and still_open:
            # Said once (every connection of the pool sees the server go), and only while the mount must wait for
            # the file to be closed: mount_export's ConnectionError says the rest when it is gone.
            log.warning("the connection to the server was lost: the file answers EIO; unmounting once it is closed")
        self._stop_if_lost()

    def _stop_if_lost(self) -> None:
        # Stop libfuse's loop as SIGTERM does (its handler unmounts), once: a second SIGTERM could arrive after
        # libfuse has put the default action back.
        with self._lock:
            if self.lost is None or self._open or self._stopped:
                return
            self._stopped = True
        os.kill(os.getpid(), signal.SIGTERM)


def _operations(export: _Export, name: str, mounted: float, session: _Session) -> Any:
    import mfusepy

    path_of_file = "/" + name
    mode = stat.S_IFREG | (0o444 if export.read_only else 0o644)

    class ExportFile(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def init_with_config(self, conn: Any, config: Any) -> None:
            session.serving = True
            if conn is not None:
                conn.max_write = MAX_REQUEST  # libfuse derives the kernel's max_pages from it: 1 MiB requests
                conn.max_read = MAX_REQUEST  # as the max_read mount option says (libfuse wants both equal)
                conn.max_readahead = MAX_REQUEST
            if config is not None:
                config.direct_io = 1
                config.kernel_cache = 0

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            now = int(mounted * 1e9)
            common = {"st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": now, "st_mtime": now, "st_ctime": now}
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **common}
            if path == path_of_file:
                size = export.size
                return {"st_mode": mode, "st_nlink": 1, "st_size": size, "st_blocks": -(-size // 512), **common}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: Any) -> list[str]:
            if path != "/":
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            return [".", "..", name]

        def open(self, path: str, flags: int) -> int:
            if path != path_of_file:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if export.read_only and flags & (os.O_WRONLY | os.O_RDWR):
                raise mfusepy.FuseOSError(errno.EROFS)
            session.opened()
            return 0

        def release(self, path: str, fh: Any) -> int:
            session.released()
            return 0

        def truncate(self, path: str, length: int, fh: Any = None) -> int:
            if length != export.size:
                raise mfusepy.FuseOSError(errno.EINVAL)  # the export's size is the server's to change
            return 0

        def fsync(self, path: str, datasync: int, fh: Any) -> int:
            return _errors(export.flush)

        def statfs(self, path: str) -> dict[str, int]:
            blocks = -(-export.size // 4096)
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_files": 1, "f_namemax": 255}

        # Only so that libfuse installs the callbacks; ZeroCopyFUSE below does the work.
        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            raise NotImplementedError

        def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
            raise NotImplementedError

    return ExportFile()


def _fuse_class() -> Any:
    import mfusepy

    class ZeroCopyFUSE(mfusepy.FUSE):  # type: ignore[misc]
        """mfusepy's FUSE with read and write on the kernel's own buffer."""

        export: _Export

        def read(self, path: Any, buf: Any, size: int, offset: int, fip: Any) -> int:
            return _errors(lambda: self.export.read_into(_buffer(buf, size), offset))

        def write(self, path: Any, buf: Any, size: int, offset: int, fip: Any) -> int:
            return _errors(lambda: self.export.write_from(_buffer(buf, size), offset))

    return ZeroCopyFUSE


def _with_permissions(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``default_permissions`` whenever other users may reach the mount (``allow_other``,
    ``allow_root``): without it FUSE leaves every permission check to us, and we check none, so any user
    could write through a file whose mode says they may not. With it the kernel checks the file's mode."""
    if options.get("allow_other") or options.get("allow_root"):
        return {**options, "default_permissions": True}
    return options


def _watch(client: Client, session: _Session) -> None:
    client.wait_closed()
    session.connection_lost(client)


def mount_export(
    uri: str,
    mountpoint: str,
    *,
    name: str = "nbd",
    read_only: bool = False,
    connections: int = 4,
    fuse_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Show the export at ``uri`` as the file MOUNTPOINT/``name`` until unmounted (see the module docstring);
    ``options`` are nbdproto.ConnectOptions (``timeout``: seconds a request may take before it fails with EIO,
    30 by default), ``fuse_options`` more libfuse mount options. Must run in the main thread (libfuse's signal
    handlers unmount on Ctrl-C and SIGTERM, and it returns). Raises ImportError without mfusepy, OSError where
    the mount fails, ConnectionError when it ended because a connection was lost."""
    _fuse = _fuse_class()  # before connecting: a missing binding is the first thing to say
    first = connect(uri, **options)
    clients = [first]
    session = _Session()
    try:
        if first.can(nbdproto.TransmissionFlags.CAN_MULTI_CONN):
            clients += [connect(uri, **options) for _ in range(connections - 1)]
        export = _Export(clients, read_only)
        for client in clients:
            threading.Thread(target=_watch, args=(client, session), name="nbd-fuse-watch", daemon=True).start()
        # max_threads: more threads than requests in flight gain nothing (each connection takes any number, so a
        # few threads keep every one of them busy). max_idle_threads: libfuse 3.14 takes its "unset" default
        # (UINT_MAX) for a bad value and says "Ignoring invalid max threads value" on every mount.
        settings = {"fsname": "nbdproto", "subtype": "nbdproto", "max_read": MAX_REQUEST, "ro": export.read_only,
                    "max_threads": 16, "max_idle_threads": 16}  # fmt: skip
        _fuse.export = export
        operations = _operations(export, name, time.time(), session)
        try:
            _fuse(operations, mountpoint, foreground=True, **_with_permissions({**settings, **(fuse_options or {})}))
        except RuntimeError as exc:
            # libfuse's status (it said why on stderr); 8 is also how its loop ends on SIGINT or SIGTERM.
            if not (session.serving and str(exc) == "8"):
                raise OSError(errno.EIO, f"FUSE could not mount or serve {mountpoint} (libfuse status {exc})") from None
        if session.lost is not None:
            failure = session.lost.logic.failure
            raise ConnectionError(f"the connection to the server was lost ({failure}); {mountpoint} was unmounted")
    finally:
        session.stopping.set()
        for client in clients:
            client.close()
