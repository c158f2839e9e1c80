"""nbdproto.devices.bitmaps: dirty bitmaps (changed-block tracking) for any device, served as qemu serves them.

``DirtyBitmapFilter`` wraps any device (a file, a block device, memory, an S3 image, another server's export,
a stack of filters) and records, per bitmap, every granule written, zeroed or trimmed since the bitmap started
or was cleared. Each bitmap NAME is offered as the meta context ``qemu:dirty-bitmap:NAME`` and answered as
qemu-nbd ``-B NAME`` answers it, so backup tools that read qemu's bitmaps (libnbd's nbdinfo, virtnbdbackup,
ovirt-imageio) read ours. Bitmaps are added, cleared, listed and removed while clients write; ``quiesced()``
gives the instant between two requests at which a checkpoint freezes one bitmap and starts the next.

Bitmaps are kept where the data is (``bitmap_store_for``): in files beside an image file
(``SidecarBitmapStore``), as objects under an S3 image's key (``ObjectBitmapStore``), in memory for memory
(``MemoryBitmapStore``). A granule is marked dirty in the store, durably, before the first write to it goes
to the device, so after a crash (SIGKILL, power loss) a bitmap never under-reports; the first write to a
granule pays for that, later ones cost a bit test. docs/howto/backup.md is the user's guide.

Checkpoints (``DirtyBitmapFilter.checkpoint``) start one bitmap and freeze another and a read-only view of the
export (``BackupView``) at one instant between two requests; the view keeps what later writes overwrite
(copy-before-write) in an ``AsideStore``: memory, a scratch file, or objects beside an S3 image.

Modules: ``_bits`` (the bit array), ``_bitmap`` (one bitmap), ``_store`` (the store contract, memory),
``_sidecar`` and ``_objects`` (files, S3 objects), ``_where`` (which store), ``_gate`` (writes in flight and
the instant between two requests), ``_view`` (a checkpoint's view), ``_aside`` (where views keep copies),
``_filter`` (the filter).
"""

from __future__ import annotations

from ._aside import SMALL_EXPORT, AsideStore, MemoryAside, ObjectAside, ScratchFileAside, aside_store_for
from ._bitmap import (
    CONTEXT_PREFIX,
    DEFAULT_GRANULARITY,
    MAX_GRANULARITY,
    MIN_GRANULARITY,
    BitmapError,
    BitmapInfo,
    DirtyBitmap,
    FrozenBitmap,
    check_granularity,
    check_name,
)
from ._filter import DirtyBitmapFilter
from ._objects import ObjectBitmapStore
from ._sidecar import SidecarBitmapStore, sidecar_of
from ._store import BitmapSink, BitmapStore, MemoryBitmapStore, StoredBitmap
from ._view import BackupView, ViewStatus
from ._where import bitmap_store_for, source_of, stored_beside

__all__ = [
    "DirtyBitmapFilter",
    "BackupView",
    "ViewStatus",
    "AsideStore",
    "MemoryAside",
    "ScratchFileAside",
    "ObjectAside",
    "aside_store_for",
    "SMALL_EXPORT",
    "DirtyBitmap",
    "FrozenBitmap",
    "BitmapInfo",
    "BitmapError",
    "BitmapStore",
    "BitmapSink",
    "StoredBitmap",
    "MemoryBitmapStore",
    "SidecarBitmapStore",
    "ObjectBitmapStore",
    "bitmap_store_for",
    "stored_beside",
    "source_of",
    "sidecar_of",
    "check_name",
    "check_granularity",
    "CONTEXT_PREFIX",
    "DEFAULT_GRANULARITY",
    "MIN_GRANULARITY",
    "MAX_GRANULARITY",
]
