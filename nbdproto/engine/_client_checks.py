"""What a server states, checked by the client the moment it arrives, and before anything is sized from it.

A server's numbers are attacker-controlled: a minimum block size of 0 divides by zero, a hole of 4 GiB
allocates 4 GiB, a block status chunk of 2 Mi descriptors becomes 2 Mi Python objects. So each fact is checked
against the spec's rule for it (``RemoteProtocolError`` naming the value and the rule) before the client
relies on it or allocates from it, and each check costs time linear in what the server sent, with memory
bounded by what the client asked for:

- block-size constraints and the export size (spec: "Size constraints", NBD_INFO_EXPORT);
- meta context names: only contexts the client asked for (spec: "Metadata querying");
- a read's chunks: inside the request, never overlapping (``ReadCoverage``, which never rescans);
- block status descriptors: a count the request allows (known from the chunk length alone, so a chunk that
  cannot be valid is refused before its payload is read), non-zero lengths that are multiples of the minimum
  block size, the first N-1 summing to less than the requested length, the last ending inside the export.
"""

from __future__ import annotations

import struct
import sys
from array import array
from functools import reduce
from itertools import repeat
from operator import or_

from nbdproto.wire import ChunkType, RemoteProtocolError

from ._payloads import Extent

__all__ = [
    "MAX_MINIMUM_BLOCK_SIZE",
    "NO_PAYLOAD_LIMIT",
    "EXTENTS_KEPT",
    "check_block_sizes",
    "check_export_size",
    "check_context_name",
    "descriptor_count",
    "parse_block_status",
    "ReadCoverage",
]

MAX_MINIMUM_BLOCK_SIZE = 1 << 16
"""spec: the minimum block size MUST NOT be larger than 2^16."""
NO_PAYLOAD_LIMIT = 0xFFFFFFFF
"""spec: a maximum payload of 0xffffffff means "no fixed limit"; it need not be a multiple of the minimum."""
MAX_EXPORT_SIZE = (1 << 63) - 1
"""Sizes and offsets are signed 64-bit in every real implementation (off_t); libnbd and qemu refuse more."""
EXTENTS_KEPT = 1 << 16
"""Descriptors of one block status chunk handed to the caller; the rest are checked and dropped. A server may
itself answer for less than was asked (spec: NBD_REPLY_TYPE_BLOCK_STATUS), and callers go on from where the
answer ends, so this bounds memory (about 90 bytes an Extent) without losing anything but round trips."""
_STATUS_CHUNK_BYTES = 16 << 20
"""The largest block status payload read: 2^20 extended descriptors (the spec's SHOULD NOT limit) or 2^21
compact ones, all under the 2^25 bytes the spec asks clients not to treat as denial of service."""
_SMALL = 32
"""Up to this many descriptors are unpacked one by one; more go through one array (C loops, no tuples)."""

_DESCRIPTOR = {
    # chunk type: (bytes before the descriptors, bytes per descriptor, struct format, array typecode)
    ChunkType.BLOCK_STATUS: (4, 8, struct.Struct(">II"), "I"),
    ChunkType.BLOCK_STATUS_EXT: (8, 16, struct.Struct(">QQ"), "Q"),
}
assert array("I").itemsize == 4 and array("Q").itemsize == 8
_SWAP = sys.byteorder == "little"
_new_tuple = tuple.__new__


def _fail(message: str) -> None:
    raise RemoteProtocolError(message)


def _power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


def check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    """NBD_INFO_BLOCK_SIZE's three values against "Size constraints": the minimum a power of two from 1 to 64
    KiB, the preferred a power of two at least the minimum, the maximum payload a multiple of the minimum at
    least the preferred (or 0xffffffff, "no limit"). The spec also asks for a preferred size of at least 512;
    a smaller one is only advice the client can ignore, and our own server may advertise it, so it passes."""
    if not (_power_of_two(minimum) and minimum <= MAX_MINIMUM_BLOCK_SIZE):
        _fail(f"minimum block size {minimum} is not a power of two from 1 to {MAX_MINIMUM_BLOCK_SIZE} "
              "(spec: Size constraints)")  # fmt: skip
    if not (_power_of_two(preferred) and preferred >= minimum):
        _fail(f"preferred block size {preferred} is not a power of two at least the minimum {minimum} "
              "(spec: Size constraints)")  # fmt: skip
    if maximum != NO_PAYLOAD_LIMIT and (maximum % minimum or maximum < preferred):
        _fail(f"maximum payload {maximum} is not a multiple of the minimum block size {minimum} at least the "
              f"preferred {preferred} (spec: Size constraints)")  # fmt: skip


