"""Every NBD message as a declarative ``construct`` definition: the single source of truth for the byte layout.

Each definition is named after the spec's own name for the message and laid out field by field as the spec
draws it (all integers big-endian). Variable-length handshake messages are parsed and built with these
definitions directly; the fixed-size headers of the transmission phase are too hot for construct, so
``nbdproto.wire.headers`` derives ``struct.Struct`` codecs from the definitions here rather than restating them.

``decode`` and ``encode`` are the only entry points the rest of nbdproto uses: they turn every construct,
Unicode and overflow failure into ``RemoteProtocolError`` (bytes from the peer) or ``LocalProtocolError``
(values from our caller), so no other exception escapes.
"""

from __future__ import annotations

import io
from typing import Any

import construct

from ._constants import ChunkType, InfoType, Magic
from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MESSAGES",
    "decode",
    "encode",
    "OldstyleGreeting",
    "NewstyleGreeting",
    "ClientFlagsMessage",
    "OptionRequestHeader",
    "OptionRequest",
    "OptionReplyHeader",
    "OptionReply",
    "ExportNamePayload",
    "InfoRequestPayload",
    "MetaContextPayload",
    "EmptyPayload",
    "ServerPayload",
    "InfoExportPayload",
    "InfoNamePayload",
    "InfoDescriptionPayload",
    "InfoBlockSizePayload",
    "MetaContextReplyPayload",
    "ErrorReplyPayload",
    "ExportNameReply",
    "ExportNameReplyNoZeroes",
    "RequestHeader",
    "ExtendedRequestHeader",
    "SimpleReply",
    "StructuredReplyHeader",
    "ExtendedReplyHeader",
    "OffsetDataPayload",
    "OffsetHolePayload",
    "BlockDescriptor",
    "BlockStatusPayload",
    "ExtentDescriptor",
    "BlockStatusExtPayload",
    "ErrorChunkPayload",
    "ErrorOffsetChunkPayload",
    "BlockStatusRequestPayload",
]

# Strings on the wire are UTF-8 without a terminator (spec: "Strings").
_Utf8 = construct.GreedyString("utf8")


def _magic(value: int, field: Any) -> Any:
    return construct.Const(int(value), field)  # a plain int: construct compiles its repr into code


# --- Handshake: greeting and client flags --------------------------------------------------------------------

OldstyleGreeting = construct.Struct(
    "magic" / _magic(Magic.NBDMAGIC, construct.Int64ub),
    "cliserv_magic" / _magic(Magic.CLISERV_MAGIC, construct.Int64ub),
    "size" / construct.Int64ub,
    "flags" / construct.Int32ub,  # 16 bits of handshake-era flags, then 16 transmission flags
    "zeroes" / construct.Const(bytes(124)),
)
"""S: the whole oldstyle greeting (152 bytes); transmission starts right after it."""

NewstyleGreeting = construct.Struct(
    "magic" / _magic(Magic.NBDMAGIC, construct.Int64ub),
    "ihaveopt" / _magic(Magic.IHAVEOPT, construct.Int64ub),
    "handshake_flags" / construct.Int16ub,
)
"""S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (18 bytes)."""

ClientFlagsMessage = construct.Struct("client_flags" / construct.Int32ub)
"""C: the 32-bit client flags that answer a newstyle greeting."""

# --- Option haggling -----------------------------------------------------------------------------------------

OptionRequestHeader = construct.Struct(
    "magic" / _magic(Magic.IHAVEOPT, construct.Int64ub),
    "option" / construct.Int32ub,
    "length" / construct.Int32ub,
)
"""C: IHAVEOPT, option code, payload length (16 bytes); ``length`` payload bytes follow."""

OptionRequest = construct.Struct(
    "magic" / _magic(Magic.IHAVEOPT, construct.Int64ub),
    "option" / construct.Int32ub,
    "data" / construct.Prefixed(construct.Int32ub, construct.GreedyBytes),
)
"""C: a whole option request, header and payload."""

OptionReplyHeader = construct.Struct(
    "magic" / _magic(Magic.OPTION_REPLY, construct.Int64ub),
    "option" / construct.Int32ub,
    "reply_type" / construct.Int32ub,
    "length" / construct.Int32ub,
)
"""S: option reply magic, the option answered, reply type, payload length (20 bytes)."""

OptionReply = construct.Struct(
    "magic" / _magic(Magic.OPTION_REPLY, construct.Int64ub),
    "option" / construct.Int32ub,
    "reply_type" / construct.Int32ub,
    "data" / construct.Prefixed(construct.Int32ub, construct.GreedyBytes),
)
"""S: a whole option reply, header and payload."""

EmptyPayload = construct.Struct(construct.Terminated)
"""The payload of ABORT, LIST, STARTTLS, STRUCTURED_REPLY, EXTENDED_HEADERS and of NBD_REP_ACK: nothing."""

ExportNamePayload = construct.Struct("name" / _Utf8)
"""C: NBD_OPT_EXPORT_NAME's payload: the whole payload is the name."""

InfoRequestPayload = construct.Struct(
    "name" / construct.PascalString(construct.Int32ub, "utf8"),
    "requests" / construct.PrefixedArray(construct.Int16ub, construct.Int16ub),
    construct.Terminated,
)
"""C: NBD_OPT_INFO / NBD_OPT_GO: export name, then the information types the client asks for."""

MetaContextPayload = construct.Struct(
    "name" / construct.PascalString(construct.Int32ub, "utf8"),
    "queries" / construct.PrefixedArray(construct.Int32ub, construct.PascalString(construct.Int32ub, "utf8")),
    construct.Terminated,
)
"""C: NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name, then the context queries."""

ServerPayload = construct.Struct(
    "name" / construct.PascalString(construct.Int32ub, "utf8"),
    "description" / _Utf8,
)
"""S: NBD_REP_SERVER: an export's name, then (the rest of the payload) its description."""

InfoExportPayload = construct.Struct(
    "info_type" / construct.Const(InfoType.EXPORT.value, construct.Int16ub),
    "size" / construct.Int64ub,
    "transmission_flags" / construct.Int16ub,
)
"""S: NBD_REP_INFO carrying NBD_INFO_EXPORT: size and transmission flags (12 bytes)."""

InfoNamePayload = construct.Struct(
    "info_type" / construct.Const(InfoType.NAME.value, construct.Int16ub),
    "name" / _Utf8,
)
"""S: NBD_REP_INFO carrying NBD_INFO_NAME: the export's canonical name."""

InfoDescriptionPayload = construct.Struct(
    "info_type" / construct.Const(InfoType.DESCRIPTION.value, construct.Int16ub),
    "description" / _Utf8,
)
"""S: NBD_REP_INFO carrying NBD_INFO_DESCRIPTION."""

InfoBlockSizePayload = construct.Struct(
    "info_type" / construct.Const(InfoType.BLOCK_SIZE.value, construct.Int16ub),
    "minimum" / construct.Int32ub,
    "preferred" / construct.Int32ub,
    "maximum" / construct.Int32ub,
)
"""S: NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum payload block sizes."""

MetaContextReplyPayload = construct.Struct(
    "context_id" / construct.Int32ub,
    "name" / _Utf8,
)
"""S: NBD_REP_META_CONTEXT: the id the server chose, then the context's name."""

ErrorReplyPayload = construct.Struct("message" / _Utf8)
"""S: the optional human-readable message of an NBD_REP_ERR_* reply."""

ExportNameReply = construct.Struct(
    "size" / construct.Int64ub,
    "transmission_flags" / construct.Int16ub,
    "zeroes" / construct.Const(bytes(124)),
)
"""S: the answer to NBD_OPT_EXPORT_NAME when NO_ZEROES was not agreed (134 bytes)."""

