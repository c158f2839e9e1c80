"""ObjectBitmapStore: an S3 image's bitmaps as objects under the image's key.

Bitmap NAME of the image at KEY is ``KEY/bitmaps/NAME/header`` (JSON: the granularity, the image size it
covers, a generation number, the chunk size) and its bits in chunks of CHUNK bytes (the last one shorter),
``KEY/bitmaps/NAME/GGGGGGGG/IIIIIIII`` (generation and chunk index in hex); a chunk that does not exist is all
clean. The image's own objects (``KEY/%016x``) never collide with these names, and S3Device (like nbdkit's S3
plugin) passes them over.

Every write is conditional, so that two servers never update one bitmap unseen: marking granules dirty PUTs
each chunk it changes with If-Match on the ETag this store last saw (If-None-Match for a new chunk), and only
then does the write go to the image. A whole new record (a new bitmap, a clear, a resize) is written as chunks
of the next generation, then made current by one conditional PUT of the header (S3 PUTs are atomic: the old
record or the new one, never a mix); the old generation's chunks are deleted after, and any left over by a
crash when the store is next opened.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nbdproto.serving import Dispatch

from . import _bits
from ._bitmap import BitmapError, check_granularity, check_name
from ._store import BitmapSink, StoredBitmap

__all__ = ["ObjectBitmapStore", "Bucket", "CHUNK"]

CHUNK = 16 << 10
"""Bytes of bits per chunk object: 131072 granules, 8 GiB of image at 64 KiB granularity."""
_FORMAT = "nbdproto-dirty-bitmap"
_INDEX = re.compile(r"[0-9a-f]{8}")


class Bucket(Protocol):
    """The calls of S3Device's ``object_store`` this store makes."""

    def get_tagged(self, name: str) -> tuple[Any, str | None] | None: ...

    def put_if(self, name: str, data: bytes, etag: str | None) -> str | None: ...

    def delete(self, names: Sequence[str]) -> None: ...

    def list(self, prefix: str) -> Iterator[tuple[str, int]]: ...


@dataclass
class _Stored:
    """What this store knows of one bitmap's objects: its generation, and the ETags it wrote or read."""

    generation: int
    header: str | None
    chunks: dict[int, str | None] = field(default_factory=dict)


