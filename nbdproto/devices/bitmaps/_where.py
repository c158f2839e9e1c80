"""Where an export's bitmaps live, chosen from the device that holds its data.

The innermost device of a filter stack (followed through each filter's ``inner``, and a mirror's
``primary``: the device it serves) says what the data is, and so where its bitmaps belong: beside it, where
they survive exactly as long as it does.

- a file (``FileDevice``): files in ``IMAGE.bitmaps/`` beside it, or in ``directory`` when given (a block
  device's node is no place for files: it needs one);
- an S3 image (``S3Device``): objects under its key, ``KEY/bitmaps/``;
- memory (``MemoryDevice``, ``SharedMemoryDevice``): in memory, since the data does not outlive the process
  either (a stored bitmap would call clean what a restart has zeroed);
- anything else (another server's export): in ``directory`` when given, else in memory.
"""

from __future__ import annotations

import os
import stat

from nbdproto.devices import FileDevice, MemoryDevice, MirrorDevice, S3Device, SharedMemoryDevice
from nbdproto.serving import BlockDevice

from ._objects import ObjectBitmapStore
from ._sidecar import SidecarBitmapStore, sidecar_of
from ._store import BitmapStore, MemoryBitmapStore

__all__ = ["source_of", "bitmap_store_for", "stored_beside"]


def source_of(device: BlockDevice) -> BlockDevice:
    """The device at the bottom of a stack of filters (and under a mirror, its primary)."""
    while True:
        below = getattr(device, "inner", None)
        if below is None and isinstance(device, MirrorDevice):
            below = device.primary
        if below is None:
            return device
        device = below


def stored_beside(device: BlockDevice) -> str | None:
    """The sidecar directory of the file under ``device`` if it has one (bitmaps an earlier run kept, which a
    server must go on tracking), else None."""
    source = source_of(device)
    if isinstance(source, FileDevice) and not isinstance(source, SharedMemoryDevice) and not is_block_device(source):
        directory = sidecar_of(source.path)
        if os.path.isdir(directory):
            return directory
    return None


def is_block_device(device: FileDevice) -> bool:
    return stat.S_ISBLK(os.fstat(device.fileno()).st_mode)


def bitmap_store_for(device: BlockDevice, directory: str | os.PathLike[str] | None = None) -> BitmapStore:
    """The store of the bitmaps of ``device`` (module docstring). OSError when the store cannot be opened
    (EBUSY: another server holds it), ValueError when ``directory`` is needed and missing, or given for
    memory."""
    source = source_of(device)
    if isinstance(source, (MemoryDevice, SharedMemoryDevice)):
        if directory is not None:
            raise ValueError("the bitmaps of a memory export live in memory (its data does not outlive the server)")
        return MemoryBitmapStore()
    if directory is not None:
        return SidecarBitmapStore(directory)
    if isinstance(source, FileDevice):
        if is_block_device(source):
            raise ValueError(f"{source.path} is a block device: its bitmaps need a directory (--bitmap-dir)")
        return SidecarBitmapStore(sidecar_of(source.path))
    if isinstance(source, S3Device):
        if not source.object_size:  # a single object, read-only: nothing is ever written
            return MemoryBitmapStore()
        return ObjectBitmapStore(source.object_store, source.key)
    return MemoryBitmapStore()