def check_export_size(size: int) -> None:
    """An export size every implementation can address (offsets are signed 64-bit)."""
    if size > MAX_EXPORT_SIZE:
        _fail(f"export size {size} exceeds the largest addressable size 2^63-1")


def _namespace(name: str) -> str:
    return name.partition(":")[0]


def check_context_name(name: str, queries: tuple[str, ...], listing: bool) -> None:
    """A context the server named in answer to LIST_META_CONTEXT (``listing``) or SET_META_CONTEXT must be a
    valid name that answers one of ``queries`` (spec: "Metadata querying"):

    - SET: the name asked for, or one a wildcard query ending in a colon covers outside ``base:`` (the spec
      says such queries SHOULD NOT select anything, which tolerates a server that does; ``base:`` MUST be
      ignored by SET);
    - LIST with no queries: any context; with queries: in ``base:``, the name asked for or any name for the
      ``base:`` wildcard; elsewhere a name in a namespace asked about (query syntax beyond ``base:`` is the
      server's to define).
    """
    namespace, colon, _ = name.partition(":")
    if not colon or not namespace:
        _fail(f"meta context name {name!r} is not namespace:leaf-name (spec: Metadata querying)")
    if listing and not queries:
        return
    for query in queries:
        if name == query:
            return
        if query.endswith(":") and name.startswith(query) and (listing or namespace != "base"):
            return
        if listing and namespace != "base" and _namespace(query) == namespace:
            return
    option = "NBD_OPT_LIST_META_CONTEXT" if listing else "NBD_OPT_SET_META_CONTEXT"
    _fail(f"{option} answered meta context {name!r}, which the client never asked for (asked: {list(queries)})")


def descriptor_count(chunk_type: int, length: int, requested: int, minimum: int, req_one: bool) -> int:
    """How many descriptors a block status chunk of ``length`` payload bytes holds, refused when the chunk
    cannot be valid for a request of ``requested`` bytes: a length that is not a whole number of descriptors
    (spec: NBD_REPLY_TYPE_BLOCK_STATUS: "4 + a positive integer multiple of 8"), more than one descriptor
    under REQ_ONE, or more descriptors than can start inside the request (each is at least ``minimum`` bytes
    and the first N-1 sum to less than the request). Called on the chunk header, before its payload is read."""
    prefix, size, _, _ = _DESCRIPTOR[ChunkType(chunk_type)]
    count, extra = divmod(length - prefix, size)
    name = ChunkType(chunk_type).name
    if length < prefix + size or extra:
        _fail(f"{name} chunk of {length} bytes is not {prefix} + a positive multiple of {size}")
    if length - prefix > _STATUS_CHUNK_BYTES:
        _fail(f"{name} chunk of {count} descriptors exceeds the {_STATUS_CHUNK_BYTES >> 20} MiB a client reads")
    if req_one and count != 1:
        _fail(f"{name} chunk of {count} descriptors answers a REQ_ONE request (exactly one allowed)")
    most = 1 + (requested - 1) // minimum
    if count > most:
        _fail(f"{name} chunk of {count} descriptors for a request of {requested} bytes: at most {most} can "
              f"start inside it (minimum block size {minimum}; the first N-1 sum to less than it)")  # fmt: skip
    return count


