"""DirtyBitmapFilter: changed-block tracking for any device, served the way qemu-nbd serves it.

A filter like the others (``nbdproto.devices.Filter``), so every source and filter stack gets it: each write,
write-zeroes and trim marks the granules it touches in every bitmap of the export, before it goes to the
device below (``DirtyBitmap.mark``: a bit test for a granule already dirty; a durable store update, shared
between the writers that need one at the same time, for a granule not yet dirty). Reads, flushes, cache and
read views pass straight through; write views are not offered (a payload received into the device's storage
would be written without the filter seeing it).

Each bitmap NAME is the meta context ``qemu:dirty-bitmap:NAME``, added to the device's own in
``capabilities.meta_contexts`` (read at each handshake, so a bitmap added at run time is offered to the next
client), and answered by ``extents`` as qemu-nbd answers it (``_bits.extents_of``).

**Run time.** ``bitmap_add``, ``bitmap_remove``, ``bitmap_clear``, ``bitmap_list`` and ``bitmap_freeze`` may
be called while clients write, from any thread: a control socket calls them. Bad requests raise
``BitmapError`` (a ValueError with a one-line message), a store that fails raises OSError.

**The instant between two requests.** ``quiesced()`` holds back every new write, write-zeroes and trim, waits
until those in flight have finished, and lets them go again when its block ends: inside it nothing changes the
device, so what is done there happens between two requests. Adding, clearing and resizing a bitmap happen
inside it (a write still in flight when a bitmap starts would otherwise land in the device unrecorded), and so
can a checkpoint: ``with f.quiesced(): frozen = f.bitmap_freeze("a"); f.bitmap_add("b")`` freezes ``a`` and
starts ``b`` at one instant, every write before it in ``frozen``, every write after it in ``b``. Blocks nest
in one thread. The cost on the write path is two set operations and a test, without a lock.

**Sizes.** A bitmap covers the device's size when it starts; when the device grows (``resize``, or a remote
export that grew) the new part is dirty in every bitmap.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from nbdproto.devices import Filter, slower_dispatch
from nbdproto.serving import BlockDevice, Buffer, DeviceCall, DeviceCapabilities

from . import _bits
from ._bitmap import (
    CONTEXT_PREFIX,
    DEFAULT_GRANULARITY,
    BitmapError,
    BitmapInfo,
    DirtyBitmap,
    FrozenBitmap,
    check_granularity,
    check_name,
)
from ._store import BitmapStore, MemoryBitmapStore, StoredBitmap

__all__ = ["DirtyBitmapFilter"]

_POLL = 0.05  # a quiesce looks at the writes in flight at least this often, wake-ups aside
_CHANGES = ("pwrite", "trim", "write_zeroes")


class DirtyBitmapFilter(Filter):
    """``inner`` with the dirty bitmaps of ``store`` (default: in memory only), loaded at once (the store is
    closed if that fails); see the module docstring. ``quiesce_timeout`` bounds how long a bitmap operation
    waits for writes in flight (TimeoutError) and how long a write waits for one to finish (ETIMEDOUT). OSError
    when the store cannot be read, BitmapError when a stored bitmap's name is a context the inner device offers
    itself."""

    def __init__(self, inner: BlockDevice, store: BitmapStore | None = None, *, quiesce_timeout: float = 60.0) -> None:
        super().__init__(inner)
        self.store: BitmapStore = store if store is not None else MemoryBitmapStore()
        self.dispatch = slower_dispatch(self.dispatch, self.store.dispatch)
        self._timeout = quiesce_timeout
        self._size = inner.size
        self._bitmaps: dict[str, DirtyBitmap] = {}
        self._live: tuple[DirtyBitmap, ...] = ()
        self._probes: tuple[tuple[int, bytearray, int, DirtyBitmap], ...] = ()
        self._writing: set[int] = set()
        self._ids = itertools.count()
        self._gate: threading.Event | None = None
        self._depth = 0
        self._admin = threading.RLock()  # bitmap operations and quiesces, one at a time
        self._idle = threading.Condition()
        self._growing = threading.Lock()
        self._caps_key: tuple[object, ...] = ()
        self._caps: DeviceCapabilities | None = None
        try:
            self._load(inner.capabilities.meta_contexts)
        except BaseException:
            self.store.close()
            raise
        self._publish()
        self._pwrite = inner.pwrite
        self._inner_batch: Any = getattr(inner, "call_batch", None)
        if self._inner_batch is not None:
            self.call_batch = self._call_batch

    def _load(self, own: Sequence[str]) -> None:
        for record in self.store.load():
            if CONTEXT_PREFIX + record.name in own:
                raise BitmapError(f"bitmap {record.name!r} in {self.store.where} is a context the device offers")
            bitmap = DirtyBitmap(
                record.name, record.granularity, record.size, record.bits, self.store.sink(record.name)
            )
            if record.size != self._size:
                bitmap.resize(self._size)
            self._bitmaps[record.name] = bitmap

    # What the export offers.

    def _capabilities_over(self, inner: DeviceCapabilities) -> DeviceCapabilities:
        names = tuple(self._bitmaps)
        key = (inner, names)
        if key != self._caps_key or self._caps is None:
            own = tuple(CONTEXT_PREFIX + name for name in names)
            self._caps = replace(inner, meta_contexts=inner.meta_contexts + own)
            self._caps_key = key
        return self._caps

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        if context.startswith(CONTEXT_PREFIX):
            bitmap = self._bitmaps.get(context[len(CONTEXT_PREFIX) :])
            if bitmap is not None:
                size = self.inner.size
                if offset < 0 or length <= 0 or offset + length > size:
                    raise OSError(errno.EINVAL, f"range {offset}+{length} is outside the device")
                if size > self._size:
                    self._grow()
                return bitmap.extents(offset, length)
            if context not in self.inner.capabilities.meta_contexts:
                raise OSError(errno.EINVAL, f"bitmap {context[len(CONTEXT_PREFIX) :]!r} was removed")
        return self.inner.extents(context, offset, length)

    # The calls that change the device: each marks first.

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        # The path nearly every write takes, written out: a granule already dirty in every bitmap costs a bit
        # test each; anything else goes the long way (_begin).
        length = data.nbytes if type(data) is memoryview else len(data)
        token = next(self._ids)
        writing = self._writing
        writing.add(token)
        try:
            if self._gate is not None or offset + length > self._size or length <= 0:
                self._begin(token, offset, length)
            else:
                for shift, bits, count, bitmap in self._probes:
                    first = offset >> shift
                    if (
                        first != (offset + length - 1) >> shift
                        or first >= count
                        or not bits[first >> 3] >> (first & 7) & 1
                    ):
                        bitmap.mark(offset, length)
            self._pwrite(data, offset, fua)
        finally:
            writing.discard(token)
            if self._gate is not None:
                self._wake()

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        token = next(self._ids)
        self._writing.add(token)
        try:
            self._begin(token, offset, length)
            self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)
        finally:
            self._end(token)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        token = next(self._ids)
        self._writing.add(token)
        try:
            self._begin(token, offset, length)
            self.inner.trim(offset, length, fua)
        finally:
            self._end(token)

    call_batch: Callable[[Sequence[DeviceCall]], list[Any]]
    """Offered where the inner device has it (a remote export: NbdDevice sends a batch's requests at once):
    the batch's changes are marked first, with one store update for all of them, then the batch goes below
    whole. Block status of the bitmaps and resizes are answered here, each on its own."""

    def _call_batch(self, calls: Sequence[DeviceCall]) -> list[Any]:
        changes: list[tuple[int, int]] = []
        below: list[int] = []  # the calls the inner device makes
        here: list[int] = []  # the calls this filter answers itself
        for index, call in enumerate(calls):
            if call.method in _CHANGES:
                offset, length = (call.args[1], memoryview(call.args[0]).nbytes) if call.method == "pwrite" else (
                    call.args[0], call.args[1])  # fmt: skip
                changes.append((offset, length))
            elif call.method == "resize" or (call.method == "extents" and call.args[0].startswith(CONTEXT_PREFIX)):
                here.append(index)
                continue
            below.append(index)
        results: list[Any] = [None] * len(calls)
        token = next(self._ids)
        self._writing.add(token)
        try:
            if changes:
                try:
                    if self._gate is not None:
                        self._wait_at_gate(token)
                    if max(offset + length for offset, length in changes) > self._size:
                        self._grow()
                    for bitmap in self._live:
                        bitmap.mark_all(changes)
                except OSError as exc:  # nothing may change: the changes fail, the rest go on
                    for index in below:
                        if calls[index].method in _CHANGES:
                            results[index] = exc
                    below = [index for index in below if calls[index].method not in _CHANGES]
            done = self._inner_batch([calls[index] for index in below]) if below else []
            for index, result in zip(below, done, strict=True):
                results[index] = result
        finally:
            self._end(token)
        for index in here:
            call = calls[index]
            try:
                results[index] = getattr(self, call.method)(*call.args, **call.kwargs)
            except Exception as exc:
                results[index] = exc
        return results

    def resize(self, size: int) -> None:
        with self.quiesced():
            super().resize(size)
            self._resize_bitmaps(self.inner.size)

    def _begin(self, token: int, offset: int, length: int) -> None:
        """For a change in flight (``token`` counted in ``_writing``): wait while a quiesce holds changes back,
        then mark it in every bitmap (the device grown first, if it did)."""
        if self._gate is not None:
            self._wait_at_gate(token)
        if offset + length > self._size:
            self._grow()
        for bitmap in self._live:
            bitmap.mark(offset, length)

    def _end(self, token: int) -> None:
        self._writing.discard(token)
        if self._gate is not None:
            self._wake()

    def _wake(self) -> None:
        with self._idle:
            self._idle.notify_all()

    def _wait_at_gate(self, token: int) -> None:
        while True:
            gate = self._gate
            if gate is None:
                return
            self._end(token)
            if not gate.wait(self._timeout):
                self._writing.add(token)  # the caller's finally takes it out again
                raise OSError(errno.ETIMEDOUT, f"a bitmap operation held writes back for over {self._timeout:g} s")
            self._writing.add(token)

    def _grow(self) -> None:
        """The device grew under the filter (a remote export): the new part is dirty in every bitmap."""
        with self._growing:
            size = self.inner.size
            if size > self._size:
                self._resize_bitmaps(size)

    def _resize_bitmaps(self, size: int) -> None:
        for bitmap in self._live:
            bitmap.resize(size)
        self._size = size
        self._publish()

    def _publish(self) -> None:
        """Make the bitmaps as they are now the ones every change marks."""
        self._live = tuple(self._bitmaps.values())
        self._probes = tuple((*bitmap.probe(), bitmap) for bitmap in self._live)

    # The run-time API.

    @contextlib.contextmanager
    def quiesced(self, timeout: float | None = None) -> Iterator[None]:
        """Inside the block no write, write-zeroes or trim is in flight and none starts (they wait): the
        instant between two requests (module docstring). TimeoutError when the writes in flight do not finish
        within ``timeout`` seconds (default: the filter's ``quiesce_timeout``)."""
        limit = self._timeout if timeout is None else timeout
        if not self._admin.acquire(timeout=limit):
            raise TimeoutError(f"another bitmap operation took over {limit:g} s")
        try:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            gate = threading.Event()
            self._gate = gate
            try:
                deadline = time.monotonic() + limit
                with self._idle:
                    while self._writing:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError(f"writes in flight did not finish within {limit:g} s")
                        self._idle.wait(min(left, _POLL))
                self._depth = 1
                yield
            finally:
                self._depth = 0
                self._gate = None
                gate.set()
        finally:
            self._admin.release()

    def bitmap_add(self, name: str, granularity: int = DEFAULT_GRANULARITY) -> BitmapInfo:
        """Start the bitmap ``name`` (every granule clean) at ``granularity`` bytes (a power of two from 4K),
        stored before it is offered; its info. BitmapError for a bad name or granularity, or a name taken."""
        check_name(name)
        check_granularity(granularity)
        with self.quiesced():
            if name in self._bitmaps:
                raise BitmapError(f"bitmap {name!r} exists already")
            if CONTEXT_PREFIX + name in self.inner.capabilities.meta_contexts:
                raise BitmapError(f"the device below already offers {CONTEXT_PREFIX}{name}")
            size = self._size
            empty = bytearray(_bits.byte_count(_bits.granule_count(size, granularity)))
            record = StoredBitmap(name, granularity, size, empty)
            bitmap = DirtyBitmap(name, granularity, size, record.bits, self.store.create(record))
            self._bitmaps[name] = bitmap
            self._publish()
            return bitmap.info()

    def bitmap_remove(self, name: str) -> None:
        """Stop and forget the bitmap ``name`` (its stored copy first). Clients that agreed on its context get
        EINVAL for block status of it from then on. BitmapError if there is no such bitmap."""
        with self.quiesced():
            self._get(name)
            self.store.remove(name)
            del self._bitmaps[name]
            self._publish()

    def bitmap_clear(self, name: str) -> BitmapInfo:
        """Make every granule of ``name`` clean, as if it started now (stored atomically); its info."""
        with self.quiesced():
            bitmap = self._get(name)
            bitmap.clear()
            return bitmap.info()

    def bitmap_list(self) -> list[BitmapInfo]:
        """Every bitmap, in the order they were added: name, granularity, dirty bytes, size."""
        return [bitmap.info() for bitmap in tuple(self._bitmaps.values())]

    def bitmap_info(self, name: str) -> BitmapInfo:
        return self._get(name).info()

    def bitmap_freeze(self, name: str) -> FrozenBitmap:
        """A copy of ``name`` as it is now, which never changes; inside ``quiesced()``, as of that instant."""
        return self._get(name).freeze()

    def _get(self, name: str) -> DirtyBitmap:
        bitmap = self._bitmaps.get(name)
        if bitmap is None:
            raise BitmapError(f"no bitmap named {name!r}")
        return bitmap

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.store.close()
