"""S3Device's opt-in write-back cache: writes acknowledged from memory, made durable by FLUSH and FUA.

Without it, S3Device acknowledges a write only once its PUT has completed. With it, a write lands in an
in-memory copy of each object it touches and is acknowledged at once; uploaders PUT (or DELETE) the dirty
objects in the background, so many small writes into one object cost one PUT, and a client is not held up by
the store's latency. The price is the usual one for a disk's volatile write cache: what was not flushed may
be lost if the process dies. FLUSH waits until every object dirty when it arrived is stored; a write with FUA
waits until its own objects are. Both fail with EIO if the store refuses, and the objects stay dirty, to be
tried again by the next flush.

Each cached object is an entry with a ``version`` (bumped by every change) and ``stored`` (the newest version
known to be in the store). At most one upload per object is in flight, so a stale version can never land
after a newer one; an upload that finishes to find the entry changed meanwhile goes again. An entry whose
data is None stands for an object to delete (a trimmed or zeroed whole object).

Memory is bounded: clean entries are evicted (least recently used first) past ``capacity`` bytes, and a writer
that would dirty more than ``capacity`` waits for uploads, or gets EIO when none is making progress because
the store keeps failing: never an unbounded wait.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["WriteBackCache"]

log = logging.getLogger("nbdproto.devices.s3")


class _Entry:
    __slots__ = ("data", "version", "stored", "uploading", "error")

    def __init__(self, data: bytearray | None, version: int, stored: int) -> None:
        self.data = data
        self.version = version
        self.stored = stored
        self.uploading = False
        self.error: str | None = None

    @property
    def dirty(self) -> bool:
        return self.stored != self.version


class WriteBackCache:
    """Dirty and recently used objects of one image, ``object_size`` bytes each, at most ``capacity`` bytes.

    ``load(index)`` fetches an object's current bytes from the store (zeros if it does not exist);
    ``store(index, data)`` makes the store hold ``data`` (None: delete the object); both raise OSError.
    ``lock_for(index)`` is the per-object lock that the device also holds for its own access to an object;
    ``present`` is the device's allocation map (a byte per object), which ``write`` keeps current.
    """

    def __init__(
        self,
        object_size: int,
        capacity: int,
        load: Callable[[int], bytearray],
        store: Callable[[int, bytes | None], None],
        lock_for: Callable[[int], threading.Lock],
        present: bytearray,
        uploaders: int,
        name: str,
    ) -> None:
        self._object_size = object_size
        self._capacity = max(capacity, object_size)
        self._load = load
        self._store = store
        self._lock_for = lock_for
        self._present = present
        self._name = name
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._cond = threading.Condition()
        self._dirty_bytes = 0
        self._cached_bytes = 0
        self._uploading = 0
        self._pool = ThreadPoolExecutor(uploaders, thread_name_prefix="s3-upload")
        self._closed = False

    # Reads -----------------------------------------------------------------------------------------------

    def read(self, index: int, start: int, out: memoryview) -> bool:
        """Copy the cached bytes of object ``index`` from ``start`` into ``out``; False if it is not cached."""
        with self._cond:
            entry = self._entries.get(index)
            if entry is None:
                return False
            self._entries.move_to_end(index)
            if entry.data is None:
                out[:] = bytes(len(out))
            else:
                out[:] = memoryview(entry.data)[start : start + len(out)]
            return True

    def holds_data(self, index: int) -> bool | None:
        """Whether the cached object ``index`` has data (False: to be deleted), None when it is not cached."""
        with self._cond:
            entry = self._entries.get(index)
            return None if entry is None else entry.data is not None

    # Writes ----------------------------------------------------------------------------------------------

    def write(self, index: int, start: int, data: memoryview | None) -> int:
        """Change object ``index``: ``data`` at ``start``, or with None the whole object deleted. Returns the
        new version, for ``wait_stored``. Waits while the cache is full of dirty objects."""
        self._wait_for_room()
        size = self._object_size
        # The object's lock keeps other writers of this object out, so nobody else can add its entry between
        # the look-up and the insertion below; evictions (of clean entries only) happen under _cond, and a
        # found entry is changed within the same hold of _cond.
        with self._lock_for(index):
            with self._cond:
                entry = self._entries.get(index)
                if entry is not None:
                    self._entries.move_to_end(index)
                    was_dirty = entry.dirty
                    if data is None:
                        if entry.data is not None:
                            self._cached_bytes -= size
                        entry.data = None
                    else:
                        if entry.data is None:
                            entry.data = bytearray(size)
                            self._cached_bytes += size
                        entry.data[start : start + len(data)] = data
                    entry.version += 1
                    version = entry.version
                    if not was_dirty:
                        self._dirty_bytes += size
            if entry is None:
                whole = data is None or (start == 0 and len(data) == size)
                base = None
                if data is not None:
                    base = bytearray(data) if whole else self._load(index)  # the load may raise: nothing changed
                    if not whole:
                        base[start : start + len(data)] = data
                with self._cond:
                    self._entries[index] = _Entry(base, version=1, stored=0)
                    self._cached_bytes += 0 if base is None else size
                    self._dirty_bytes += size
                    version = 1
                    self._evict()
            self._present[index] = 0 if data is None else 1
        self._start_upload(index)
        return version

    def _wait_for_room(self) -> None:
        with self._cond:
            stalled = 0
            while self._dirty_bytes + self._object_size > self._capacity and not self._closed:
                if self._uploading == 0:
                    # The cache is full of dirty objects and none is uploading: their uploads failed. Try them
                    # once more; if that fails too, this write fails rather than waits for ever.
                    if stalled:
                        raise OSError(errno.EIO, f"{self._name}: the write-back cache is full and uploads fail")
                    stalled += 1
                    for index, entry in self._entries.items():
                        if entry.dirty:
                            self._submit(index)
                self._cond.wait(1.0)

    # Uploads ---------------------------------------------------------------------------------------------

    def _start_upload(self, index: int) -> None:
        with self._cond:
            self._submit(index)

    def _submit(self, index: int) -> None:
        """Start uploading ``index`` unless it is clean or already uploading (the caller holds _cond)."""
        entry = self._entries.get(index)
        if entry is None or entry.uploading or not entry.dirty or self._closed:
            return
        entry.uploading = True
        entry.error = None
        self._uploading += 1
        self._pool.submit(self._upload, index, entry)

    def _upload(self, index: int, entry: _Entry) -> None:
        with self._cond:
            version = entry.version
            data = None if entry.data is None else bytes(entry.data)
        error: str | None = None
        try:
            self._store(index, data)
        except OSError as exc:
            error = exc.strerror or str(exc)
            log.warning("%s: write-back of object %d failed: %s", self._name, index, error)
        except BaseException as exc:  # never leave an entry marked as uploading
            error = repr(exc)
            log.exception("%s: write-back of object %d failed", self._name, index)
        with self._cond:
            entry.uploading = False
            self._uploading -= 1
            if error is None:
                was_dirty = entry.dirty
                entry.stored = max(entry.stored, version)
                if was_dirty and not entry.dirty:
                    self._dirty_bytes -= self._object_size
                else:
                    self._submit(index)  # changed while it was uploading: store the newer version too
            else:
                entry.error = error
            self._evict()
            self._cond.notify_all()

    def _evict(self) -> None:
        """Drop clean entries, least recently used first, while the cache holds more than its capacity (the
        caller holds _cond)."""
        if self._cached_bytes <= self._capacity:
            return
        for index, entry in list(self._entries.items()):
            if self._cached_bytes <= self._capacity:
                break
            if entry.dirty or entry.uploading:
                continue
            del self._entries[index]
            if entry.data is not None:
                self._cached_bytes -= self._object_size

    # Durability ------------------------------------------------------------------------------------------

    def dirty_versions(self, indices: Iterable[int] | None = None) -> list[tuple[int, int]]:
        """(index, version) of the dirty objects among ``indices`` (None: all), to pass to ``wait_stored``."""
        with self._cond:
            if indices is None:
                return [(i, e.version) for i, e in self._entries.items() if e.dirty]
            out = []
            for i in indices:
                entry = self._entries.get(i)
                if entry is not None and entry.dirty:
                    out.append((i, entry.version))
            return out

    def wait_stored(self, targets: list[tuple[int, int]]) -> None:
        """Return once each object ``index`` of ``targets`` has ``version`` (or newer) in the store; OSError
        (EIO) if an upload of one fails. Bounded: each upload is bounded by the store's timeouts."""
        with self._cond:
            for index, _ in targets:
                self._submit(index)
            pending = list(targets)
            while pending:
                still = []
                for index, version in pending:
                    entry = self._entries.get(index)
                    if entry is None or entry.stored >= version:
                        continue
                    if not entry.uploading and entry.error is not None:
                        raise OSError(errno.EIO, f"{self._name}: object {index} not stored: {entry.error}")
                    if not entry.uploading:
                        self._submit(index)
                    still.append((index, version))
                pending = still
                if pending:
                    self._cond.wait(1.0)

    def flush(self) -> None:
        """Store every object that is dirty now (NBD_CMD_FLUSH)."""
        self.wait_stored(self.dirty_versions())

    def close(self) -> None:
        """Stop the uploaders (after ``flush``: what is still dirty then is lost)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=True)
