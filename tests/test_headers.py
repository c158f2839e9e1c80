"""The fast header codecs, on every value: they make the spec's bytes (tests/specbytes.py, written from the spec's
text and not from nbdproto.wire.layout) and read them back, and they agree with the construct definitions they
are derived from."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdproto.wire import headers as h
from nbdproto.wire import layout as w
from tests import specbytes

CODECS = [
    h.REQUEST,
    h.EXTENDED_REQUEST,
    h.SIMPLE_REPLY,
    h.STRUCTURED_REPLY,
    h.EXTENDED_REPLY,
    h.OPTION_REQUEST,
    h.OPTION_REPLY,
    h.OFFSET_HOLE,
    h.BLOCK_DESCRIPTOR,
    h.EXTENT_DESCRIPTOR,
]
_WIDTH = {"B": 8, "H": 16, "I": 32, "L": 32, "Q": 64}


SPEC_MAGIC = {
    "RequestHeader": specbytes.REQUEST_MAGIC,
    "ExtendedRequestHeader": specbytes.EXTENDED_REQUEST_MAGIC,
    "SimpleReply": specbytes.SIMPLE_REPLY_MAGIC,
    "StructuredReplyHeader": specbytes.STRUCTURED_REPLY_MAGIC,
    "ExtendedReplyHeader": specbytes.EXTENDED_REPLY_MAGIC,
    "OptionRequestHeader": specbytes.IHAVEOPT,
    "OptionReplyHeader": specbytes.OPTION_REPLY_MAGIC,
}


def field_values(codec: h.HeaderCodec) -> st.SearchStrategy[tuple[int, ...]]:
    """Random values for every field, the magic (if the message has one) the spec's."""
    strategies = []
    for i, code in enumerate(codec.struct.format[1:]):
        if i == 0 and codec.name in SPEC_MAGIC:
            strategies.append(st.just(SPEC_MAGIC[codec.name]))
        else:
            strategies.append(st.integers(0, (1 << _WIDTH[code]) - 1))
    return st.tuples(*strategies)


def test_every_message_with_a_magic_has_it_first() -> None:
    assert {c.name for c in CODECS if c.magic is not None} == set(SPEC_MAGIC)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@given(data=st.data())
def test_codec_makes_and_reads_the_spec_bytes(codec: h.HeaderCodec, data: st.DataObject) -> None:
    values = data.draw(field_values(codec))
    expected = specbytes.spec_bytes(codec.name, dict(zip(codec.names, values, strict=True)))
    assert codec.pack(*values) == expected
    assert codec.unpack_from(expected) == values
    assert codec.size == len(expected)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@given(data=st.data())
def test_codec_and_construct_agree(codec: h.HeaderCodec, data: st.DataObject) -> None:
    values = data.draw(field_values(codec))
    definition = w.MESSAGES[codec.name]
    fields = dict(zip(codec.names, values, strict=True))
    built = w.encode(definition, fields)
    assert codec.pack(*values) == built
    assert codec.unpack_from(built) == values
    parsed = w.decode(definition, built)
    assert tuple(parsed[name] for name in codec.names) == values


@pytest.mark.parametrize("codec", [c for c in CODECS if c.magic is not None], ids=lambda c: c.name)
def test_the_magic_is_the_spec_s(codec: h.HeaderCodec) -> None:
    assert codec.magic == SPEC_MAGIC[codec.name]
    assert codec.size == w.MESSAGES[codec.name].sizeof()


def test_offset_data_prefix_is_the_offset_field() -> None:
    assert h.OFFSET_DATA_PREFIX.struct.format == ">Q"
    expected = specbytes.spec_bytes("OffsetDataPayload", {"offset": 5, "data": b"xy"})
    assert h.OFFSET_DATA_PREFIX.pack(5) + b"xy" == expected == b"\0\0\0\0\0\0\0\x05xy"


def test_a_definition_that_is_not_fixed_size_has_no_fast_codec() -> None:
    with pytest.raises(TypeError, match="fixed"):
        h.header_codec("OptionRequest")


def test_codecs_cost_what_struct_costs() -> None:
    # They are struct's own bound methods: nothing sits between the engine and struct on the hot path.
    assert h.REQUEST.unpack_from == h.REQUEST.struct.unpack_from
    assert isinstance(h.REQUEST.struct, struct.Struct)
