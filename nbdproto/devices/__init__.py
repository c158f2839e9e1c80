"""nbdproto.devices: the block devices both servers serve, and the wrappers that compose them.

Every device implements one synchronous protocol, ``nbdproto.BlockDevice`` (re-exported here); the threads
server calls it from its connection threads, the anyio server from worker threads or, for devices that never
block, inline. ``DeviceBase`` is the base of a device written from scratch, whose capabilities follow from the
methods it defines. ``MemoryDevice`` is a sparse disk in memory (``SharedMemoryDevice`` one that forked
processes share); ``FileDevice`` a regular file or block device;
``S3Device`` an image on S3-compatible object storage (the ``nbdproto[s3]`` extra).

Filters wrap a device and are devices themselves, so they stack (nbdkit's filters, in Python): ``Filter`` is
the pass-through base; ``CowFilter`` a copy-on-write overlay; ``ReadOnlyFilter``, ``DelayFilter``,
``ErrorFilter``, ``LogFilter``, ``StatsFilter`` and ``BlockSizeFilter`` are for running and testing services.
``NbdDevice`` an export of another NBD server; ``MirrorDevice`` serves one device while copying it to another.
Dirty bitmaps (changed-block tracking, for incremental backup) are a filter too, with stores of their own:
``nbdproto.devices.bitmaps``.

This package does I/O (files, memory maps, threads), unlike the engine in ``nbdproto`` itself, which never
imports it. Its names are loaded on first use (PEP 562): a client should not pay for ctypes and mmap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdproto.serving import lazy_names

if TYPE_CHECKING:
    from nbdproto.serving import BlockDevice, Buffer, DeviceCapabilities, Dispatch

    from ._base import DeviceBase
    from ._blocksize import BlockSizeFilter
    from ._cow import CowFilter
    from ._delay import DelayFilter
    from ._error import ErrorFilter
    from ._file import FileDevice
    from ._filter import FILTER_COMMANDS, Filter, slower_dispatch
    from ._log import LogFilter
    from ._memory import MemoryDevice
    from ._mirror import MirrorDevice
    from ._mirrorstatus import MirrorState, MirrorStatus, Progress
    from ._nbd import NbdDevice
    from ._ranges import check_range
    from ._readonly import ReadOnlyFilter
    from ._regions import RegionLocks
    from ._s3 import S3Device, S3Settings
    from ._s3lease import S3LeaseHeld
    from ._sharedmemory import SharedMemoryDevice
    from ._stats import CommandStats, StatsFilter

_WHERE = {
    "BlockDevice": "nbdproto",
    "Buffer": "nbdproto",
    "DeviceCapabilities": "nbdproto",
    "Dispatch": "nbdproto",
    "check_range": "._ranges",
    "DeviceBase": "._base",
    "MemoryDevice": "._memory",
    "FileDevice": "._file",
    "SharedMemoryDevice": "._sharedmemory",
    "Filter": "._filter",
    "FILTER_COMMANDS": "._filter",
    "slower_dispatch": "._filter",
    "CowFilter": "._cow",
    "ReadOnlyFilter": "._readonly",
    "RegionLocks": "._regions",
    "DelayFilter": "._delay",
    "ErrorFilter": "._error",
    "LogFilter": "._log",
    "StatsFilter": "._stats",
    "CommandStats": "._stats",
    "BlockSizeFilter": "._blocksize",
    "S3Device": "._s3",
    "S3Settings": "._s3",
    "S3LeaseHeld": "._s3lease",
    "MirrorDevice": "._mirror",
    "MirrorStatus": "._mirrorstatus",
    "MirrorState": "._mirrorstatus",
    "Progress": "._mirrorstatus",
    "NbdDevice": "._nbd",
}

__all__ = [
    "BlockDevice",
    "Buffer",
    "DeviceCapabilities",
    "Dispatch",
    "check_range",
    "DeviceBase",
    "MemoryDevice",
    "FileDevice",
    "SharedMemoryDevice",
    "Filter",
    "FILTER_COMMANDS",
    "slower_dispatch",
    "CowFilter",
    "ReadOnlyFilter",
    "RegionLocks",
    "DelayFilter",
    "ErrorFilter",
    "LogFilter",
    "StatsFilter",
    "CommandStats",
    "BlockSizeFilter",
    "S3Device",
    "S3Settings",
    "S3LeaseHeld",
    "MirrorDevice",
    "MirrorStatus",
    "MirrorState",
    "Progress",
    "NbdDevice",
]

if not TYPE_CHECKING:  # type checkers see the imports above; a __getattr__ would hide misspelt names
    __getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
