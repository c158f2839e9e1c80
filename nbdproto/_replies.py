"""Building the server's bytes: option replies of the handshake and reply chunks of transmission.

Pure functions from values to ``bytes``; the server connection decides *which* to send, these only know *how*.
Handshake payloads go through the construct definitions (rare, variable-length); transmission headers use
the fast codecs derived from them. A reply's data payload is never part of what these return: the caller
queues it as its own piece, so it is never copied.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from . import _headers as h
from . import _wire as w
from ._constants import ChunkType, InfoType, OptionReplyType, ReplyFlags
from ._events import Export, Extent

__all__ = [
    "option_reply",
    "info_replies",
    "simple_reply",
    "chunk_header",
    "offset_data_header",
    "offset_hole_chunk",
    "error_chunk",
    "block_status_chunk",
    "zero_pieces",
]

_OPTION_REPLY_MAGIC = h.OPTION_REPLY.magic
_SIMPLE_MAGIC = h.SIMPLE_REPLY.magic
_STRUCTURED_MAGIC = h.STRUCTURED_REPLY.magic
_EXTENDED_MAGIC = h.EXTENDED_REPLY.magic
_DONE = int(ReplyFlags.DONE)
_OFFSET_DATA = int(ChunkType.OFFSET_DATA)
# OFFSET_DATA chunk header and the payload's offset field, packed in one call.
_STRUCTURED_DATA = struct.Struct(h.STRUCTURED_REPLY.struct.format + h.OFFSET_DATA_PREFIX.struct.format[1:])
_EXTENDED_DATA = struct.Struct(h.EXTENDED_REPLY.struct.format + h.OFFSET_DATA_PREFIX.struct.format[1:])

_ZEROES = bytes(1 << 20)


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    """One option reply: header and payload (spec: "Option reply types")."""
    return h.OPTION_REPLY.pack(_OPTION_REPLY_MAGIC, option, reply_type, len(payload)) + payload


def info_replies(option: int, export: Export, flags: int, requests: Sequence[int]) -> list[bytes]:
    """The NBD_REP_INFO replies answering INFO/GO for ``export``: NBD_INFO_EXPORT always (with the
    transmission ``flags`` the server will use), then NAME, DESCRIPTION and BLOCK_SIZE where the client asked
    for them; unknown requests are ignored as the spec requires."""
    info = int(OptionReplyType.INFO)
    export_payload = w.encode(w.InfoExportPayload, {"size": export.size, "transmission_flags": flags})
    out = [option_reply(option, info, export_payload)]
    if InfoType.NAME in requests:
        out.append(option_reply(option, info, w.encode(w.InfoNamePayload, {"name": export.name})))
    if InfoType.DESCRIPTION in requests and export.description:
        payload = w.encode(w.InfoDescriptionPayload, {"description": export.description})
        out.append(option_reply(option, info, payload))
    if InfoType.BLOCK_SIZE in requests:
        out.append(option_reply(option, info, block_size_payload(export)))
    return out


def block_size_payload(export: Export) -> bytes:
    """NBD_INFO_BLOCK_SIZE's payload for ``export``."""
    sizes = {
        "minimum": export.minimum_block_size,
        "preferred": export.preferred_block_size,
        "maximum": export.maximum_payload,
    }
    return w.encode(w.InfoBlockSizePayload, sizes)


def simple_reply(error: int, cookie: int) -> bytes:
    """A simple reply header (a successful READ's data follows it as a separate piece)."""
    return h.SIMPLE_REPLY.pack(_SIMPLE_MAGIC, error, cookie)


def chunk_header(extended: bool, flags: int, chunk_type: int, cookie: int, offset: int, length: int) -> bytes:
    """A structured (20-byte) or extended (32-byte) reply chunk header; ``offset`` is the request's offset,
    used only by the extended form."""
    if extended:
        return h.EXTENDED_REPLY.pack(_EXTENDED_MAGIC, flags, chunk_type, cookie, offset, length)
    return h.STRUCTURED_REPLY.pack(_STRUCTURED_MAGIC, flags, chunk_type, cookie, length)


def offset_data_header(extended: bool, done: bool, cookie: int, request_offset: int, offset: int, size: int) -> bytes:
    """The header of an OFFSET_DATA chunk carrying ``size`` bytes at ``offset``, including the payload's
    offset field; the data itself follows as a separate piece."""
    flags = _DONE if done else 0
    if extended:
        return _EXTENDED_DATA.pack(_EXTENDED_MAGIC, flags, _OFFSET_DATA, cookie, request_offset, size + 8, offset)
    return _STRUCTURED_DATA.pack(_STRUCTURED_MAGIC, flags, _OFFSET_DATA, cookie, size + 8, offset)


def offset_hole_chunk(extended: bool, done: bool, cookie: int, request_offset: int, offset: int, size: int) -> bytes:
    """A whole OFFSET_HOLE chunk: ``size`` bytes at ``offset`` read as zeroes."""
    payload = h.OFFSET_HOLE.pack(offset, size)
    flags = _DONE if done else 0
    return chunk_header(extended, flags, ChunkType.OFFSET_HOLE, cookie, request_offset, len(payload)) + payload


def error_chunk(
    extended: bool, done: bool, cookie: int, request_offset: int, error: int, message: str, offset: int | None
) -> bytes:
    """A whole ERROR chunk, or ERROR_OFFSET when ``offset`` is given."""
    fields = {"error": error, "message": message}
    if offset is None:
        chunk_type, payload = ChunkType.ERROR, w.encode(w.ErrorChunkPayload, fields)
    else:
        chunk_type, payload = ChunkType.ERROR_OFFSET, w.encode(w.ErrorOffsetChunkPayload, {**fields, "offset": offset})
    flags = _DONE if done else 0
    return chunk_header(extended, flags, chunk_type, cookie, request_offset, len(payload)) + payload


def block_status_chunk(
    extended: bool, done: bool, cookie: int, request_offset: int, context_id: int, extents: Sequence[Extent]
) -> bytes:
    """A whole BLOCK_STATUS (32-bit descriptors) or, with extended headers, BLOCK_STATUS_EXT chunk."""
    n = len(extents)
    flat = [value for extent in extents for value in extent]
    if extended:
        payload = struct.pack(f">II{2 * n}Q", context_id, n, *flat)
        chunk_type = ChunkType.BLOCK_STATUS_EXT
    else:
        payload = struct.pack(f">I{2 * n}I", context_id, *flat)
        chunk_type = ChunkType.BLOCK_STATUS
    flags = _DONE if done else 0
    return chunk_header(extended, flags, chunk_type, cookie, request_offset, len(payload)) + payload


def zero_pieces(size: int) -> list[memoryview]:
    """``size`` zero bytes as slices of one shared buffer (holes in a simple read reply), never allocated anew."""
    view = memoryview(_ZEROES)
    pieces = []
    while size > 0:
        step = min(size, len(_ZEROES))
        pieces.append(view[:step])
        size -= step
    return pieces
