"""spec/vectors: every stored vector is byte-exact, and real peers' bytes parse with the wire layer.

spec/vectors/generate.py writes the vectors with nbdproto itself, so against nbdproto they only show that
nothing changed; what makes them right is tests/specbytes.py, an encoder written from the spec's text alone: every
message vector, and every message of every transcript, is its bytes. The captured transcripts (nbdkit talking
to libnbd's tools) in turn check that encoder against a real peer.

- messages.json: each example decodes to its fields and encodes back to its bytes; every definition has one.
- transcripts/*.json: each conversation splits into messages (tests/transcript.py) that match the stored ones,
  byte for byte, and every message re-encodes to the same bytes.
- live: libnbd tools talking to nbdkit are captured now, through the recording proxy, and must parse fully.
- the synthetic transcripts replay through ServerConnection to the very same server bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from nbdproto.wire import layout as w
from tests.capture import SCENARIOS, capture
from tests.specbytes import spec_bytes
from tests.transcript import decode_transcript, jsonable, to_json

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
TRANSCRIPTS = sorted((VECTORS / "transcripts").glob("*.json"))
MESSAGES = json.loads((VECTORS / "messages.json").read_text())


def test_every_definition_has_a_vector() -> None:
    assert {m["message"] for m in MESSAGES} == set(w.MESSAGES)


@pytest.mark.parametrize("vector", MESSAGES, ids=[f"{m['message']}-{i}" for i, m in enumerate(MESSAGES)])
def test_message_vector_is_byte_exact(vector: dict[str, Any]) -> None:
    definition = w.MESSAGES[vector["message"]]
    data = bytes.fromhex(vector["hex"])
    decoded = w.decode(definition, data)
    assert jsonable(decoded) == vector["fields"]
    assert w.encode(definition, decoded) == data


@pytest.mark.parametrize("vector", MESSAGES, ids=[f"{m['message']}-{i}" for i, m in enumerate(MESSAGES)])
def test_message_vector_is_the_spec_s_layout(vector: dict[str, Any]) -> None:
    assert spec_bytes(vector["message"], vector["fields"]).hex() == vector["hex"]


def load_chunks(path: Path) -> list[tuple[str, bytes]]:
    document = json.loads(path.read_text())
    return [(c["direction"], bytes.fromhex(c["hex"])) for c in document["chunks"]]


def test_there_are_captured_and_synthetic_transcripts() -> None:
    names = {p.stem for p in TRANSCRIPTS}
    assert any(name.startswith("nbdkit-") for name in names), "no transcript captured from real peers"
    assert {"synthetic-structured", "synthetic-extended"} <= names


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript_splits_into_the_stored_messages(path: Path) -> None:
    document = json.loads(path.read_text())
    chunks = load_chunks(path)
    messages = decode_transcript(chunks)
    assert to_json(messages) == document["messages"]
    # The messages account for every byte, in order, and each re-encodes to its own bytes.
    for direction in ("c2s", "s2c"):
        sent = b"".join(data for d, data in chunks if d == direction)
        assert b"".join(m.data for m in messages if m.direction == direction) == sent
    for message in messages:
        if message.message != "Data":
            assert w.encode(w.MESSAGES[message.message], message.fields) == message.data


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_every_transcript_message_is_the_spec_s_layout(path: Path) -> None:
    """Captured ones: nbdkit's and libnbd's bytes are the spec's encoder's (which checks the encoder);
    synthetic ones: nbdproto's are too."""
    for message in decode_transcript(load_chunks(path)):
        if message.message != "Data":
            assert spec_bytes(message.message, message.fields) == message.data, message.message


@pytest.mark.parametrize("extended", [False, True], ids=["structured", "extended"])
def test_synthetic_transcripts_replay_through_the_server_engine(extended: bool) -> None:
    sys.path.insert(0, str(VECTORS))
    try:
        import generate
    finally:
        sys.path.remove(str(VECTORS))
    stored = load_chunks(VECTORS / "transcripts" / f"synthetic-{'extended' if extended else 'structured'}.json")
    assert generate.conversation(extended) == stored


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_live_capture_from_real_peers_parses_completely(scenario: str, peers: Any) -> None:
    peers("nbdkit", "nbdinfo", "nbdsh")
    chunks = capture(scenario)
    messages = decode_transcript(chunks)
    assert messages[0].message == "NewstyleGreeting"
    assert any(m.message in ("RequestHeader", "OptionRequestHeader") for m in messages)
    assert sum(len(m.data) for m in messages) == sum(len(data) for _, data in chunks)