ExportNameReplyNoZeroes = construct.Struct(
    "size" / construct.Int64ub,
    "transmission_flags" / construct.Int16ub,
)
"""S: the answer to NBD_OPT_EXPORT_NAME when both sides set NO_ZEROES (10 bytes)."""

# --- Transmission: requests ----------------------------------------------------------------------------------

RequestHeader = construct.Struct(
    "magic" / _magic(Magic.REQUEST, construct.Int32ub),
    "flags" / construct.Int16ub,
    "type" / construct.Int16ub,
    "cookie" / construct.Int64ub,
    "offset" / construct.Int64ub,
    "length" / construct.Int32ub,
)
"""C: the compact request header (28 bytes); a WRITE's ``length`` bytes of data follow."""

ExtendedRequestHeader = construct.Struct(
    "magic" / _magic(Magic.EXTENDED_REQUEST, construct.Int32ub),
    "flags" / construct.Int16ub,
    "type" / construct.Int16ub,
    "cookie" / construct.Int64ub,
    "offset" / construct.Int64ub,
    "length" / construct.Int64ub,
)
"""C: the extended request header (32 bytes); with PAYLOAD_LEN, ``length`` bytes of payload follow."""

BlockStatusRequestPayload = construct.Struct(
    "effect_length" / construct.Int64ub,
    "context_ids" / construct.GreedyRange(construct.Int32ub),
    construct.Terminated,
)
"""C: the payload of an extended NBD_CMD_BLOCK_STATUS with PAYLOAD_LEN: effect length, then context ids."""

# --- Transmission: replies -----------------------------------------------------------------------------------

SimpleReply = construct.Struct(
    "magic" / _magic(Magic.SIMPLE_REPLY, construct.Int32ub),
    "error" / construct.Int32ub,
    "cookie" / construct.Int64ub,
)
"""S: the simple reply header (16 bytes); a successful READ's data follows."""

StructuredReplyHeader = construct.Struct(
    "magic" / _magic(Magic.STRUCTURED_REPLY, construct.Int32ub),
    "flags" / construct.Int16ub,
    "type" / construct.Int16ub,
    "cookie" / construct.Int64ub,
    "length" / construct.Int32ub,
)
"""S: a structured reply chunk header (20 bytes); ``length`` bytes of chunk payload follow."""

ExtendedReplyHeader = construct.Struct(
    "magic" / _magic(Magic.EXTENDED_REPLY, construct.Int32ub),
    "flags" / construct.Int16ub,
    "type" / construct.Int16ub,
    "cookie" / construct.Int64ub,
    "offset" / construct.Int64ub,
    "length" / construct.Int64ub,
)
"""S: an extended reply chunk header (32 bytes); ``offset`` echoes the request's; ``length`` payload follows."""

OffsetDataPayload = construct.Struct(
    "offset" / construct.Int64ub,
    "data" / construct.GreedyBytes,
)
"""S: NBD_REPLY_TYPE_OFFSET_DATA: absolute offset, then the data (the rest of the chunk)."""

OffsetHolePayload = construct.Struct(
    "offset" / construct.Int64ub,
    "hole_size" / construct.Int32ub,
)
"""S: NBD_REPLY_TYPE_OFFSET_HOLE: absolute offset and size of a run that reads as zeroes (12 bytes)."""

BlockDescriptor = construct.Struct(
    "length" / construct.Int32ub,
    "status" / construct.Int32ub,
)
"""S: one 32-bit block status descriptor: extent length and status flags (8 bytes)."""

BlockStatusPayload = construct.Struct(
    "context_id" / construct.Int32ub,
    "descriptors" / construct.GreedyRange(BlockDescriptor),
    construct.Terminated,
)
"""S: NBD_REPLY_TYPE_BLOCK_STATUS: the meta context id, then its descriptors."""