def parse_block_status(
    chunk_type: int,
    payload: memoryview,
    offset: int,
    requested: int,
    minimum: int,
    export_size: int,
    req_one: bool = False,
) -> tuple[int, tuple[Extent, ...]]:
    """The context id and extents of a block status chunk whose length ``descriptor_count`` accepted, for a
    request at ``offset`` of ``requested`` bytes. Checks every descriptor (spec: NBD_CMD_BLOCK_STATUS,
    NBD_REPLY_TYPE_BLOCK_STATUS): a non-zero length, a multiple of the minimum block size (but for one that
    ends at an unaligned end of the export), the first N-1 summing to less than the request (under REQ_ONE,
    the one descriptor no longer than the request), the last ending inside the export. Returns at most
    EXTENTS_KEPT extents; time is linear in the chunk, and no Python object is made per descriptor beyond
    those returned."""
    prefix, size, codec, typecode = _DESCRIPTOR[ChunkType(chunk_type)]
    count = (len(payload) - prefix) // size
    context_id = int.from_bytes(payload[:4], "big")
    if prefix == 8 and int.from_bytes(payload[4:8], "big") != count:
        _fail(f"BLOCK_STATUS_EXT chunk says {int.from_bytes(payload[4:8], 'big')} descriptors but holds {count}")
    body = payload[prefix:]
    words: array[int] | None = None
    if count <= _SMALL:
        extents: tuple[Extent, ...] = tuple(map(_new_tuple, repeat(Extent, count), codec.iter_unpack(body)))
        lengths: list[int] | array[int] = [extent[0] for extent in extents]
    else:
        words = array(typecode)
        words.frombytes(body)
        if _SWAP:
            words.byteswap()
        lengths = words[0::2]
    if min(lengths) == 0:
        _fail(f"block status descriptor {list(lengths).index(0)} of context {context_id} has length 0")
    before_last = sum(lengths[:-1])
    if before_last >= requested:
        _fail(f"the first {count - 1} extents of context {context_id} cover {before_last} bytes, not less than "
              f"the {requested} requested (spec: NBD_REPLY_TYPE_BLOCK_STATUS)")  # fmt: skip
    if req_one and lengths[0] > requested:
        _fail(f"the REQ_ONE extent of context {context_id} is {lengths[0]} bytes, longer than the {requested} "
              "requested")  # fmt: skip
    end = offset + before_last + lengths[-1]
    if end > export_size:
        _fail(f"the extents of context {context_id} end at {end}, past the end of the export ({export_size} bytes)")
    if minimum > 1:
        unaligned = reduce(or_, lengths[:-1], 0) | (lengths[-1] if end != export_size else 0)
        if unaligned % minimum:
            _fail(f"an extent of context {context_id} is not a multiple of the minimum block size {minimum}")
    if words is not None:
        kept = min(count, EXTENTS_KEPT)
        pairs = zip(lengths[:kept], words[1 : 2 * kept : 2], strict=True)
        extents = tuple(map(_new_tuple, repeat(Extent, kept), pairs))
    return context_id, extents


class ReadCoverage:
    """Which bytes of one read request the server's chunks have answered, refusing a chunk outside the request
    or over bytes already answered (spec: NBD_REPLY_TYPE_OFFSET_DATA / OFFSET_HOLE: "MUST NOT overlap").

    Chunks in order (every real server) only move a frontier; the first chunk out of order switches to a map of
    the request's bytes (one byte each, searched and marked with C loops). Each chunk costs O(1), or O(its size)
    once out of order: never a rescan of earlier chunks, and memory bounded by the request."""

    __slots__ = ("start", "end", "frontier", "covered", "_map")

    def __init__(self, start: int, length: int) -> None:
        self.start = start
        self.end = start + length
        self.frontier = start
        self.covered = 0
        self._map: bytearray | None = None

    def claim(self, offset: int, size: int) -> None:
        """Record the chunk ``offset``+``size`` (size > 0), or raise RemoteProtocolError."""
        if offset < self.start or offset + size > self.end:
            _fail(f"read chunk {offset}+{size} is outside the request {self.start}+{self.end - self.start}")
        answered = self._map
        if answered is None:
            if offset == self.frontier:
                self.frontier += size
                self.covered += size
                return
            if offset < self.frontier:
                _fail(f"read chunk {offset}+{size} overlaps bytes {self.start}-{self.frontier} already answered")
            answered = self._map = bytearray(self.end - self.start)
            answered[: self.frontier - self.start] = b"\x01" * (self.frontier - self.start)
        at = offset - self.start
        if answered.find(1, at, at + size) != -1:
            _fail(f"read chunk {offset}+{size} overlaps bytes an earlier chunk answered")
        answered[at : at + size] = b"\x01" * size
        self.covered += size
