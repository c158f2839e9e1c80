"""DirtyBitmapFilter: changed-block tracking for any device, served the way qemu-nbd serves it, and checkpoints.

A filter like the others (``nbdproto.devices.Filter``), so every source and filter stack gets it: each write,
write-zeroes and trim marks the granules it touches in every bitmap of the export, before it goes to the
device below (``DirtyBitmap.mark``: a bit test for a granule already dirty; a durable store update, shared
between the writers that need one at the same time, for a granule not yet dirty). Reads, flushes, cache and
read views pass straight through.

**Writes received in place.** Where the device below offers ``write_view`` (a file on tmpfs, a memfd), so does
the filter: the engine asks for a view as a write's header is parsed, before any of its payload has arrived,
and the filter marks the write's granules (and copies aside what backup views still need of them) right then,
then hands out the device's own view. The server tells it when nothing more will arrive there
(``write_view_ended``), so that ``quiesced`` knows which writes are still landing. Where the marks would have
to wait on a disk or a network (a store that is not "inline"), the filter gives no view and the write comes
through ``pwrite``, in a worker thread.

Each bitmap NAME is the meta context ``qemu:dirty-bitmap:NAME``, added to the device's own in
``capabilities.meta_contexts`` (read at each handshake, so a bitmap added at run time is offered to the next
client), and answered by ``extents`` as qemu-nbd answers it (``_bits.extents_of``).

**Run time.** ``bitmap_add``, ``bitmap_remove``, ``bitmap_clear``, ``bitmap_list``, ``bitmap_freeze``,
``checkpoint`` and ``release`` may be called while clients write, from any thread: a control socket calls them.
Bad requests raise ``BitmapError`` (a ValueError with a one-line message), a store that fails raises OSError.

**The instant between two requests.** ``quiesced()`` (``_gate``) holds back every new write, write-zeroes and
trim, waits until those in flight have finished, and lets them go again when its block ends: inside it nothing
changes the device, so what is done there happens between two requests. Adding, clearing and resizing a bitmap
happen inside it, and so does a checkpoint.

**Checkpoints.** ``checkpoint(NAME, since=OLD)`` does at one instant what an incremental backup needs: it
starts bitmap NAME (the changes after the instant), freezes OLD (the changes up to it) and a read-only view of
the export as it is (``BackupView``, in ``_view``), which a server offers as ``EXPORT@NAME``. Every change
through the filter first lets each view copy aside what it still needs of the granules changed
(copy-before-write). ``release(NAME)`` ends the view and frees what it kept; bitmap NAME goes on.

**Sizes.** A bitmap covers the device's size when it starts; when the device grows (``resize``, or a remote
export that grew) the new part is dirty in every bitmap. A view keeps the size of its checkpoint.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from nbdproto.devices import Filter, slower_dispatch
from nbdproto.serving import BlockDevice, Buffer, DeviceCall, DeviceCapabilities

from . import _bits
from ._aside import AsideStore, aside_store_for
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
from ._gate import WriteGate
from ._store import BitmapStore, MemoryBitmapStore, StoredBitmap
from ._view import BackupView, ViewStatus

__all__ = ["DirtyBitmapFilter"]

_CHANGES = ("pwrite", "trim", "write_zeroes")
_MAX_VIEW_GRANULE = 1 << 20  # a view copies aside in the granules of its bitmap, at most this big


class DirtyBitmapFilter(WriteGate, Filter):
    """``inner`` with the dirty bitmaps of ``store`` (default: in memory only), loaded at once (the store is
    closed if that fails); see the module docstring. ``quiesce_timeout`` bounds how long a bitmap operation
    waits for writes in flight (TimeoutError) and how long a write waits for one to finish (ETIMEDOUT).
    ``scratch_dir``: where checkpoints' views keep what they copy aside when it goes to a scratch file
    (``aside_store_for``). OSError when the store cannot be read, BitmapError when a stored bitmap's name is a
    context the inner device offers itself."""

    def __init__(
        self,
        inner: BlockDevice,
        store: BitmapStore | None = None,
        *,
        quiesce_timeout: float = 60.0,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        Filter.__init__(self, inner)
        WriteGate.__init__(self, quiesce_timeout)
        self.store: BitmapStore = store if store is not None else MemoryBitmapStore()
        self.dispatch = slower_dispatch(self.dispatch, self.store.dispatch)
        self.scratch_dir = scratch_dir
        self._size = inner.size
        self._bitmaps: dict[str, DirtyBitmap] = {}
        self._live: tuple[DirtyBitmap, ...] = ()
        self._probes: tuple[tuple[int, bytearray, int, DirtyBitmap], ...] = ()
        self._views: dict[str, BackupView] = {}
        self._copying: tuple[BackupView, ...] = ()  # the views every change lets copy aside first
        self._in_place: dict[int, tuple[int, memoryview]] = {}  # id(view) -> (token, view) handed out
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
        self._inner_view: Any = getattr(inner, "write_view", None)
        if self._inner_view is not None:
            self.write_view = self._write_view

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

    # The calls that change the device: each marks first, then lets the views copy aside.

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
                if self._copying:
                    for view in self._copying:
                        view.before_change(offset, length)
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

    write_view: Callable[[int, int], memoryview | None]
    """Offered where the inner device has it: the inner device's view for a write's payload, once the write is
    marked and the views have copied aside what they need (module docstring); None where that would wait on a
    disk or a network, or a quiesce is closing the door (the write then comes through ``pwrite``)."""

    def _write_view(self, offset: int, length: int) -> memoryview | None:
        token = next(self._ids)
        viewing = self._viewing
        viewing.add(token)
        given: memoryview | None = None
        try:
            if self._views_closed or offset + length > self._size or length <= 0 or not self._ready_for(offset, length):
                return None
            for bitmap in self._live:
                bitmap.mark(offset, length)
            for view in self._copying:
                view.before_change(offset, length)
            inner = self._inner_view(offset, length)
            if inner is None:
                return None
            given = memoryview(inner)  # an object of its own: write_view_ended knows it by its identity
            self._in_place[id(given)] = (token, given)
            return given
        except OSError:  # a mark that failed: pwrite fails the write properly (EIO), without reaching the device
            return None
        finally:
            if given is None:
                self._end_view(token)

    def _ready_for(self, offset: int, length: int) -> bool:
        """Whether marking ``[offset, offset + length)`` and copying it aside never waits on a disk or a
        network: the granules are dirty already, or the stores are "inline" (memory, tmpfs)."""
        if self.store.dispatch != "inline":
            for shift, bits, count, _ in self._probes:
                first, end = offset >> shift, min(((offset + length - 1) >> shift) + 1, count)
                if first < end and not _bits.all_set(bits, first, end):
                    return False
        return all(view.dispatch == "inline" or not view.needs_copy(offset, length) for view in self._copying)

    def write_view_ended(self, view: memoryview) -> None:
        """Nothing more will be received into ``view`` (one ``write_view`` gave): the write is over, for
        ``quiesced``. A view not known (told twice) is ignored."""
        entry = self._in_place.pop(id(view), None)
        if entry is not None and entry[1] is view:
            self._end_view(entry[0])

    call_batch: Callable[[Sequence[DeviceCall]], list[Any]]
    """Offered where the inner device has it (a remote export: NbdDevice sends a batch's requests at once):
    the batch's changes are marked first, with one store update for all of them, and copied aside by the
    views, then the batch goes below whole. Block status of the bitmaps and resizes are answered here, each on
    its own."""

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
                    for view in self._copying:
                        for offset, length in changes:
                            view.before_change(offset, length)
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
            if size < self._size:  # what a shrink takes away, the views still need
                for view in self._copying:
                    view.before_change(size, self._size - size)
            super().resize(size)
            self._resize_bitmaps(self.inner.size)

    def _begin(self, token: int, offset: int, length: int) -> None:
        """For a change in flight (``token`` counted in ``_writing``): wait while a quiesce holds changes back,
        then mark it in every bitmap (the device grown first, if it did) and let every view copy aside."""
        if self._gate is not None:
            self._wait_at_gate(token)
        if offset + length > self._size:
            self._grow()
        for bitmap in self._live:
            bitmap.mark(offset, length)
        for view in self._copying:
            view.before_change(offset, length)

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

    def checkpoint(
        self,
        name: str,
        since: str | None = None,
        *,
        granularity: int | None = None,
        limit: int | None = None,
        aside: AsideStore | None = None,
    ) -> BackupView:
        """At one instant between two requests: start bitmap ``name``, freeze bitmap ``since`` (if given) and
        a read-only view of the export, and return the view (module docstring). ``granularity``: the new
        bitmap's (default: that of ``since``, else 64 KiB); the view copies aside in granules of the same size
        (at most 1 MiB). ``limit``: the most bytes the view keeps aside before it breaks (default: its size, all
        of it). ``aside``: where (default ``aside_store_for``: memory for a small export, a scratch file in
        ``scratch_dir``, objects for S3). BitmapError for a bad or taken name, an unknown ``since``, a bad
        granularity or limit; OSError when the store cannot keep the new bitmap or no scratch file can be made;
        TimeoutError when writes in flight do not finish in time."""
        check_name(name)
        if since is not None:
            granularity = granularity or self._get(since).granularity
        granularity = check_granularity(granularity or DEFAULT_GRANULARITY)
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise BitmapError(f"a view's limit {limit!r} must be a number of bytes")
        self._check_free(name)
        size = self._size
        unit = min(granularity, _MAX_VIEW_GRANULE)
        store = aside if aside is not None else aside_store_for(self.inner, name, size, unit, self.scratch_dir)
        try:
            with self.quiesced():
                self._check_free(name)
                frozen = None if since is None else self._get(since).freeze()
                view = BackupView(name, self.inner, self._size, unit, store, size if limit is None else limit, frozen)
                self.bitmap_add(name, granularity)
                self._views[name] = view
                self._copying = tuple(self._views.values())
        except BaseException:
            store.close()
            raise
        return view

    def _check_free(self, name: str) -> None:
        if name in self._views:
            raise BitmapError(f"checkpoint {name!r} has a view already (release it first)")
        if name in self._bitmaps:
            raise BitmapError(f"bitmap {name!r} exists already")

    def release(self, name: str) -> ViewStatus:
        """End the view of checkpoint ``name``: its reads fail from now on, and what it kept aside is freed once
        those in progress are done; what it held, as it was (``ViewStatus``). Bitmap ``name`` goes on.
        BitmapError when there is no such view."""
        with self._admin:
            view = self._views.pop(name, None)
            if view is None:
                raise BitmapError(f"no checkpoint view named {name!r}")
            self._copying = tuple(self._views.values())
        status = view.status()
        view.close()
        return status

    def views(self) -> list[BackupView]:
        """Every checkpoint's view not yet released, in the order they were made."""
        return list(self._views.values())

    def view(self, name: str) -> BackupView:
        """The view of checkpoint ``name`` (BitmapError when there is none)."""
        view = self._views.get(name)
        if view is None:
            raise BitmapError(f"no checkpoint view named {name!r}")
        return view

    def _get(self, name: str) -> DirtyBitmap:
        bitmap = self._bitmaps.get(name)
        if bitmap is None:
            raise BitmapError(f"no bitmap named {name!r}")
        return bitmap

    def close(self) -> None:
        for name in list(self._views):
            self.release(name)
        try:
            super().close()
        finally:
            self.store.close()
