"""Write spec/vectors/messages.json and the synthetic transcripts, deterministically, from nbdproto itself.

    python spec/vectors/generate.py

messages.json: hand-picked examples of every message definition (nbdproto.wire.layout.MESSAGES), each as hex and
decoded fields. transcripts/synthetic-*.json: whole conversations between a scripted client and
nbdproto.ServerConnection, including extended headers, which no packaged peer speaks yet. The captured
transcripts (transcripts/nbdkit-*.json) come from tests/capture.py instead.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import nbdproto as n
from nbdproto.wire import layout as w

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the transcript splitter lives with the tests

from tests.transcript import decode_transcript, jsonable, to_json  # noqa: E402

EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "OldstyleGreeting": [{"size": 1 << 30, "flags": 0x0003}],
    "NewstyleGreeting": [{"handshake_flags": 3}, {"handshake_flags": 1}],
    "ClientFlagsMessage": [{"client_flags": 3}, {"client_flags": 1}],
    "OptionRequestHeader": [{"option": 7, "length": 8}],
    "OptionRequest": [{"option": 3, "data": b""}, {"option": 1, "data": b"disk"}],
    "OptionReplyHeader": [{"option": 7, "reply_type": 1, "length": 0}],
    "OptionReply": [
        {"option": 3, "reply_type": 2, "data": b"\0\0\0\4disk"},
        {"option": 99, "reply_type": 2**31 + 1, "data": b""},
    ],
    "EmptyPayload": [{}],
    "ExportNamePayload": [{"name": "disk"}, {"name": ""}],
    "InfoRequestPayload": [{"name": "disk", "requests": [1, 2, 3]}, {"name": "", "requests": []}],
    "MetaContextPayload": [{"name": "disk", "queries": ["base:allocation"]}, {"name": "disk", "queries": []}],
    "ServerPayload": [{"name": "disk", "description": "a test disk"}, {"name": "", "description": ""}],
    "InfoExportPayload": [{"size": 1 << 30, "transmission_flags": 0x0D6D}],
    "InfoNamePayload": [{"name": "disk"}],
    "InfoDescriptionPayload": [{"description": "a test disk"}],
    "InfoBlockSizePayload": [{"minimum": 512, "preferred": 4096, "maximum": 33554432}],
    "MetaContextReplyPayload": [
        {"context_id": 1, "name": "base:allocation"},
        {"context_id": 0, "name": "base:allocation"},
    ],
    "ErrorReplyPayload": [{"message": "unknown export"}, {"message": ""}],
    "ExportNameReply": [{"size": 1 << 30, "transmission_flags": 0x0003}],
    "ExportNameReplyNoZeroes": [{"size": 1 << 30, "transmission_flags": 0x0003}],
    "RequestHeader": [
        {"flags": 0, "type": 0, "cookie": 1, "offset": 4096, "length": 4096},
        {"flags": 1, "type": 1, "cookie": 2, "offset": 0, "length": 512},
        {"flags": 0, "type": 2, "cookie": 0, "offset": 0, "length": 0},
    ],
    "ExtendedRequestHeader": [
        {"flags": 0x20, "type": 1, "cookie": 3, "offset": 0, "length": 512},
        {"flags": 0, "type": 6, "cookie": 4, "offset": 0, "length": 1 << 40},
    ],
    "BlockStatusRequestPayload": [{"effect_length": 1 << 30, "context_ids": [1, 2]}],
    "SimpleReply": [{"error": 0, "cookie": 1}, {"error": 22, "cookie": 5}],
    "StructuredReplyHeader": [{"flags": 1, "type": 1, "cookie": 1, "length": 4104}],
    "ExtendedReplyHeader": [{"flags": 1, "type": 6, "cookie": 7, "offset": 0, "length": 40}],
    "OffsetDataPayload": [{"offset": 4096, "data": b"hello"}],
    "OffsetHolePayload": [{"offset": 8192, "hole_size": 65536}],
    "BlockDescriptor": [{"length": 65536, "status": 3}],
    "BlockStatusPayload": [
        {"context_id": 1, "descriptors": [{"length": 4096, "status": 0}, {"length": 61440, "status": 3}]}
    ],
    "ExtentDescriptor": [{"length": 1 << 33, "status": 3}],
    "BlockStatusExtPayload": [
        {"context_id": 1, "descriptors": [{"length": 1 << 33, "status": 0}, {"length": 4096, "status": 3}]}
    ],
    "ErrorChunkPayload": [{"error": 5, "message": "disk on fire"}, {"error": 22, "message": ""}],
    "ErrorOffsetChunkPayload": [{"error": 5, "message": "bad sector", "offset": 12288}],
}


def messages() -> list[dict[str, Any]]:
    missing = sorted(set(w.MESSAGES) - set(EXAMPLES))
    if missing:
        raise SystemExit(f"no example for {missing}")
    out = []
    for name in sorted(EXAMPLES):
        for fields in EXAMPLES[name]:
            data = w.encode(w.MESSAGES[name], fields)
            out.append({"message": name, "hex": data.hex(), "fields": jsonable(w.decode(w.MESSAGES[name], data))})
    return out


def _option(code: int, payload: bytes = b"") -> bytes:
    return w.encode(w.OptionRequestHeader, {"option": code, "length": len(payload)}) + payload


def _request(extended: bool, flags: int, kind: int, cookie: int, offset: int, length: int) -> bytes:
    fields = {"flags": flags, "type": kind, "cookie": cookie, "offset": offset, "length": length}
    return w.encode(w.ExtendedRequestHeader if extended else w.RequestHeader, fields)


def conversation(extended: bool) -> list[tuple[str, bytes]]:
    """A scripted client against ServerConnection: greeting, flags, reply-format option, meta context, GO,
    then a write, a read, block status, a request past the end, and DISC. Returns the ordered chunks."""
    server = n.ServerConnection(exports=["disk"])
    chunks: list[tuple[str, bytes]] = []
    export = n.Export("disk", 1 << 20, n.TransmissionFlags.HAS_FLAGS | n.TransmissionFlags.SEND_FLUSH, "synthetic",
                      meta_contexts=(n.BASE_ALLOCATION,))  # fmt: skip

    def client(data: bytes) -> None:
        chunks.append(("c2s", data))
        server.receive_data(data)
        while True:
            event = server.next_event()
            if event is n.NEED_DATA or event is n.PAUSED or isinstance(event, n.ConnectionClosed):
                break
            if isinstance(event, n.ExportRequested):
                server.send(export)
            elif isinstance(event, n.ReadRequest):
                server.send(n.ReadData(event.cookie, event.offset, b"\xab" * event.length))
            elif isinstance(event, n.BlockStatusRequest):
                extents = (n.Extent(4096, 0), n.Extent(event.length - 4096, 3))
                server.send(n.BlockStatusReply(event.cookie, {i: extents for i in event.context_ids}))
            elif isinstance(event, (n.WriteRequest, n.FlushRequest)):
                server.send(n.SuccessReply(event.cookie))
        out = b"".join(bytes(p) for p in server.data_to_send())
        if out:
            chunks.append(("s2c", out))

    chunks.append(("s2c", b"".join(bytes(p) for p in server.data_to_send())))
    reply_option = n.Option.EXTENDED_HEADERS if extended else n.Option.STRUCTURED_REPLY
    client(struct.pack(">I", 3) + _option(reply_option))
    client(_option(n.Option.LIST))
    client(
        _option(
            n.Option.SET_META_CONTEXT, w.encode(w.MetaContextPayload, {"name": "disk", "queries": [n.BASE_ALLOCATION]})
        )
    )
    client(
        _option(
            n.Option.GO,
            w.encode(
                w.InfoRequestPayload, {"name": "disk", "requests": [n.InfoType.BLOCK_SIZE, n.InfoType.DESCRIPTION]}
            ),
        )
    )
    write_flags = n.CommandFlags.PAYLOAD_LEN if extended else 0
    client(_request(extended, write_flags, n.Command.WRITE, 1, 0, 5) + b"hello")
    client(_request(extended, 0, n.Command.READ, 2, 4096, 16))
    client(_request(extended, 0, n.Command.BLOCK_STATUS, 3, 0, 65536))
    client(_request(extended, 0, n.Command.FLUSH, 4, 0, 0))
    client(_request(extended, 0, n.Command.READ, 5, 1 << 20, 512))
    client(_request(extended, 0, n.Command.DISC, 6, 0, 0))
    return chunks


def main() -> None:
    (HERE / "messages.json").write_text(json.dumps(messages(), indent=1) + "\n")
    transcripts = HERE / "transcripts"
    transcripts.mkdir(exist_ok=True)
    for extended in (False, True):
        name = "extended" if extended else "structured"
        chunks = conversation(extended)
        document = {
            "description": f"synthetic-{name}: a scripted client and nbdproto.ServerConnection ({name} replies)",
            "peers": {"client": "scripted (spec/vectors/generate.py)", "server": "nbdproto.ServerConnection"},
            "chunks": [{"direction": d, "hex": data.hex()} for d, data in chunks],
            "messages": to_json(decode_transcript(chunks)),
        }
        (transcripts / f"synthetic-{name}.json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