class ObjectBitmapStore:
    """The bitmaps of the image at ``key`` in ``bucket`` (S3Device's ``object_store``)."""

    dispatch: Dispatch = "threads"

    def __init__(self, bucket: Bucket, key: str, *, chunk: int = CHUNK) -> None:
        self._bucket = bucket
        self._prefix = f"{key}/bitmaps/"
        self._chunk = chunk
        self._stored: dict[str, _Stored] = {}
        self.where = f"{key}/bitmaps/"

    def _header_name(self, name: str) -> str:
        return f"{self._prefix}{name}/header"

    def _chunk_name(self, name: str, generation: int, index: int) -> str:
        return f"{self._prefix}{name}/{generation:08x}/{index:08x}"

    def load(self) -> list[StoredBitmap]:
        found: dict[str, list[str]] = {}
        for path, _ in self._bucket.list(self._prefix):
            name, _, rest = path[len(self._prefix) :].partition("/")
            found.setdefault(name, []).append(rest)
        records = []
        for name, objects in sorted(found.items()):
            try:
                check_name(name)
            except BitmapError:
                continue
            record = self._read(name, objects) if "header" in objects else None
            if record is None:  # the remains of a bitmap removed, or never made current
                self._bucket.delete([f"{self._prefix}{name}/{rest}" for rest in objects])
            else:
                records.append(record)
        return records

    def _read(self, name: str, objects: list[str]) -> StoredBitmap:
        where = self._header_name(name)
        got = self._bucket.get_tagged(where)
        if got is None:
            raise OSError(errno.EIO, "the bitmap header vanished while it was read", where)
        try:
            header = json.loads(bytes(got[0]))
            if header.get("format") != _FORMAT or header.get("version") != 1:
                raise ValueError("not a bitmap header of this format")
            granularity, size = check_granularity(header["granularity"]), header["size"]
            generation, chunk = header["generation"], header["chunk"]
            if not (isinstance(size, int) and size >= 0 and isinstance(generation, int) and chunk == self._chunk):
                raise ValueError("bad fields")
        except (ValueError, KeyError, TypeError, AttributeError, BitmapError) as exc:
            raise OSError(errno.EINVAL, f"the bitmap header is damaged ({exc})", where) from None
        state = _Stored(generation, got[1])
        bits = bytearray(_bits.byte_count(_bits.granule_count(size, granularity)))
        current = f"{generation:08x}/"
        stale = []
        for rest in objects:
            if rest == "header":
                continue
            if not rest.startswith(current) or not _INDEX.fullmatch(rest[len(current) :]):
                stale.append(f"{self._prefix}{name}/{rest}")
                continue
            index = int(rest[len(current) :], 16)
            start = index * self._chunk
            chunk = self._bucket.get_tagged(self._chunk_name(name, generation, index))
            if chunk is None:
                continue
            data = bytes(chunk[0])
            if start >= len(bits) or len(data) != min(self._chunk, len(bits) - start):
                where = self._chunk_name(name, generation, index)
                raise OSError(errno.EINVAL, "a bitmap chunk has the wrong size", where)
            bits[start : start + len(data)] = data
            state.chunks[index] = chunk[1]
        self._bucket.delete(stale)
        count = _bits.granule_count(size, granularity)
        if count & 7 and bits:
            bits[-1] &= (1 << (count & 7)) - 1
        self._stored[name] = state
        return StoredBitmap(name, granularity, size, bits)

    def create(self, record: StoredBitmap) -> BitmapSink:
        self._stored.pop(record.name, None)
        self._commit(record, _Stored(-1, None))
        return _ObjectSink(self, record.name)

    def sink(self, name: str) -> BitmapSink:
        return _ObjectSink(self, name)

    def update(self, name: str, bits: bytearray, spans: Sequence[tuple[int, int]]) -> None:
        """PUT every chunk the byte ``spans`` touch, each conditional on the version this store knows."""
        state = self._stored[name]
        size = self._chunk
        indices = sorted({i for start, end in spans for i in range(start // size, (end - 1) // size + 1)})
        for index in indices:
            data = bytes(bits[index * size : (index + 1) * size])
            where = self._chunk_name(name, state.generation, index)
            state.chunks[index] = self._put_unchanged(where, data, state.chunks.get(index))

    def _put_unchanged(self, where: str, data: bytes, etag: str | None) -> str:
        """PUT ``where`` only if it is still the version ``etag`` (None: absent); ESTALE when another writer
        changed it (a second server on the image: this one must stop)."""
        tag = self._bucket.put_if(where, data, etag)
        if tag is None:
            raise OSError(errno.ESTALE, "the object was changed by another writer", where)
        return tag

    def replace(self, record: StoredBitmap) -> None:
        self._commit(record, self._stored[record.name])

    def _commit(self, record: StoredBitmap, old: _Stored) -> None:
        """``record`` as the next generation: its chunks, then the header that makes it current, then the old
        generation's chunks deleted."""
        new = _Stored(old.generation + 1, None)
        size = self._chunk
        for index in range(0, -(-len(record.bits) // size)):
            data = bytes(record.bits[index * size : (index + 1) * size])
            if any(data):
                where = self._chunk_name(record.name, new.generation, index)
                new.chunks[index] = self._put_unchanged(where, data, None)
        header = {
            "format": _FORMAT,
            "version": 1,
            "granularity": record.granularity,
            "size": record.size,
            "generation": new.generation,
            "chunk": size,
        }
        text = json.dumps(header, sort_keys=True).encode()
        new.header = self._put_unchanged(self._header_name(record.name), text, old.header)
        self._stored[record.name] = new
        if old.generation >= 0:
            self._bucket.delete([self._chunk_name(record.name, old.generation, i) for i in old.chunks])

    def remove(self, name: str) -> None:
        self._bucket.delete([self._header_name(name)])
        self._stored.pop(name, None)
        prefix = f"{self._prefix}{name}/"
        self._bucket.delete([path for path, _ in self._bucket.list(prefix)])

    def close(self) -> None:
        pass


class _ObjectSink:
    """One bitmap's objects, kept up to date."""

    def __init__(self, store: ObjectBitmapStore, name: str) -> None:
        self._store, self._name = store, name

    def write(self, bits: bytearray, spans: Sequence[tuple[int, int]]) -> None:
        self._store.update(self._name, bits, spans)

    def replace(self, record: StoredBitmap) -> None:
        self._store.replace(record)
