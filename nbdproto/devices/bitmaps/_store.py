"""Where an export's bitmaps are kept between runs: the contract every store meets, and the in-memory one.

A store holds named records (a bitmap's granularity, the image size it covers, and its bits). The bitmap asks
three things of it, each durable when it returns (the crash guarantee rests on it):

- ``create``/``replace``: a whole record, atomically: after a crash, the old record or the new one, never a
  mix (a clear that half happened would make the bitmap under-report);
- ``BitmapSink.write``: some bytes of the bits, updated in place: a granule is marked dirty here BEFORE the
  write that dirties it goes to the device. Bits only ever go from 0 to 1 this way, so a torn update leaves
  each byte old or new, and either is safe;
- ``remove``.

Three stores: ``MemoryBitmapStore`` (nothing survives the process: for memory exports, whose data does not
either), ``SidecarBitmapStore`` (files in a directory beside the image, ``_sidecar``) and
``ObjectBitmapStore`` (objects under an S3 image's key, ``_objects``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nbdproto.serving import Dispatch

__all__ = ["StoredBitmap", "BitmapSink", "BitmapStore", "MemoryBitmapStore"]


@dataclass
class StoredBitmap:
    """One bitmap as a store keeps it: ``bits`` covers ``size`` bytes in granules of ``granularity``."""

    name: str
    granularity: int
    size: int
    bits: bytearray


class BitmapSink(Protocol):
    """The stored copy of one bitmap, kept up to date by it."""

    def write(self, bits: bytearray, spans: Sequence[tuple[int, int]]) -> None:
        """Make the stored bytes ``[start, end)`` of each span equal ``bits[start:end]``, durably, before
        returning (OSError when that cannot be done: the write that needed it then fails)."""

    def replace(self, record: StoredBitmap) -> None:
        """Replace the whole stored bitmap with ``record`` (same name), atomically and durably."""


class BitmapStore(Protocol):
    """The bitmaps of one export, kept somewhere. Used under the bitmap filter's locks: one call at a time."""

    @property
    def where(self) -> str:
        """Where the bitmaps are, for messages (a directory, an s3:// prefix, "memory")."""

    @property
    def dispatch(self) -> Dispatch:
        """How long its durable writes take: "inline" where they never wait on a disk or network."""

    def load(self) -> list[StoredBitmap]:
        """Every bitmap stored (OSError naming the record that cannot be read)."""

    def create(self, record: StoredBitmap) -> BitmapSink | None:
        """Store a new bitmap durably; its sink (None: nothing to keep up to date)."""

    def sink(self, name: str) -> BitmapSink | None:
        """The sink of a bitmap ``load`` returned."""

    def remove(self, name: str) -> None:
        """Forget the bitmap ``name`` durably."""

    def close(self) -> None:
        """Release what the store holds (files, locks)."""


class MemoryBitmapStore:
    """Bitmaps kept only in the server's memory: they end with the process, as a memory export's data does."""

    where = "memory"
    dispatch: Dispatch = "inline"

    def load(self) -> list[StoredBitmap]:
        return []

    def create(self, record: StoredBitmap) -> BitmapSink | None:
        return None

    def sink(self, name: str) -> BitmapSink | None:
        return None

    def remove(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass
