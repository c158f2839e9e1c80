"""Split a recorded NBD conversation into messages, using only the wire layer's construct definitions.

A transcript is the ordered list of chunks each side sent. ``decode_transcript`` walks both byte streams,
tracking just enough state to know what comes next (the phase, whether structured replies or extended headers
were agreed, which option a reply answers, which cookies are reads), and returns every message with its
definition's name, its bytes and its decoded fields. It is independent of the connection engines, so a
transcript checks the wire layer on its own; it raises ValueError where bytes are left over or cannot be
decoded.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nbdproto.wire import layout as w
from nbdproto.wire._constants import (
    ChunkType,
    ClientFlags,
    Command,
    CommandFlags,
    InfoType,
    Magic,
    Option,
    OptionReplyType,
    ReplyFlags,
)

__all__ = ["Message", "decode_transcript", "to_json", "jsonable"]

_INFO_PAYLOADS = {
    InfoType.EXPORT: "InfoExportPayload",
    InfoType.NAME: "InfoNamePayload",
    InfoType.DESCRIPTION: "InfoDescriptionPayload",
    InfoType.BLOCK_SIZE: "InfoBlockSizePayload",
}
_CHUNK_NAMES = {int(k): next(n for n, d in w.MESSAGES.items() if d is v) for k, v in w.CHUNK_PAYLOADS.items()}


@dataclass
class Message:
    """One message of a transcript: who sent it, which definition it is, its bytes and what they say.
    ``message`` is "Data" for raw payload bytes (a write's data, a simple read reply's data)."""

    direction: str
    message: str
    data: bytes
    fields: Any


def jsonable(value: Any) -> Any:
    """A decoded construct value as JSON-friendly data: dicts, lists, ints, strings; bytes as hex."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return value


def to_json(messages: Iterable[Message]) -> list[dict[str, Any]]:
    return [
        {"direction": m.direction, "message": m.message, "hex": m.data.hex(), "fields": jsonable(m.fields)}
        for m in messages
    ]


