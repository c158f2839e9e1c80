"""S3Device: a block device on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, SeaweedFS).

Two modes, as nbdkit's S3 plugin has, and its object layout (``_s3store``), so either server opens the
other's images:

- one object as a read-only image of the object's size, read with ranged GETs (``S3Device(bucket, key)``);
- a writable image of ``size`` bytes cut into objects of ``object_size`` (``S3Device(bucket, key,
  size=..., object_size=...)``), stored as ``KEY/%016x``. The image is sparse: an object that does not exist
  reads as zeros, trimming or zeroing a whole object deletes it, and block status (``base:allocation``)
  reports the missing objects as holes. Which objects exist is listed once when the device opens (which also
  proves the bucket and credentials, so a bad one fails right there with one line) and kept current by the
  device's own writes and deletes.

Requests run at once: the server calls the device from many threads (``dispatch = "threads"``), and a
request that spans several objects fetches or stores them in parallel. A write that covers an object only in
part is a read-modify-write of the whole object, under that object's lock, so two writes into one object
never lose each other. A write is acknowledged once its PUT has completed, unless the opt-in write-back cache
(``write_back=BYTES``, ``_s3cache``) holds it; then FLUSH and FUA make writes durable before they are
answered. One device object is shared by every connection of a server, so it is multi-conn safe.

Failures are per request: a store that errors or times out (after bounded retries, within
``S3Settings.call_limit``), or an object of the wrong size, fails that one request with EIO and a log line on
logger ``nbdproto.devices.s3``.

One writer per image: a writable image is leased (``_s3lease``), so a second writable device on it refuses to
open (``S3LeaseHeld``, naming the holder and when its lease expires) until the first closes, or its lease
expires after a crash; a device that loses its lease answers every write with EIO from then on and writes
nothing more. Read-only devices take no lease.

Block sizes: any alignment is accepted (minimum 1: the device does the read-modify-write itself), the
preferred size is the object size (up to the 32 MiB the spec allows), so clients that honour it never cause a
read-modify-write, and a request may carry up to 32 MiB.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from nbdproto.serving import Buffer, DeviceCapabilities, Dispatch
from nbdproto.wire import BASE_ALLOCATION

from ._ranges import HOLE, check_range
from ._s3cache import WriteBackCache
from ._s3layout import check_object_size
from ._s3lease import Lease, lease_duration
from ._s3store import ObjectStore, S3Settings, StoreError, object_key, parse_object_key

__all__ = ["S3Device", "S3Settings"]

log = logging.getLogger("nbdproto.devices.s3")

_MAX_OBJECTS = 1 << 28  # one byte of memory per object for the allocation map
_MAX_OBJECT_SIZE = 64 << 20  # each read-modify-write holds a whole object in memory
_MAX_PREFERRED = 32 << 20  # spec ("Block size constraints"): a preferred size above 32 MiB is not allowed
_MAX_PAYLOAD = 32 << 20
_READ_PART = 8 << 20  # a single-object read this big is fetched as parallel ranged GETs of this size
_DELETE_BATCH = 1000  # S3's DeleteObjects limit
_LOCK_STRIPES = 4096
_MAX_EXTENTS = 1024
_KEPT_ERRNOS = (errno.EINVAL, errno.ENOSPC, errno.EROFS, errno.ENOTSUP)  # a request's own errors, passed on as they are


class S3Device:
    """An image in ``bucket`` at ``key``; see the module docstring for the two modes.

    - ``size`` / ``object_size``: the multi-object mode (``size`` a multiple of ``object_size``, a power of
      two up to 64 MiB); without ``size``, the single object ``key`` is the image, read-only.
    - ``read_only``: refuse writes (the multi-object mode is writable otherwise).
    - ``write_back``: bytes of write-back cache; 0 (the default) acknowledges each write once stored.
    - ``parallel``: the threads (shared by all requests) that fetch and store the further objects of requests
      spanning several; with write-back, as many uploaders.
    - ``settings``: the endpoint, region, profile, timeouts and retries (``S3Settings``; ``S3Settings.within
      (seconds)`` bounds every call, as ``--remote-timeout`` does).
    - ``lease``: how long the image stays leased to this device after each renewal (see the module docstring;
      ``--s3-lease``); None: twice the store's call limit (60 s by default); 0: take no lease, for an image
      no other server can reach. Only writable images of ``size`` bytes are leased.

    Raises OSError with a one-line message when the bucket, the credentials or the image are unusable (a
    missing bucket, refused credentials, a missing single object, a lease another server holds: ``S3LeaseHeld``,
    EBUSY), ValueError for impossible sizes or a lease too short for the store's call limit.
    """

    dispatch: Dispatch = "threads"
    """Each request waits on the network: servers run them in worker threads, so slow ones overlap."""

    DEFAULT_OBJECT_SIZE = 1 << 20
    """The object size when none is given: big enough that reading and writing whole images costs few
    requests, small enough that a read-modify-write of one costs little."""

    def __init__(
        self,
        bucket: str,
        key: str,
        *,
        size: int | None = None,
        object_size: int = DEFAULT_OBJECT_SIZE,
        read_only: bool = False,
        write_back: int = 0,
        parallel: int = 32,
        settings: S3Settings | None = None,
        lease: float | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"bucket {bucket!r} must be a bucket name (no '/')")
        if not key or key.startswith("/") or key.endswith("/") or "//" in key:
            raise ValueError(f"key {key!r} must be a non-empty object name, without leading, trailing or double '/'")
        self.bucket, self.key = bucket, key
        self.name = f"s3://{bucket}/{key}"
        settings = settings or S3Settings()
        self._lease: Lease | None = None
        leased = size is not None and not read_only and lease != 0
        duration = lease_duration(lease, settings.call_limit) if leased else 0.0  # ValueError before any call
        self._store = ObjectStore(bucket, settings)
        self._pool = ThreadPoolExecutor(max(1, parallel), thread_name_prefix="s3")
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._cache: WriteBackCache | None = None
        try:
            if leased:
                # Before the listing: once the lease is ours, the previous writer has stopped writing.
                self._store.check_bucket(key + "/")
                self._lease = Lease(self._store, self.name, key, duration, settings.call_limit)
                self._lease.acquire()
                self._store.fence = self._lease.check
            if size is None:
                self._open_single(read_only)
            else:
                self._open_image(size, object_size, read_only, write_back, parallel)
        except BaseException:
            self._pool.shutdown(wait=False)
            if self._lease is not None:
                self._lease.release()
            raise

    def _open_single(self, read_only: bool) -> None:
        found = self._store.head(self.key)
        if found is None:
            raise StoreError(
                errno.ENOENT,
                f"{self.name} does not exist (an image of {self.key}/%016x objects needs a size and object size)",
                self.name,
            )
        self._size = found
        self._object_size = 0
        self._present = bytearray()
        # base:allocation all data, so that clients that ask (nbdinfo --map, qemu-img) get an answer.
        self._capabilities = DeviceCapabilities(can_write=False, can_multi_conn=True, preferred_block_size=4096)

    def _open_image(self, size: int, object_size: int, read_only: bool, write_back: int, parallel: int) -> None:
        if object_size <= 0 or object_size & (object_size - 1) or object_size > _MAX_OBJECT_SIZE:
            raise ValueError(f"object size {object_size} must be a power of two of at most 64 MiB")
        if size <= 0 or size % object_size:
            raise ValueError(f"size {size} must be a positive multiple of the object size {object_size}")
        count = size // object_size
        if count > _MAX_OBJECTS:
            raise ValueError(f"{count} objects of {object_size} bytes are too many: use a bigger object size")
        self._size, self._object_size = size, object_size
        self._present = bytearray(count)
        wrong_sizes: list[tuple[str, int]] = []
        sizes: Counter[int] = Counter()
        for name, length in self._store.list(self.key + "/"):
            index = parse_object_key(self.key, name)
            if index is None or index >= count:
                continue
            self._present[index] = 1
            sizes[length] += 1
            if length != object_size and len(wrong_sizes) < 10:
                wrong_sizes.append((name, length))
        check_object_size(self.name, sizes, object_size)  # another object size: refused here, not read as damage
        for name, length in wrong_sizes:
            log.warning("%s: %s has %d bytes, not %d: reads of it fail", self.name, name, length, object_size)
        preferred = min(object_size, _MAX_PREFERRED)
        self._capabilities = DeviceCapabilities(
            can_write=not read_only,
            can_trim=True,
            can_zero=True,
            can_fast_zero=True,
            can_multi_conn=True,
            preferred_block_size=preferred,
            maximum_payload=_MAX_PAYLOAD,
        )
        if write_back and not read_only:
            self._cache = WriteBackCache(
                object_size,
                write_back,
                self._load,
                self._put_or_delete,
                self._lock_for,
                self._present,
                parallel,
                self.name,
            )

    @property
    def size(self) -> int:
        return self._size

    @property
    def object_size(self) -> int:
        """The size of each object (0 for the single-object mode)."""
        return self._object_size

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._capabilities

    @property
    def object_store(self) -> ObjectStore:
        """The bucket the image is in, for what is kept beside the image under its key (its dirty bitmaps:
        ``nbdproto.devices.bitmaps``)."""
        return self._store

    @property
    def stored_objects(self) -> int:
        """How many of the image's objects exist (or will, once the write-back cache is flushed)."""
        return self._present.count(1)

    def _check(self, offset: int, length: int, writing: bool = False) -> None:
        check_range(self._size, offset, length, writing=writing, can_write=self._capabilities.can_write)
        if writing and self._lease is not None:
            self._lease.check()

    def _still_leased(self) -> None:
        """After a write: acknowledged only while the lease holds (its objects were fenced as they went)."""
        if self._lease is not None:
            self._lease.check()

    def _lock_for(self, index: int) -> threading.Lock:
        return self._locks[index % _LOCK_STRIPES]

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        # (object index, start within the object, end within the object, position within the request)
        size = self._object_size
        done = 0
        while done < length:
            index, start = divmod(offset + done, size)
            end = min(size, start + length - done)
            yield index, start, end, done
            done += end - start

    def _each(self, jobs: Sequence[Callable[[], None]]) -> None:
        """Run the jobs in parallel (the first in this thread), wait for all, raise the first failure as EIO."""
        futures: list[Future[None]] = [self._pool.submit(job) for job in jobs[1:]]
        errors: list[BaseException] = []
        if jobs:
            try:
                jobs[0]()
            except BaseException as exc:
                errors.append(exc)
        for future in futures:
            failure = future.exception()
            if failure is not None:
                errors.append(failure)
        if errors:
            raise _request_error(self.name, errors[0])

    # Reads -----------------------------------------------------------------------------------------------

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self._check(offset, len(buffer))
        if not self._object_size:
            self._read_single(buffer, offset)
            return
        jobs = [
            _bind(self._read_object, index, start, buffer[pos : pos + end - start])
            for index, start, end, pos in self._spans(offset, len(buffer))
        ]
        self._each(jobs)

    def _read_object(self, index: int, start: int, out: memoryview) -> None:
        cache = self._cache
        if cache is not None and cache.read(index, start, out):
            return
        if not self._present[index]:
            out[:] = bytes(len(out))
            return
        name = object_key(self.key, index)
        got = self._store.get_range(name, start, start + len(out))
        if got is None:  # deleted behind our back: it reads as zeros, as any missing object does
            out[:] = bytes(len(out))
            return
        data, whole = got
        if whole != self._object_size or len(data) != len(out):
            raise _wrong_size(name, whole, self._object_size)
        out[:] = memoryview(data)

    def _read_single(self, buffer: memoryview, offset: int) -> None:
        jobs = []
        for pos in range(0, len(buffer), _READ_PART):
            part = buffer[pos : pos + _READ_PART]
            jobs.append(_bind(self._read_range, offset + pos, part))
        self._each(jobs)

    def _read_range(self, start: int, out: memoryview) -> None:
        if not len(out):
            return
        got = self._store.get_range(self.key, start, start + len(out))
        if got is None:
            raise StoreError(errno.EIO, f"{self.key} was deleted while served")
        data, whole = got
        if whole != self._size or len(data) != len(out):
            raise StoreError(errno.EIO, f"{self.key} changed size from {self._size} to {whole} bytes while served")
        out[:] = memoryview(data)

    def _load(self, index: int) -> bytearray:
        """The whole of object ``index`` as it is stored (zeros if it does not exist)."""
        if not self._present[index]:
            return bytearray(self._object_size)
        name = object_key(self.key, index)
        data = self._store.get(name)
        if data is None:
            return bytearray(self._object_size)
        if len(data) != self._object_size:
            raise _wrong_size(name, len(data), self._object_size)
        return bytearray(data)

    # Writes ----------------------------------------------------------------------------------------------

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view), writing=True)
        jobs = [
            _bind(self._write_object, index, start, view[pos : pos + end - start])
            for index, start, end, pos in self._spans(offset, len(view))
        ]
        self._each(jobs)
        if fua:
            self._make_durable(offset, len(view))
        self._still_leased()

    def _write_object(self, index: int, start: int, data: memoryview) -> None:
        if self._cache is not None:
            self._cache.write(index, start, data)
            return
        name = object_key(self.key, index)
        with self._lock_for(index):
            if start == 0 and len(data) == self._object_size:
                self._store.put(name, data)
            else:
                whole = self._load(index)
                whole[start : start + len(data)] = data
                self._store.put(name, whole)
            self._present[index] = 1

    def _put_or_delete(self, index: int, data: bytes | None) -> None:
        """What the write-back cache calls to store an object (None: delete it)."""
        name = object_key(self.key, index)
        if data is None:
            self._store.delete([name])
        else:
            self._store.put(name, data)

    def _make_durable(self, offset: int, length: int) -> None:
        cache = self._cache
        if cache is None or not length:
            return  # write-through: stored already
        first = offset // self._object_size
        last = (offset + length - 1) // self._object_size
        try:
            cache.wait_stored(cache.dirty_versions(range(first, last + 1)))
        except OSError as exc:
            raise _request_error(self.name, exc) from None

    def flush(self) -> None:
        if self._cache is not None:
            try:
                self._cache.flush()
            except OSError as exc:
                raise _request_error(self.name, exc) from None

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Delete the objects the range covers whole (the rest of the range is left as it is: trim is a hint)."""
        self._check(offset, length, writing=True)
        whole = [index for index, start, end, _ in self._spans(offset, length) if end - start == self._object_size]
        self._delete_objects(whole)
        if fua:
            self._make_durable(offset, length)
        self._still_leased()

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, writing=True)
        size = self._object_size
        whole: list[int] = []
        jobs: list[Callable[[], None]] = []
        for index, start, end, _ in self._spans(offset, length):
            if end - start == size and may_trim:
                whole.append(index)
            elif self._holds_data(index) or not may_trim:
                # Zeroing part of an object with data (or, under NO_HOLE, writing real zeros): a write.
                if fast:
                    raise OSError(errno.ENOTSUP, "zeroing part of an object is a read-modify-write, not fast")
                jobs.append(_bind(self._write_object, index, start, memoryview(bytes(end - start))))
        self._delete_objects(whole)
        self._each(jobs)
        if fua:
            self._make_durable(offset, length)
        self._still_leased()

    def _holds_data(self, index: int) -> bool:
        if self._cache is not None:
            cached = self._cache.holds_data(index)
            if cached is not None:
                return cached
        return bool(self._present[index])

    def _delete_objects(self, indices: list[int]) -> None:
        if self._cache is not None:
            jobs = [_bind(self._cache_delete, i) for i in indices if self._holds_data(i)]
            self._each(jobs)
            return
        present = [i for i in indices if self._present[i]]
        batches = [present[i : i + _DELETE_BATCH] for i in range(0, len(present), _DELETE_BATCH)]
        self._each([_bind(self._delete_batch, batch) for batch in batches])

    def _cache_delete(self, index: int) -> None:
        assert self._cache is not None
        self._cache.write(index, 0, None)

    def _delete_batch(self, indices: list[int]) -> None:
        # Under the locks of all its objects, taken in one order (every other holder takes only one), so no
        # read-modify-write of one of them can interleave with the delete.
        stripes = sorted({index % _LOCK_STRIPES for index in indices})
        with ExitStack() as held:
            for stripe in stripes:
                held.enter_context(self._locks[stripe])
            self._store.delete([object_key(self.key, index) for index in indices])
            for index in indices:
                self._present[index] = 0

    # Status ----------------------------------------------------------------------------------------------

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        self._check(offset, length)
        if context != BASE_ALLOCATION or not self._object_size:
            return [(length, 0)]
        size = self._object_size
        present = self._present
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < _MAX_EXTENTS:
            index = pos // size
            data = present[index] == 1
            # The next object in the other state: a C-speed search of the allocation map.
            other = present.find(b"\x00" if data else b"\x01", index + 1)
            run_end = min(end, (other if other >= 0 else len(present)) * size)
            out.append((run_end - pos, 0 if data else HOLE))
            pos = run_end
        return out

    def close(self) -> None:
        """Flush the write-back cache (if any), release the threads, and give the lease back (deleted)."""
        try:
            if self._cache is not None:
                try:
                    self._cache.flush()
                finally:
                    self._cache.close()
        finally:
            self._pool.shutdown(wait=True)
            if self._lease is not None:
                self._lease.release()

    def __enter__(self) -> S3Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bind(function: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: function(*args)


def _wrong_size(name: str, found: int, expected: int) -> StoreError:
    return StoreError(errno.EIO, f"object {name} has {found} bytes, not {expected}")


def _request_error(image: str, exc: BaseException) -> OSError:
    """The error a request fails with: range and permission errors as they are; store failures as EIO,
    logged here with the image's name (a server logs the request's failure too; its client is told EIO alone)."""
    if isinstance(exc, OSError) and not isinstance(exc, StoreError) and exc.errno in _KEPT_ERRNOS:
        return exc
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    log.warning("%s: %s", image, message)
    return OSError(errno.EIO, message)