ExtentDescriptor = construct.Struct(
    "length" / construct.Int64ub,
    "status" / construct.Int64ub,
)
"""S: one 64-bit block status descriptor of NBD_REPLY_TYPE_BLOCK_STATUS_EXT (16 bytes)."""

BlockStatusExtPayload = construct.Struct(
    "context_id" / construct.Int32ub,
    "count" / construct.Rebuild(construct.Int32ub, construct.len_(construct.this.descriptors)),
    # Refuse a count the payload cannot hold before looping over it (a lying count must not cost 4G iterations).
    construct.Check(
        lambda ctx: (
            not ctx._parsing or ctx.count * 16 <= construct.stream_size(ctx._io) - construct.stream_tell(ctx._io, None)
        )
    ),
    "descriptors" / construct.Array(construct.this.count, ExtentDescriptor),
    construct.Terminated,
)
"""S: NBD_REPLY_TYPE_BLOCK_STATUS_EXT: context id, descriptor count, then that many 64-bit descriptors."""

ErrorChunkPayload = construct.Struct(
    "error" / construct.Int32ub,
    "message" / construct.PascalString(construct.Int16ub, "utf8"),
    construct.Terminated,
)
"""S: NBD_REPLY_TYPE_ERROR: error value and a message for humans (may be empty)."""

ErrorOffsetChunkPayload = construct.Struct(
    "error" / construct.Int32ub,
    "message" / construct.PascalString(construct.Int16ub, "utf8"),
    "offset" / construct.Int64ub,
    construct.Terminated,
)
"""S: NBD_REPLY_TYPE_ERROR_OFFSET: error value, message, and the offset where the error happened."""

CHUNK_PAYLOADS: dict[int, Any] = {
    ChunkType.OFFSET_DATA: OffsetDataPayload,
    ChunkType.OFFSET_HOLE: OffsetHolePayload,
    ChunkType.BLOCK_STATUS: BlockStatusPayload,
    ChunkType.BLOCK_STATUS_EXT: BlockStatusExtPayload,
    ChunkType.ERROR: ErrorChunkPayload,
    ChunkType.ERROR_OFFSET: ErrorOffsetChunkPayload,
    ChunkType.NONE: EmptyPayload,
}
"""Chunk type -> the definition of its payload."""

MESSAGES: dict[str, Any] = {
    name: value for name, value in globals().items() if isinstance(value, construct.Construct) and name[0].isupper()
}
"""Every message definition by name: what the property tests and spec/vectors walk."""


def decode(fmt: Any, data: bytes | bytearray | memoryview) -> Any:
    """Parse ``data`` (bytes from the peer) with the definition ``fmt``.

    ``data`` must be exactly one message. Returns a construct ``Container``. Raises ``RemoteProtocolError``
    naming the definition and the fault for anything the bytes get wrong: too short, wrong magic, a length that
    runs past the end, bad UTF-8, or bytes left over after the message.
    """
    stream = io.BytesIO(bytes(data))
    try:
        value = fmt.parse_stream(stream)
    except (construct.ConstructError, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise RemoteProtocolError(f"malformed {_name(fmt)} ({len(data)} bytes): {_reason(exc)}") from None
    if stream.tell() != len(data):
        raise RemoteProtocolError(f"malformed {_name(fmt)}: {len(data) - stream.tell()} bytes left over")
    return value


def encode(fmt: Any, obj: Any) -> bytes:
    """Build the bytes of ``obj`` (a mapping of field values) with the definition ``fmt``.

    Raises ``LocalProtocolError`` when a value does not fit its field (negative, too wide, not encodable).
    """
    try:
        data: bytes = fmt.build(obj)
    except (construct.ConstructError, UnicodeEncodeError, ValueError, OverflowError, TypeError, KeyError) as exc:
        raise LocalProtocolError(f"cannot build {_name(fmt)}: {_reason(exc)}") from None
    return data


def _name(fmt: Any) -> str:
    for name, value in MESSAGES.items():
        if value is fmt:
            return name
    return type(fmt).__name__


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
