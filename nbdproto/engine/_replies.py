"""Building the server's bytes: option replies of the handshake and reply chunks of transmission.

Pure functions from values to ``bytes``; the server connection decides *which* to send, these only know *how*.
Handshake payloads go through the construct definitions (rare, variable-length); transmission headers use
the fast codecs derived from them. A reply's data payload is never part of what these return: the caller
queues it as its own piece, so it is never copied.

Every string the server sends (option error messages, export names and descriptions, meta context names,
error chunk messages) is built here and passes through ``wire_string``, the one place that holds it to the
spec's rule for strings ("Conventions": UTF-8, no NUL, at most 4096 bytes).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

from nbdproto.wire import (
    MAX_STRING_LENGTH,
    ChunkType,
    InfoType,
    LocalProtocolError,
    OptionReplyType,
    ReplyFlags,
    headers,
    layout,
)

from ._handshake_events import Export, ExportListing
from ._payloads import Extent

__all__ = [
    "wire_string",
    "option_reply",
    "option_error",
    "server_reply",
    "meta_context_reply",
    "info_replies",
    "simple_reply",
    "chunk_header",
    "offset_data_header",
    "structured_whole_read",
    "extended_whole_read",
    "offset_hole_chunk",
    "error_chunk",
    "block_status_chunk",
    "zero_pieces",
]

_OPTION_REPLY_MAGIC = headers.OPTION_REPLY.magic
_SIMPLE_MAGIC = headers.SIMPLE_REPLY.magic
_STRUCTURED_MAGIC = headers.STRUCTURED_REPLY.magic
_EXTENDED_MAGIC = headers.EXTENDED_REPLY.magic
_DONE = int(ReplyFlags.DONE)
_OFFSET_DATA = int(ChunkType.OFFSET_DATA)
# OFFSET_DATA chunk header and the payload's offset field, packed in one call.
_STRUCTURED_DATA = struct.Struct(headers.STRUCTURED_REPLY.struct.format + headers.OFFSET_DATA_PREFIX.struct.format[1:])
_EXTENDED_DATA = struct.Struct(headers.EXTENDED_REPLY.struct.format + headers.OFFSET_DATA_PREFIX.struct.format[1:])

structured_whole_read = functools.partial(_STRUCTURED_DATA.pack, _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA)
"""(cookie, size + 8, offset) -> the header of one OFFSET_DATA chunk with DONE: a whole read answered at once."""
extended_whole_read = functools.partial(_EXTENDED_DATA.pack, _EXTENDED_MAGIC, _DONE, _OFFSET_DATA)
"""(cookie, offset, size + 8, offset) -> the same in the extended form (the request's offset, then the data's)."""

_ZEROES = bytes(1 << 20)


def wire_string(text: str, name: str | None = None, limit: int = MAX_STRING_LENGTH) -> str:
    """``text`` as a string may go on the wire (spec: "Conventions"): valid UTF-8 with no NUL, at most ``limit``
    bytes (4096, the spec's limit for every string, error messages included).

    Text for humans (an error message, a description) is made to fit: a NUL becomes U+FFFD, a character UTF-8
    cannot encode (a lone surrogate) becomes "?", and what is over the limit is cut at a character boundary,
    so a message quoting a 4096-byte export name still goes out, shortened. A name (``name`` says what it
    names, e.g. "export name") cannot be cut without naming something else, so one that does not fit is the
    application's error: LocalProtocolError.
    """
    if name is not None:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise LocalProtocolError(f"{name} {text[:64]!r} is not valid UTF-8") from None
        if size > limit or "\0" in text:
            raise LocalProtocolError(f"{name} {text[:64]!r}... of {size} bytes is over {limit} bytes or holds a NUL")
        return text
    if len(text) * 4 <= limit and text.isprintable():
        return text  # the common case: short enough whatever its characters, and nothing to replace
    encoded = text.replace("\0", "\ufffd").encode("utf-8", "replace")
    if len(encoded) <= limit:
        return encoded.decode()
    # A cut inside a multi-byte character leaves a partial sequence at the end; "ignore" drops it.
    return encoded[:limit].decode("utf-8", "ignore")


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    """One option reply: header and payload (spec: "Option reply types")."""
    return headers.OPTION_REPLY.pack(_OPTION_REPLY_MAGIC, option, reply_type, len(payload)) + payload


def option_error(option: int, reply_type: int, message: str) -> bytes:
    """An NBD_REP_ERR_* reply carrying ``message`` for humans (made to fit the string rule)."""
    return option_reply(option, reply_type, layout.encode(layout.ErrorReplyPayload, {"message": wire_string(message)}))


def server_reply(option: int, listing: ExportListing) -> bytes:
    """One NBD_REP_SERVER of the answer to NBD_OPT_LIST: the export's name and its description."""
    fields = {"name": wire_string(listing.name, "export name"), "description": wire_string(listing.description)}
    return option_reply(option, OptionReplyType.SERVER, layout.encode(layout.ServerPayload, fields))


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    """One NBD_REP_META_CONTEXT; ``name`` must be "namespace:leaf" (spec: "Metadata querying")."""
    if ":" not in name:
        raise LocalProtocolError(f"meta context name {name!r} has no namespace (namespace:leaf-name)")
    payload = layout.encode(
        layout.MetaContextReplyPayload, {"context_id": context_id, "name": wire_string(name, "meta context")}
    )
    return option_reply(option, OptionReplyType.META_CONTEXT, payload)


def info_replies(option: int, export: Export, flags: int, requests: Sequence[int], maximum_payload: int) -> list[bytes]:
    """The NBD_REP_INFO replies answering INFO/GO for ``export``: NBD_INFO_EXPORT always (with the
    transmission ``flags`` the server will use), then NAME, DESCRIPTION and BLOCK_SIZE where ``requests`` name
    them, each once; unknown requests are ignored as the spec requires."""
    info = int(OptionReplyType.INFO)
    export_payload = layout.encode(layout.InfoExportPayload, {"size": export.size, "transmission_flags": flags})
    out = [option_reply(option, info, export_payload)]
    if InfoType.NAME in requests:
        name = wire_string(export.name, "export name")
        out.append(option_reply(option, info, layout.encode(layout.InfoNamePayload, {"name": name})))
    if InfoType.DESCRIPTION in requests and export.description:
        payload = layout.encode(layout.InfoDescriptionPayload, {"description": wire_string(export.description)})
        out.append(option_reply(option, info, payload))
    if InfoType.BLOCK_SIZE in requests:
        out.append(option_reply(option, info, block_size_payload(export, maximum_payload)))
    return out


def block_size_payload(export: Export, maximum_payload: int) -> bytes:
    """NBD_INFO_BLOCK_SIZE's payload for ``export``, advertising ``maximum_payload`` (which the connection may
    have lowered from the export's own, see ServerHandshake)."""
    sizes = {
        "minimum": export.minimum_block_size,
        "preferred": export.preferred_block_size,
        "maximum": maximum_payload,
    }
    return layout.encode(layout.InfoBlockSizePayload, sizes)


def simple_reply(error: int, cookie: int) -> bytes:
    """A simple reply header (a successful READ's data follows it as a separate piece)."""
    return headers.SIMPLE_REPLY.pack(_SIMPLE_MAGIC, error, cookie)


def chunk_header(extended: bool, flags: int, chunk_type: int, cookie: int, offset: int, length: int) -> bytes:
    """A structured (20-byte) or extended (32-byte) reply chunk header; ``offset`` is the request's offset,
    used only by the extended form."""
    if extended:
        return headers.EXTENDED_REPLY.pack(_EXTENDED_MAGIC, flags, chunk_type, cookie, offset, length)
    return headers.STRUCTURED_REPLY.pack(_STRUCTURED_MAGIC, flags, chunk_type, cookie, length)


def offset_data_header(extended: bool, done: bool, cookie: int, request_offset: int, offset: int, size: int) -> bytes:
    """The header of an OFFSET_DATA chunk carrying ``size`` bytes at ``offset``, including the payload's
    offset field; the data itself follows as a separate piece."""
    flags = _DONE if done else 0
    if extended:
        return _EXTENDED_DATA.pack(_EXTENDED_MAGIC, flags, _OFFSET_DATA, cookie, request_offset, size + 8, offset)
    return _STRUCTURED_DATA.pack(_STRUCTURED_MAGIC, flags, _OFFSET_DATA, cookie, size + 8, offset)


def offset_hole_chunk(extended: bool, done: bool, cookie: int, request_offset: int, offset: int, size: int) -> bytes:
    """A whole OFFSET_HOLE chunk: ``size`` bytes at ``offset`` read as zeroes."""
    payload = headers.OFFSET_HOLE.pack(offset, size)
    flags = _DONE if done else 0
    return chunk_header(extended, flags, ChunkType.OFFSET_HOLE, cookie, request_offset, len(payload)) + payload


def error_chunk(
    extended: bool,
    done: bool,
    cookie: int,
    request_offset: int,
    error: int,
    message: str,
    offset: int | None,
    limit: int = MAX_STRING_LENGTH,
) -> bytes:
    """A whole ERROR chunk, or ERROR_OFFSET when ``offset`` is given; ``message`` is made to fit ``limit`` bytes
    (the string rule's 4096, or less where the maximum payload is smaller: spec, "Structured reply types")."""
    fields = {"error": error, "message": wire_string(message, limit=limit)}
    if offset is None:
        chunk_type, payload = ChunkType.ERROR, layout.encode(layout.ErrorChunkPayload, fields)
    else:
        chunk_type, payload = (
            ChunkType.ERROR_OFFSET,
            layout.encode(layout.ErrorOffsetChunkPayload, {**fields, "offset": offset}),
        )
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
