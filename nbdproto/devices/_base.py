"""DeviceBase: the base of a device written from scratch, whose capabilities follow from what it implements.

``nbdproto.BlockDevice`` is a protocol: any object with its methods is a device, and its ``capabilities`` say
what servers advertise. Written by hand, those two can disagree (a ``DeviceCapabilities()`` offers
base:allocation, FLUSH and FUA by default, whatever the device has), and a client then gets EIO for what was
promised. A subclass of DeviceBase states nothing twice: it passes its size to ``__init__`` and defines
``pread_into``, and whichever of ``pwrite``, ``flush``, ``trim``, ``write_zeroes``, ``cache`` and ``extents``
it can do; ``capabilities`` is derived from which of them it defines, with the safe answer where it defines
none (nbdkit's plugins work the same way, ``server/plugins.c``):

- no ``pwrite``: read-only (writes are refused with EROFS before they reach the device);
- no ``flush``: no FLUSH and no FUA, unless the class says ``durable = True`` (every write is on stable storage
  once ``pwrite`` returns: a flush then has nothing to do, and FUA nothing to add);
- FUA where there is a flush only if the class says ``handles_fua = True`` (its ``pwrite``, ``trim`` and
  ``write_zeroes`` make their own data durable when ``fua`` is true); otherwise clients send FLUSH instead;
- no ``write_zeroes``: zeroing is done here with ``pwrite`` of zeros (FAST_ZERO is then not offered: a fast
  zero must fail rather than write); with one, FAST_ZERO only if the class says ``fast_zero = True``;
- no ``extents``: base:allocation says all of it is data (correct, if not informative), so ``nbdinfo --map``,
  ``nbdcopy`` and ``qemu-img`` get an answer; with one, the contexts are ``meta_contexts``;
- no ``trim``, no ``cache``: neither is advertised.

``multi_conn`` (off unless said: a completed write seen by every connection, a flush covering all; true of most
devices in one process), ``rotational``, the block sizes and ``dispatch`` are class attributes.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from nbdproto.serving import Buffer, DeviceCapabilities, Dispatch
from nbdproto.wire import BASE_ALLOCATION

__all__ = ["DeviceBase"]

_ZERO_CHUNK = 1 << 20
_ZEROES = bytes(_ZERO_CHUNK)


class DeviceBase(ABC):
    """A block device of ``size`` bytes whose capabilities follow from the methods its class defines (see the
    module docstring). Subclasses define ``pread_into`` and what else they can do."""

    durable: ClassVar[bool] = False
    """Every write is on stable storage once ``pwrite`` returns (FLUSH and FUA then need no ``flush``)."""
    handles_fua: ClassVar[bool] = False
    """The write calls honour ``fua=True`` themselves (with a ``flush``: FUA is advertised)."""
    fast_zero: ClassVar[bool] = False
    """The class's ``write_zeroes`` raises OSError(ENOTSUP) for ``fast=True`` unless it can zero at once."""
    multi_conn: ClassVar[bool] = False
    """Say True when every connection sees every other's completed writes and a flush covers all (one device
    object serves them all, so this holds unless the class keeps something per thread)."""
    rotational: ClassVar[bool] = False
    minimum_block_size: ClassVar[int] = 1
    preferred_block_size: ClassVar[int] = 4096
    maximum_payload: ClassVar[int] = 32 << 20
    meta_contexts: ClassVar[tuple[str, ...]] = (BASE_ALLOCATION,)
    """The contexts the class's own ``extents`` answers for (without one: base:allocation, all data)."""
    dispatch: Dispatch = "threads"
    """How servers call it (``nbdproto.Dispatch``): in worker threads unless the class knows it never blocks."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size {size} must not be negative")
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> DeviceCapabilities:
        """What the class's methods and attributes say the device can do (see the module docstring)."""
        own = self._defines
        writable = own("pwrite")
        flush = own("flush") or self.durable
        return DeviceCapabilities(
            can_write=writable,
            can_flush=flush,
            can_fua=self.durable or (own("flush") and self.handles_fua),
            can_trim=own("trim"),
            can_zero=writable,
            can_fast_zero=own("write_zeroes") and self.fast_zero,
            can_cache=own("cache"),
            can_multi_conn=self.multi_conn,
            rotational=self.rotational,
            minimum_block_size=self.minimum_block_size,
            preferred_block_size=self.preferred_block_size,
            maximum_payload=self.maximum_payload,
            meta_contexts=self.meta_contexts if own("extents") else (BASE_ALLOCATION,),
        )

    def _defines(self, method: str) -> bool:
        """Whether the subclass defines ``method`` itself, not only inherits this base's."""
        return getattr(type(self), method) is not getattr(DeviceBase, method)

    @abstractmethod
    def pread_into(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` with the bytes at ``offset``."""

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        raise OSError(errno.EROFS, f"{type(self).__name__} is read-only")

    def flush(self) -> None:
        """Nothing to do: the device is durable, or FLUSH is not advertised (the servers still flush every
        device when they stop)."""
        return None

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise OSError(errno.ENOTSUP, f"{type(self).__name__} cannot trim")

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        """Zeros written with ``pwrite``, a MiB at a time (a fast zero is refused: this is not one)."""
        if fast:
            raise OSError(errno.ENOTSUP, "zeroing is a write here, not fast")
        end = offset + length
        for at in range(offset, end, _ZERO_CHUNK):
            chunk = min(_ZERO_CHUNK, end - at)
            self.pwrite(memoryview(_ZEROES)[:chunk], at, fua and at + chunk == end)
        if fua and not self.handles_fua:
            self.flush()

    def cache(self, offset: int, length: int) -> None:
        """A hint, not advertised unless the subclass defines it."""
        return None

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """All of it is data (flags 0): true of any device, if it says nothing of holes."""
        return [(length, 0)]

    def close(self) -> None:
        """Nothing to release (subclasses with resources release them here)."""
        return None

    def __enter__(self) -> DeviceBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
