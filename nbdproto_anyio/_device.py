"""The block-device protocol of the async backend, and the built-in async devices.

``AsyncBlockDevice`` mirrors nbdproto_threads.BlockDevice method for method, awaited. The built-in devices are
the sync ones behind ``AsyncDeviceAdapter`` (one implementation of each idea): memory calls run inline, since
they take microseconds and never block; file calls run in worker threads (``anyio.to_thread``), so a slow
disk never stalls the event loop. ``AsyncDeviceAdapter`` serves any sync device the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import anyio.to_thread

from nbdproto import BlockDevice, Buffer, DeviceCapabilities
from nbdproto.devices import FileDevice, MemoryDevice

__all__ = ["AsyncBlockDevice", "AsyncDeviceAdapter", "AsyncMemoryDevice", "AsyncFileDevice", "Dispatch"]


@runtime_checkable
class AsyncBlockDevice(Protocol):
    """A block device served over NBD (the async binding); see nbdproto_threads.BlockDevice for each method."""

    @property
    def size(self) -> int: ...

    @property
    def capabilities(self) -> DeviceCapabilities: ...

    async def pread_into(self, buffer: memoryview, offset: int) -> None: ...

    async def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None: ...

    async def cache(self, offset: int, length: int) -> None: ...

    async def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]: ...

    async def aclose(self) -> None: ...


Dispatch = Literal["inline", "batch", "threads"]


class AsyncDeviceAdapter:
    """Serves a sync ``BlockDevice`` asynchronously. ``dispatch`` says how the server should call it:

    - ``"inline"``: on the event loop itself, one request after another: for devices that answer in
      microseconds and never block (memory).
    - ``"batch"``: every request read in one go is carried out in one worker thread, in order, and the loop
      stays free: one thread hop per batch instead of per request. Best where each call is quick but may
      block (files in the page cache).
    - ``"threads"``: each request in its own worker thread, so slow requests overlap and replies go out as
      they complete (real disks, remote devices).

    ``use_threads=False`` is a shorthand for ``dispatch="inline"``.
    """

    def __init__(self, device: BlockDevice, *, use_threads: bool = True, dispatch: Dispatch | None = None) -> None:
        self.device = device
        self.dispatch: Dispatch = dispatch or ("threads" if use_threads else "inline")
        self.use_threads = self.dispatch != "inline"

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self.device.capabilities

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.use_threads:
            return method(*args, **kwargs)
        if kwargs:
            return await anyio.to_thread.run_sync(lambda: method(*args, **kwargs))
        return await anyio.to_thread.run_sync(method, *args)

    async def pread_into(self, buffer: memoryview, offset: int) -> None:
        await self._call(self.device.pread_into, buffer, offset)

    async def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        await self._call(self.device.pwrite, data, offset, fua)

    async def flush(self) -> None:
        await self._call(self.device.flush)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._call(self.device.trim, offset, length, fua)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        await self._call(self.device.write_zeroes, offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def cache(self, offset: int, length: int) -> None:
        await self._call(self.device.cache, offset, length)

    async def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        result: Sequence[tuple[int, int]] = await self._call(self.device.extents, context, offset, length)
        return result

    async def resize(self, size: int) -> None:
        await self._call(self.device.resize, size)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self._call(self.device.close)


class AsyncMemoryDevice(AsyncDeviceAdapter):
    """A sparse in-memory device (nbdproto_threads.MemoryDevice), served inline: it never blocks."""

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        super().__init__(MemoryDevice(size, read_only=read_only), use_threads=False)


class AsyncFileDevice(AsyncDeviceAdapter):
    """A file or block device (nbdproto_threads.FileDevice). By default its calls run inline when the file is
    on tmpfs or ramfs (memory copies that never wait on a disk), and in worker threads a batch at a time
    otherwise; ``dispatch="threads"`` makes requests overlap instead, for disks that gain from it."""

    def __init__(
        self, path: str | os.PathLike[str], *, read_only: bool = False, dispatch: Dispatch | None = None
    ) -> None:
        device = FileDevice(path, read_only=read_only)
        super().__init__(device, dispatch=dispatch or ("inline" if device.in_memory else "batch"))
