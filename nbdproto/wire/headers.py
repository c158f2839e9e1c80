"""Fast codecs for the fixed-size headers of the hot path, derived from the construct definitions in ``_wire``.

construct costs microseconds per message even compiled; a request header must cost what ``struct`` costs. So
each hot header's ``struct.Struct`` is computed here from its construct definition (field order, widths and
byte order all come from ``_wire``), and the magic number it must start with is read from the definition's
``Const``. The layout is written down once, in ``_wire``; tests check with hypothesis that both agree.

The engine calls ``codec.unpack_from`` / ``codec.pack`` (the ``struct.Struct`` bound methods themselves, so the
hot path pays nothing over raw struct) and compares the first field with ``codec.magic``.
"""

from __future__ import annotations

import struct
from typing import Any

import construct

from . import layout

__all__ = [
    "HeaderCodec",
    "header_codec",
    "REQUEST",
    "EXTENDED_REQUEST",
    "SIMPLE_REPLY",
    "STRUCTURED_REPLY",
    "EXTENDED_REPLY",
    "OPTION_REQUEST",
    "OPTION_REPLY",
    "OFFSET_DATA_PREFIX",
    "OFFSET_HOLE",
    "BLOCK_DESCRIPTOR",
    "EXTENT_DESCRIPTOR",
]


class HeaderCodec:
    """A ``struct.Struct`` for one fixed-size construct definition.

    ``names`` lists its fields in wire order; ``magic`` is the constant its first field must hold (None for
    definitions without one); ``pack`` and ``unpack_from`` are the struct's own bound methods.
    """

    __slots__ = ("name", "struct", "size", "names", "magic", "pack", "pack_into", "unpack_from")

    def __init__(self, name: str, definition: Any) -> None:
        fmt = ">"
        names: list[str] = []
        magic: int | None = None
        for sub in definition.subcons:
            field = sub.subcon if isinstance(sub, construct.Renamed) else sub
            if isinstance(field, construct.Const):
                if not names:
                    magic = field.value
                field = field.subcon
            if not isinstance(field, construct.FormatField) or field.fmtstr[0] != ">":
                raise TypeError(f"{name}: field {sub.name!r} is not a fixed big-endian integer")
            fmt += field.fmtstr[1:]
            names.append(sub.name)
        self.name = name
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self.names = tuple(names)
        self.magic = magic
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into
        self.unpack_from = self.struct.unpack_from

    def __repr__(self) -> str:
        return f"HeaderCodec({self.name}, {self.struct.format!r})"


def header_codec(name: str) -> HeaderCodec:
    """The fast codec for the ``_wire`` definition called ``name`` (fixed-size integer fields only)."""
    return HeaderCodec(name, layout.MESSAGES[name])


REQUEST = header_codec("RequestHeader")
EXTENDED_REQUEST = header_codec("ExtendedRequestHeader")
SIMPLE_REPLY = header_codec("SimpleReply")
STRUCTURED_REPLY = header_codec("StructuredReplyHeader")
EXTENDED_REPLY = header_codec("ExtendedReplyHeader")
OPTION_REQUEST = header_codec("OptionRequestHeader")
OPTION_REPLY = header_codec("OptionReplyHeader")
OFFSET_HOLE = header_codec("OffsetHolePayload")
BLOCK_DESCRIPTOR = header_codec("BlockDescriptor")
EXTENT_DESCRIPTOR = header_codec("ExtentDescriptor")
# OFFSET_DATA's payload is an offset then the data: its fixed prefix is the offset field alone.
OFFSET_DATA_PREFIX = HeaderCodec("OffsetDataPayload.offset", construct.Struct(layout.OffsetDataPayload.subcons[0]))
