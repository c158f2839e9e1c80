"""Test helpers: build a client's raw bytes and read a server's raw bytes, straight from the wire layer.

These let the server engine be tested without the client engine (and the other way round), so a bug in one
role cannot hide a bug in the other.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from nbdproto.engine._server import ServerConnection
from nbdproto.wire import headers as h
from nbdproto.wire import layout as w
from nbdproto.wire._constants import ChunkType, ClientFlags, Command, Option, OptionReplyType


def option(code: int, data: bytes = b"") -> bytes:
    return h.OPTION_REQUEST.pack(h.OPTION_REQUEST.magic, code, len(data)) + data


def info_payload(name: str, *requests: int) -> bytes:
    return w.encode(w.InfoRequestPayload, {"name": name, "requests": list(requests)})


def meta_payload(name: str, *queries: str) -> bytes:
    return w.encode(w.MetaContextPayload, {"name": name, "queries": list(queries)})


def request(
    command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, *, extended: bool = False
) -> bytes:
    codec = h.EXTENDED_REQUEST if extended else h.REQUEST
    return codec.pack(codec.magic, flags, command, cookie, offset, length)


def client_flags(flags: int = ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


@dataclass
class OptionReply:
    option: int
    reply_type: int
    data: bytes


def option_replies(data: bytes) -> list[OptionReply]:
    """Split a server's option-haggling output into replies (the greeting must already be removed)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = h.OPTION_REPLY.unpack_from(data, pos)
        assert magic == h.OPTION_REPLY.magic, f"bad option reply magic at {pos}"
        pos += h.OPTION_REPLY.size
        out.append(OptionReply(opt, rtype, data[pos : pos + length]))
        pos += length
    return out


@dataclass
class Chunk:
    """One reply message of transmission: a simple reply (chunk_type None) or a structured/extended chunk."""

    cookie: int
    error: int = 0
    chunk_type: int | None = None
    flags: int = 0
    offset: int = 0
    payload: bytes = b""
    fields: Any = None
    data: bytes = field(default=b"", repr=False)


def replies(data: bytes, read_lengths: dict[int, int] | None = None) -> list[Chunk]:
    """Split a server's transmission output into replies. ``read_lengths`` (cookie -> length) says which simple
    replies carry read data."""
    read_lengths = read_lengths or {}
    out = []
    pos = 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == h.SIMPLE_REPLY.magic:
            _, error, cookie = h.SIMPLE_REPLY.unpack_from(data, pos)
            pos += h.SIMPLE_REPLY.size
            length = read_lengths.get(cookie, 0) if error == 0 else 0
            out.append(Chunk(cookie, error, data=data[pos : pos + length]))
            pos += length
            continue
        if magic == h.STRUCTURED_REPLY.magic:
            _, flags, ctype, cookie, length = h.STRUCTURED_REPLY.unpack_from(data, pos)
            offset = 0
            pos += h.STRUCTURED_REPLY.size
        else:
            assert magic == h.EXTENDED_REPLY.magic, f"bad reply magic {magic:#x}"
            _, flags, ctype, cookie, offset, length = h.EXTENDED_REPLY.unpack_from(data, pos)
            pos += h.EXTENDED_REPLY.size
        payload = data[pos : pos + length]
        pos += length
        fields = w.decode(w.CHUNK_PAYLOADS[ctype], payload) if ctype in w.CHUNK_PAYLOADS else None
        error = fields.error if ctype in (ChunkType.ERROR, ChunkType.ERROR_OFFSET) else 0
        out.append(Chunk(cookie, error, ctype, flags, offset, payload, fields))
    return out


def joined(conn: ServerConnection) -> bytes:
    return b"".join(bytes(p) for p in conn.data_to_send())


GREETING_SIZE = 18
__all__ = [
    "Command",
    "Option",
    "OptionReplyType",
    "option",
    "info_payload",
    "meta_payload",
    "request",
    "client_flags",
    "option_replies",
    "replies",
    "joined",
    "Chunk",
    "OptionReply",
    "GREETING_SIZE",
]