def _client_event(message: Any, payload: Any) -> Any:
    """The ClientConnection event that makes the recorded client message (header plus payload)."""
    import nbdproto as n

    fields = message.fields
    if message.message == "OptionRequestHeader":
        code = fields.option
        if code in (n.Option.GO, n.Option.INFO):
            cls = n.OptionGo if code == n.Option.GO else n.OptionInfo
            return cls(
                payload.fields.name,
                tuple(n.InfoType(r) if r in set(n.InfoType) else r for r in payload.fields.requests),
            )
        if code in (n.Option.SET_META_CONTEXT, n.Option.LIST_META_CONTEXT):
            cls = n.OptionSetMetaContext if code == n.Option.SET_META_CONTEXT else n.OptionListMetaContext
            return cls(payload.fields.name, tuple(payload.fields.queries))
        if code == n.Option.EXPORT_NAME:
            return n.OptionExportName(payload.fields.name)
        simple = {
            n.Option.LIST: n.OptionList,
            n.Option.ABORT: n.OptionAbort,
            n.Option.STRUCTURED_REPLY: n.OptionStructuredReply,
            n.Option.EXTENDED_HEADERS: n.OptionExtendedHeaders,
            n.Option.STARTTLS: n.OptionStartTLS,
        }
        return simple[code]()
    kind, flags = n.Command(fields.type), n.CommandFlags(fields.flags & ~n.CommandFlags.PAYLOAD_LEN)
    cookie, offset, length = fields.cookie, fields.offset, fields.length
    return {
        n.Command.READ: lambda: n.ReadRequest(cookie, offset, length, flags),
        n.Command.WRITE: lambda: n.WriteRequest(cookie, offset, payload.data, flags),
        n.Command.DISC: lambda: n.DisconnectRequest(cookie),
        n.Command.FLUSH: lambda: n.FlushRequest(cookie, flags),
        n.Command.TRIM: lambda: n.TrimRequest(cookie, offset, length, flags),
        n.Command.CACHE: lambda: n.CacheRequest(cookie, offset, length, flags),
        n.Command.WRITE_ZEROES: lambda: n.WriteZeroesRequest(cookie, offset, length, flags),
        n.Command.BLOCK_STATUS: lambda: n.BlockStatusRequest(cookie, offset, length, flags),
    }[kind]()


CAPTURED = [p for p in TRANSCRIPTS if p.stem.startswith("nbdkit-")]


@pytest.mark.parametrize("path", CAPTURED, ids=[p.stem for p in CAPTURED])
def test_captured_transcripts_replay_through_the_client_engine(path: Path) -> None:
    """Driving ClientConnection with the options and requests libnbd sent must produce libnbd's very bytes,
    and nbdkit's answers must give one outcome event per option and request, and no protocol error."""
    import nbdproto as n

    chunks = load_chunks(path)
    messages = decode_transcript(chunks)
    client = n.ClientConnection()
    sent = b""
    outcomes: list[object] = []
    client_messages = iter([m for m in messages if m.direction == "c2s"])
    expected_c2s = b"".join(data for d, data in chunks if d == "c2s")
    for direction, data in chunks:
        if direction == "s2c":
            client.receive_data(data)
            while (event := client.next_event()) not in (n.NEED_DATA, n.PAUSED):
                outcomes.append(event)
                if isinstance(event, n.ConnectionClosed):
                    break
            sent += b"".join(bytes(p) for p in client.data_to_send())
            continue
        # The recorded client's messages in this chunk, as events (flags are automatic after the greeting).
        consumed = 0
        while consumed < len(data):
            message = next(client_messages)
            consumed += len(message.data)
            if (
                message.message in ("ClientFlagsMessage",)
                or message.message.endswith("Payload")
                or message.message == "Data"
            ):
                continue
            following = None
            if (message.message == "OptionRequestHeader" and message.fields.length) or (
                message.message == "RequestHeader" and message.fields.type == n.Command.WRITE
            ):
                following = next(client_messages)
                consumed += len(following.data)
            client.send(_client_event(message, following))
        sent += b"".join(bytes(p) for p in client.data_to_send())
    assert sent == expected_c2s
    assert not any(isinstance(e, n.OptionError) for e in outcomes)
    requests = [m for m in messages if m.message == "RequestHeader" and m.fields.type != n.Command.DISC]
    replies = [e for e in outcomes if isinstance(e, (n.ReadReply, n.BlockStatusReply, n.SuccessReply, n.ErrorReply))]
    assert len(replies) == len(requests)
