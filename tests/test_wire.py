"""Every construct definition in nbdproto.wire.layout: round trips both ways, and malformed input is a typed error.

A strategy per definition lives in STRATEGIES; the first test fails if a definition has none, so a new
message cannot slip in untested.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto as n
import nbdproto.wire
from nbdproto.wire import layout as w
from tests.specbytes import spec_bytes

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
# NBD strings are UTF-8 without NUL (spec: "Strings"); keep them short so examples stay fast.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
BYTES = st.binary(max_size=64)


def fields(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(strategies)


STRATEGIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "OldstyleGreeting": fields(size=U64, flags=U32),
    "NewstyleGreeting": fields(handshake_flags=U16),
    "ClientFlagsMessage": fields(client_flags=U32),
    "OptionRequestHeader": fields(option=U32, length=U32),
    "OptionRequest": fields(option=U32, data=BYTES),
    "OptionReplyHeader": fields(option=U32, reply_type=U32, length=U32),
    "OptionReply": fields(option=U32, reply_type=U32, data=BYTES),
    "EmptyPayload": st.just({}),
    "ExportNamePayload": fields(name=TEXT),
    "InfoRequestPayload": fields(name=TEXT, requests=st.lists(U16, max_size=8)),
    "MetaContextPayload": fields(name=TEXT, queries=st.lists(TEXT, max_size=5)),
    "ServerPayload": fields(name=TEXT, description=TEXT),
    "InfoExportPayload": fields(size=U64, transmission_flags=U16),
    "InfoNamePayload": fields(name=TEXT),
    "InfoDescriptionPayload": fields(description=TEXT),
    "InfoBlockSizePayload": fields(minimum=U32, preferred=U32, maximum=U32),
    "MetaContextReplyPayload": fields(context_id=U32, name=TEXT),
    "ErrorReplyPayload": fields(message=TEXT),
    "ExportNameReply": fields(size=U64, transmission_flags=U16),
    "ExportNameReplyNoZeroes": fields(size=U64, transmission_flags=U16),
    "RequestHeader": fields(flags=U16, type=U16, cookie=U64, offset=U64, length=U32),
    "ExtendedRequestHeader": fields(flags=U16, type=U16, cookie=U64, offset=U64, length=U64),
    "BlockStatusRequestPayload": fields(effect_length=U64, context_ids=st.lists(U32, max_size=8)),
    "SimpleReply": fields(error=U32, cookie=U64),
    "StructuredReplyHeader": fields(flags=U16, type=U16, cookie=U64, length=U32),
    "ExtendedReplyHeader": fields(flags=U16, type=U16, cookie=U64, offset=U64, length=U64),
    "OffsetDataPayload": fields(offset=U64, data=BYTES),
    "OffsetHolePayload": fields(offset=U64, hole_size=U32),
    "BlockDescriptor": fields(length=U32, status=U32),
    "BlockStatusPayload": fields(
        context_id=U32, descriptors=st.lists(fields(length=U32, status=U32), min_size=1, max_size=8)
    ),
    "ExtentDescriptor": fields(length=U64, status=U64),
    "BlockStatusExtPayload": fields(
        context_id=U32, descriptors=st.lists(fields(length=U64, status=U64), min_size=1, max_size=8)
    ),
    "ErrorChunkPayload": fields(error=U32, message=TEXT),
    "ErrorOffsetChunkPayload": fields(error=U32, message=TEXT, offset=U64),
}
NAMES = sorted(w.MESSAGES)


def normalise(value: Any) -> Any:
    """A construct Container/ListContainer as plain dicts and lists, without construct's private keys and
    without fields the definition computes (counts) or fixes (magics, zero padding)."""
    if isinstance(value, dict):
        return {
            k: normalise(v)
            for k, v in value.items()
            if not k.startswith("_") and k not in ("magic", "ihaveopt", "cliserv_magic", "zeroes", "info_type", "count")
        }
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def test_every_definition_has_a_strategy() -> None:
    assert sorted(STRATEGIES) == NAMES


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_parse_of_build_gives_back_the_fields(name: str, data: st.DataObject) -> None:
    definition = w.MESSAGES[name]
    value = data.draw(STRATEGIES[name])
    encoded = w.encode(definition, value)
    assert normalise(w.decode(definition, encoded)) == value


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_build_makes_the_spec_s_bytes(name: str, data: st.DataObject) -> None:
    """Against tests/specbytes.py, the spec's layouts written out with struct: not the definitions themselves."""
    value = data.draw(STRATEGIES[name])
    assert w.encode(w.MESSAGES[name], value) == spec_bytes(name, value)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_build_of_parse_gives_back_the_bytes(name: str, data: st.DataObject) -> None:
    definition = w.MESSAGES[name]
    encoded = w.encode(definition, data.draw(STRATEGIES[name]))
    assert w.encode(definition, w.decode(definition, encoded)) == encoded


