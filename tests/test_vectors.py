"""spec/vectors: every stored vector is byte-exact, and real peers' bytes parse with the wire layer.

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

from nbdproto import _wire as w
from tests.capture import SCENARIOS, capture
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
    assert any(m.message in ("Request", "OptionRequestHeader") for m in messages)
    assert sum(len(m.data) for m in messages) == sum(len(data) for _, data in chunks)
