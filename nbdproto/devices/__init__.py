"""nbdproto.devices: the block devices both servers serve, and the wrappers that compose them.

Every device implements one synchronous protocol, ``nbdproto.BlockDevice`` (re-exported here); the threads
server calls it from its connection threads, the anyio server from worker threads or, for devices that never
block, inline. ``MemoryDevice`` is a sparse disk in memory; ``FileDevice`` a regular file or block device;
``NbdDevice`` an export of another NBD server; ``MirrorDevice`` serves one device while copying it to another.

This package does I/O (files, memory maps, threads), unlike the engine in ``nbdproto`` itself, which never
imports it. Its names are loaded on first use (PEP 562): a client should not pay for ctypes and mmap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdproto import lazy_names

if TYPE_CHECKING:
    from nbdproto import BlockDevice, Buffer, DeviceCapabilities, Dispatch

    from ._file import FileDevice
    from ._memory import MemoryDevice
    from ._mirror import MirrorDevice, MirrorStatus, Progress
    from ._nbd import NbdDevice
    from ._ranges import check_range

_WHERE = {
    "BlockDevice": "nbdproto",
    "Buffer": "nbdproto",
    "DeviceCapabilities": "nbdproto",
    "Dispatch": "nbdproto",
    "check_range": "._ranges",
    "MemoryDevice": "._memory",
    "FileDevice": "._file",
    "MirrorDevice": "._mirror",
    "MirrorStatus": "._mirror",
    "Progress": "._mirror",
    "NbdDevice": "._nbd",
}

__all__ = [
    "BlockDevice",
    "Buffer",
    "DeviceCapabilities",
    "Dispatch",
    "check_range",
    "MemoryDevice",
    "FileDevice",
    "MirrorDevice",
    "MirrorStatus",
    "Progress",
    "NbdDevice",
]

__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