@st.composite
def _spoilt(draw: st.DrawFn, name: str) -> bytes:
    """A valid message's bytes with a few bytes changed, cut off or added."""
    encoded = bytearray(w.encode(w.MESSAGES[name], draw(STRATEGIES[name])))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["change", "cut", "add"] if encoded else ["add"]))
        if how == "change":
            encoded[draw(st.integers(0, len(encoded) - 1))] = draw(st.integers(0, 255))
        elif how == "cut":
            del encoded[draw(st.integers(0, len(encoded) - 1)) :]
        else:
            encoded += draw(st.binary(min_size=1, max_size=4))
    return bytes(encoded)


def _garbage(name: str) -> st.SearchStrategy[bytes]:
    """Random bytes, and spoilt messages (most random bytes are refused on their length alone)."""
    return st.one_of(st.binary(max_size=80), _spoilt(name))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_bytes_are_one_message_exactly_or_a_remote_protocol_error(name: str, data: st.DataObject) -> None:
    """Bytes a decode accepts are a message, all of them, in its one encoding: built again from what was read,
    they come back byte for byte (nothing ignored, nothing read two ways: padding and magics as they must be).
    Any other bytes are a RemoteProtocolError that names the definition, never another exception."""
    definition = w.MESSAGES[name]
    garbage = data.draw(_garbage(name))
    try:
        value = w.decode(definition, garbage)
    except n.RemoteProtocolError as exc:
        assert str(exc).startswith(f"malformed {name}"), exc
    else:
        assert w.encode(definition, value) == garbage


# Definitions whose last field swallows the rest of the input: cutting a byte off is still valid for them.
_GREEDY_TAIL = {
    "ExportNamePayload",
    "ServerPayload",
    "InfoNamePayload",
    "InfoDescriptionPayload",
    "MetaContextReplyPayload",
    "ErrorReplyPayload",
    "OffsetDataPayload",
    "BlockStatusRequestPayload",
    "BlockStatusPayload",  # a list of descriptors: fewer of them is still well-formed (engines check the count)
}


@pytest.mark.parametrize("name", [name for name in NAMES if name not in _GREEDY_TAIL and name != "EmptyPayload"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_truncation_is_a_remote_protocol_error(name: str, data: st.DataObject) -> None:
    definition = w.MESSAGES[name]
    encoded = w.encode(definition, data.draw(STRATEGIES[name]))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(n.RemoteProtocolError, match=name):
        w.decode(definition, encoded[:cut])


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_trailing_bytes_are_refused(name: str, data: st.DataObject) -> None:
    definition = w.MESSAGES[name]
    encoded = w.encode(definition, data.draw(STRATEGIES[name]))
    if name in _GREEDY_TAIL or name in ("OptionRequest", "OptionReply"):
        return  # the last field takes whatever follows (or the length prefix covers only part of it)
    with pytest.raises(n.RemoteProtocolError, match=name):
        w.decode(definition, encoded + b"\0")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("NewstyleGreeting", b"NBDMAGIC" + b"IHAVEOPX" + b"\0\3"),
        ("OldstyleGreeting", b"NBDMAGIC" + b"\0" * 8 + bytes(8 + 4 + 124)),
        ("RequestHeader", struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 512)),
        ("SimpleReply", struct.pack(">IIQ", 0x96744668, 0, 1)),
        ("StructuredReplyHeader", struct.pack(">IHHQI", n.wire.SIMPLE_REPLY_MAGIC, 0, 0, 1, 0)),
        ("ExtendedRequestHeader", struct.pack(">IHHQQQ", n.wire.REQUEST_MAGIC, 0, 0, 1, 0, 0)),
        ("OptionRequestHeader", struct.pack(">QII", 0, 1, 0)),
        ("OptionReplyHeader", struct.pack(">QIII", n.wire.IHAVEOPT, 1, 1, 0)),
        ("ExportNameReply", struct.pack(">QH", 1, 1) + b"\1" * 124),
    ],
)
def test_wrong_magic_or_padding_is_refused(name: str, data: bytes) -> None:
    with pytest.raises(n.RemoteProtocolError, match=name):
        w.decode(w.MESSAGES[name], data)


LYING_LENGTHS = [
    ("InfoRequestPayload", struct.pack(">I", 0xFFFFFFFF) + b"disk"),
    ("InfoRequestPayload", struct.pack(">I", 0) + struct.pack(">H", 0xFFFF)),
    ("MetaContextPayload", struct.pack(">I", 0) + struct.pack(">I", 0xFFFFFFFF)),
    ("MetaContextPayload", struct.pack(">I", 0) + struct.pack(">II", 1, 0xFFFFFFFF) + b"base:"),
    ("ServerPayload", struct.pack(">I", 0xFFFFFFFF) + b"x"),
    ("OptionRequest", struct.pack(">QII", n.wire.IHAVEOPT, 3, 0xFFFFFFFF) + b"tiny"),
    ("OptionReply", struct.pack(">QIII", n.wire.OPTION_REPLY_MAGIC, 3, 1, 0xFFFFFFFF)),
    ("BlockStatusExtPayload", struct.pack(">II", 1, 0xFFFFFFFF) + bytes(16)),
    ("BlockStatusExtPayload", struct.pack(">II", 1, 2) + bytes(16)),
    ("ErrorChunkPayload", struct.pack(">IH", 5, 0xFFFF) + b"oops"),
    ("ErrorOffsetChunkPayload", struct.pack(">IH", 5, 3) + b"abc"),
    ("BlockStatusPayload", struct.pack(">I", 1) + bytes(7)),
]


@pytest.mark.parametrize(("name", "data"), LYING_LENGTHS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LYING_LENGTHS)])
def test_lengths_that_lie_are_refused_without_a_giant_allocation(name: str, data: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(n.RemoteProtocolError, match=name):
            w.decode(w.MESSAGES[name], data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding {len(data)} lying bytes peaked at {peak} bytes"


@pytest.mark.parametrize("name", ["ExportNamePayload", "ServerPayload", "ErrorReplyPayload", "InfoNamePayload"])
def test_invalid_utf8_is_a_remote_protocol_error(name: str) -> None:
    prefix = (
        struct.pack(">I", 2) if name == "ServerPayload" else struct.pack(">H", 1) if name == "InfoNamePayload" else b""
    )
    with pytest.raises(n.RemoteProtocolError, match=name):
        w.decode(w.MESSAGES[name], prefix + b"\xff\xfe")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RequestHeader", {"flags": 1 << 16, "type": 0, "cookie": 0, "offset": 0, "length": 0}),
        ("SimpleReply", {"error": -1, "cookie": 0}),
        ("ExportNamePayload", {"name": "\ud800"}),
        ("InfoBlockSizePayload", {"minimum": 1, "preferred": 2}),
    ],
)
def test_values_that_do_not_fit_are_a_local_protocol_error(name: str, value: dict[str, Any]) -> None:
    with pytest.raises(n.LocalProtocolError, match=name):
        w.encode(w.MESSAGES[name], value)
