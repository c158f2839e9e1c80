"""The bytes of every NBD message, written from the text of the spec (proto.md, "Protocol phases" and
"Transmission"), with nothing but ``struct``: a second encoder, independent of nbdproto.wire.layout, to check
the layout, the fast header codecs and the stored vectors against.

Each function takes the fields by the names nbdproto.wire.layout gives them (its definitions compute counts,
lengths, magics and padding; so does this). The magic numbers are copied from the spec, not imported; the
captured nbdkit transcripts (spec/vectors/transcripts/nbdkit-*.json) check this encoder against a real peer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

# The spec's magic numbers, as it writes them.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", both the newstyle greeting's and each option's
CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

Fields = Mapping[str, Any]


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _raw(value: Any) -> bytes:
    """Raw data: bytes, or hex (as spec/vectors' JSON stores them)."""
    return bytes.fromhex(value) if isinstance(value, str) else bytes(value)


def _with_length(text: str) -> bytes:
    """A string with its 32-bit length before it (export names, meta context queries)."""
    data = _utf8(text)
    return struct.pack(">I", len(data)) + data


def _info(kind: int, rest: bytes) -> bytes:
    return struct.pack(">H", kind) + rest


SPEC: dict[str, Callable[[Fields], bytes]] = {
    # Handshake: "Oldstyle negotiation", "Newstyle negotiation", "Client flags".
    "OldstyleGreeting": lambda f: struct.pack(">QQQI", NBDMAGIC, CLISERV_MAGIC, f["size"], f["flags"]) + bytes(124),
    "NewstyleGreeting": lambda f: struct.pack(">QQH", NBDMAGIC, IHAVEOPT, f["handshake_flags"]),
    "ClientFlagsMessage": lambda f: struct.pack(">I", f["client_flags"]),
    # "Option haggling": the client's option, the server's reply.
    "OptionRequestHeader": lambda f: struct.pack(">QII", IHAVEOPT, f["option"], f["length"]),
    "OptionRequest": lambda f: struct.pack(">QII", IHAVEOPT, f["option"], len(_raw(f["data"]))) + _raw(f["data"]),
    "OptionReplyHeader": lambda f: struct.pack(">QIII", OPTION_REPLY_MAGIC, f["option"], f["reply_type"], f["length"]),
    "OptionReply": lambda f: (
        struct.pack(">QIII", OPTION_REPLY_MAGIC, f["option"], f["reply_type"], len(_raw(f["data"]))) + _raw(f["data"])
    ),
    # Option payloads.
    "EmptyPayload": lambda f: b"",
    "ExportNamePayload": lambda f: _utf8(f["name"]),  # NBD_OPT_EXPORT_NAME: the name is the whole data
    "InfoRequestPayload": lambda f: (
        _with_length(f["name"])  # NBD_OPT_INFO and NBD_OPT_GO
        + struct.pack(">H", len(f["requests"]))
        + b"".join(struct.pack(">H", r) for r in f["requests"])
    ),
    "MetaContextPayload": lambda f: (
        _with_length(f["name"])  # NBD_OPT_{LIST,SET}_META_CONTEXT
        + struct.pack(">I", len(f["queries"]))
        + b"".join(_with_length(q) for q in f["queries"])
    ),
    # Option reply payloads.
    "ServerPayload": lambda f: _with_length(f["name"]) + _utf8(f["description"]),  # NBD_REP_SERVER
    "InfoExportPayload": lambda f: _info(0, struct.pack(">QH", f["size"], f["transmission_flags"])),
    "InfoNamePayload": lambda f: _info(1, _utf8(f["name"])),
    "InfoDescriptionPayload": lambda f: _info(2, _utf8(f["description"])),
    "InfoBlockSizePayload": lambda f: _info(3, struct.pack(">III", f["minimum"], f["preferred"], f["maximum"])),
    "MetaContextReplyPayload": lambda f: struct.pack(">I", f["context_id"]) + _utf8(f["name"]),
    "ErrorReplyPayload": lambda f: _utf8(f["message"]),
    # The reply to NBD_OPT_EXPORT_NAME: 124 zero bytes unless both sides agreed to NO_ZEROES.
    "ExportNameReply": lambda f: struct.pack(">QH", f["size"], f["transmission_flags"]) + bytes(124),
    "ExportNameReplyNoZeroes": lambda f: struct.pack(">QH", f["size"], f["transmission_flags"]),
    # Transmission: "Request message", "Extended headers".
    "RequestHeader": lambda f: struct.pack(
        ">IHHQQI", REQUEST_MAGIC, f["flags"], f["type"], f["cookie"], f["offset"], f["length"]
    ),
    "ExtendedRequestHeader": lambda f: struct.pack(
        ">IHHQQQ", EXTENDED_REQUEST_MAGIC, f["flags"], f["type"], f["cookie"], f["offset"], f["length"]
    ),
    "BlockStatusRequestPayload": lambda f: (
        struct.pack(">Q", f["effect_length"]) + b"".join(struct.pack(">I", i) for i in f["context_ids"])
    ),
    # "Simple reply message", "Structured reply message", "Extended reply".
    "SimpleReply": lambda f: struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, f["error"], f["cookie"]),
    "StructuredReplyHeader": lambda f: struct.pack(
        ">IHHQI", STRUCTURED_REPLY_MAGIC, f["flags"], f["type"], f["cookie"], f["length"]
    ),
    "ExtendedReplyHeader": lambda f: struct.pack(
        ">IHHQQQ", EXTENDED_REPLY_MAGIC, f["flags"], f["type"], f["cookie"], f["offset"], f["length"]
    ),
    # "Structured reply types": the chunk payloads.
    "OffsetDataPayload": lambda f: struct.pack(">Q", f["offset"]) + _raw(f["data"]),
    "OffsetHolePayload": lambda f: struct.pack(">QI", f["offset"], f["hole_size"]),
    "BlockDescriptor": lambda f: struct.pack(">II", f["length"], f["status"]),
    "BlockStatusPayload": lambda f: (
        struct.pack(">I", f["context_id"])
        + b"".join(struct.pack(">II", d["length"], d["status"]) for d in f["descriptors"])
    ),
    "ExtentDescriptor": lambda f: struct.pack(">QQ", f["length"], f["status"]),
    "BlockStatusExtPayload": lambda f: (
        struct.pack(">II", f["context_id"], len(f["descriptors"]))
        + b"".join(struct.pack(">QQ", d["length"], d["status"]) for d in f["descriptors"])
    ),
    "ErrorChunkPayload": lambda f: struct.pack(">IH", f["error"], len(_utf8(f["message"]))) + _utf8(f["message"]),
    "ErrorOffsetChunkPayload": lambda f: (
        struct.pack(">IH", f["error"], len(_utf8(f["message"]))) + _utf8(f["message"]) + struct.pack(">Q", f["offset"])
    ),
}


def spec_bytes(name: str, fields: Fields) -> bytes:
    """The bytes of message ``name`` (nbdproto.wire.layout's name for it) with ``fields``, per the spec."""
    return SPEC[name](fields)