class _Decoder:
    def __init__(self) -> None:
        self.buffers = {"c2s": bytearray(), "s2c": bytearray()}
        self.out: list[Message] = []
        self.server_phase = "greeting"
        self.client_phase = "flags"
        self.offered_no_zeroes = False
        self.no_zeroes = False
        self.structured = False
        self.extended = False
        self.options: deque[int] = deque()
        self.requests: dict[int, tuple[int, int, int]] = {}
        self.tls = False

    # --- helpers -----------------------------------------------------------------------------------------

    def take(self, direction: str, size: int) -> bytes | None:
        buf = self.buffers[direction]
        if len(buf) < size:
            return None
        data = bytes(buf[:size])
        del buf[:size]
        return data

    def emit(self, direction: str, name: str, data: bytes) -> Any:
        fields = w.decode(w.MESSAGES[name], data) if name != "Data" else None
        self.out.append(Message(direction, name, data, fields))
        return fields

    def have(self, direction: str, size: int) -> bool:
        return len(self.buffers[direction]) >= size

    # --- client to server ----------------------------------------------------------------------------------

    def client_step(self) -> bool:
        d = "c2s"
        if self.tls:
            return False
        if self.client_phase == "flags":
            data = self.take(d, 4)
            if data is None:
                return False
            flags = self.emit(d, "ClientFlagsMessage", data).client_flags
            self.no_zeroes = self.offered_no_zeroes and bool(flags & ClientFlags.NO_ZEROES)
            self.client_phase = "options"
            return True
        if self.client_phase == "options":
            if self.options and self.options[-1] in (Option.GO, Option.STARTTLS, Option.ABORT):
                return False  # nothing follows those until the server answers
            if not self.have(d, 16):
                return False
            _, option, length = struct.unpack(">QII", self.buffers[d][:16])
            if not self.have(d, 16 + length):
                return False
            self.emit(d, "OptionRequestHeader", self.take(d, 16) or b"")
            payload = self.take(d, length) or b""
            name = {
                Option.EXPORT_NAME: "ExportNamePayload",
                Option.INFO: "InfoRequestPayload",
                Option.GO: "InfoRequestPayload",
                Option.LIST_META_CONTEXT: "MetaContextPayload",
                Option.SET_META_CONTEXT: "MetaContextPayload",
            }.get(option, "EmptyPayload" if not payload else "Data")
            self.emit(d, name, payload)
            self.options.append(option)
            if option == Option.EXPORT_NAME:
                self.client_phase = "transmission"
            return True
        if self.client_phase == "transmission":
            size = 32 if self.extended else 28
            if not self.have(d, size):
                return False
            _magic, flags, kind, cookie, offset, length = struct.unpack(
                ">IHHQQQ" if self.extended else ">IHHQQI", self.buffers[d][:size]
            )
            payload = length if (flags & CommandFlags.PAYLOAD_LEN if self.extended else kind == Command.WRITE) else 0
            if not self.have(d, size + payload):
                return False
            self.emit(d, "ExtendedRequestHeader" if self.extended else "RequestHeader", self.take(d, size) or b"")
            if payload:
                data = self.take(d, payload) or b""
                self.emit(d, "BlockStatusRequestPayload" if kind == Command.BLOCK_STATUS else "Data", data)
            if kind != Command.DISC:
                self.requests[cookie] = (kind, offset, length)
            return True
        return False

    # --- server to client ----------------------------------------------------------------------------------

    def server_step(self) -> bool:
        d = "s2c"
        if self.tls:
            return False
        if self.server_phase == "greeting":
            if not self.have(d, 18):
                return False
            if struct.unpack(">Q", self.buffers[d][8:16])[0] == Magic.CLISERV_MAGIC:
                data = self.take(d, 152)
                if data is None:
                    return False
                self.emit(d, "OldstyleGreeting", data)
                self.server_phase = self.client_phase = "transmission"
                return True
            flags = self.emit(d, "NewstyleGreeting", self.take(d, 18) or b"").handshake_flags
            self.offered_no_zeroes = bool(flags & 2)
            self.server_phase = "options"
            return True
        if self.server_phase == "options":
            if self.options and self.options[0] == Option.EXPORT_NAME:
                size = 10 if self.no_zeroes else 134
                data = self.take(d, size)
                if data is None:
                    return False
                self.emit(d, "ExportNameReplyNoZeroes" if self.no_zeroes else "ExportNameReply", data)
                self.options.popleft()
                self.server_phase = "transmission"
                return True
            if not self.have(d, 20):
                return False
            _, option, reply_type, length = struct.unpack(">QIII", self.buffers[d][:20])
            if not self.have(d, 20 + length):
                return False
            self.emit(d, "OptionReplyHeader", self.take(d, 20) or b"")
            payload = self.take(d, length) or b""
            self.emit(d, self._reply_payload_name(reply_type, payload), payload)
            if reply_type == OptionReplyType.ACK or reply_type & (1 << 31):
                self._option_done(option, reply_type == OptionReplyType.ACK)
            return True
        if self.server_phase == "transmission":
            return self._reply_step(d)
        return False

    def _reply_payload_name(self, reply_type: int, payload: bytes) -> str:
        if reply_type & (1 << 31):
            return "ErrorReplyPayload"
        if reply_type == OptionReplyType.SERVER:
            return "ServerPayload"
        if reply_type == OptionReplyType.META_CONTEXT:
            return "MetaContextReplyPayload"
        if reply_type == OptionReplyType.INFO and len(payload) >= 2:
            return _INFO_PAYLOADS.get(struct.unpack(">H", payload[:2])[0], "Data")  # type: ignore[call-overload]
        return "EmptyPayload" if not payload else "Data"

    def _option_done(self, option: int, ok: bool) -> None:
        if self.options and self.options[0] == option:
            self.options.popleft()
        if not ok:
            return
        if option == Option.STRUCTURED_REPLY:
            self.structured = True
        elif option == Option.EXTENDED_HEADERS:
            self.structured = self.extended = True
        elif option == Option.GO:
            self.server_phase = self.client_phase = "transmission"
        elif option == Option.STARTTLS:
            self.tls = True  # everything after this is TLS records: not ours to decode

    def _reply_step(self, d: str) -> bool:
        if not self.have(d, 4):
            return False
        (magic,) = struct.unpack(">I", self.buffers[d][:4])
        if magic == Magic.SIMPLE_REPLY:
            if not self.have(d, 16):
                return False
            _, error, cookie = struct.unpack(">IIQ", self.buffers[d][:16])
            kind, _, length = self.requests.get(cookie, (-1, 0, 0))
            data_size = length if kind == Command.READ and error == 0 else 0
            if not self.have(d, 16 + data_size):
                return False
            self.emit(d, "SimpleReply", self.take(d, 16) or b"")
            if data_size:
                self.emit(d, "Data", self.take(d, data_size) or b"")
            self.requests.pop(cookie, None)
            return True
        extended = magic == Magic.EXTENDED_REPLY
        if not extended and magic != Magic.STRUCTURED_REPLY:
            raise ValueError(f"unknown reply magic {magic:#x}")
        size = 32 if extended else 20
        if not self.have(d, size):
            return False
        if extended:
            _, flags, kind, cookie, _, length = struct.unpack(">IHHQQQ", self.buffers[d][:size])
        else:
            _, flags, kind, cookie, length = struct.unpack(">IHHQI", self.buffers[d][:size])
        if not self.have(d, size + length):
            return False
        self.emit(d, "ExtendedReplyHeader" if extended else "StructuredReplyHeader", self.take(d, size) or b"")
        payload = self.take(d, length) or b""
        self.emit(d, _CHUNK_NAMES.get(kind, "Data") if payload or kind == ChunkType.NONE else "EmptyPayload", payload)
        if flags & ReplyFlags.DONE:
            self.requests.pop(cookie, None)
        return True


def decode_transcript(chunks: Iterable[tuple[str, bytes]]) -> list[Message]:
    """Every message of a recorded conversation, in the order the bytes arrived. ValueError if any byte is
    left over or cannot be decoded (a construct failure surfaces as nbdproto.RemoteProtocolError)."""
    decoder = _Decoder()
    for direction, data in chunks:
        if direction not in decoder.buffers:
            raise ValueError(f"unknown direction {direction!r}")
        decoder.buffers[direction] += data
        while decoder.client_step() or decoder.server_step():
            pass
    if not decoder.tls:
        for direction, buf in decoder.buffers.items():
            if buf:
                raise ValueError(f"{len(buf)} bytes of {direction} left undecoded: {bytes(buf[:32]).hex()}...")
    return decoder.out
