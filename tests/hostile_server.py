"""A server that misbehaves on purpose: a scripted NBD server on a loopback socket, one ``Case`` at a time.

The server speaks fixed newstyle and answers whatever options a client sends (STARTTLS refused, extended
headers only when the case says, structured replies, SET_META_CONTEXT, GO/INFO, EXPORT_NAME), then answers the
client's READ and BLOCK_STATUS requests; every other command gets a plain success. Each Case overrides one
part of that with a lie or a broken message, built with the engine's own encoders (``nbdproto.wire.headers``,
``nbdproto.wire.layout``): a bad NBD_INFO_BLOCK_SIZE, a meta context nobody asked for, a hole of 4 GiB, a chunk of
2 Mi descriptors, 65,536 one-byte chunks, and so on.

Every client under test (tests/test_hostile_servers.py) does the same two things, which are also what
``nbdproto copy`` of the 64 KiB export does: block status over the export, then one read of all of it. A case
either expects that to work and return exactly the export's bytes (``match`` is None), or expects a
RemoteProtocolError / NegotiationError whose message matches ``match`` (the rule it names).

Server threads never block for long (10 s socket timeouts) and a broken pipe or reset just ends the
connection: a hostile server must not make the test suite hang either.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from nbdproto.wire import headers as h
from nbdproto.wire import layout as w
from nbdproto.wire._constants import (
    BASE_ALLOCATION,
    ChunkType,
    Command,
    CommandFlags,
    HandshakeFlags,
    InfoType,
    Magic,
    Option,
    OptionReplyType,
    ReplyFlags,
    TransmissionFlags,
)

__all__ = [
    "Case", "Close", "Trickle", "Parts", "Request", "Wire", "SIZE", "CONTENT", "serve_case", "option_reply", "good_read"
]  # fmt: skip

SIZE = 64 * 1024
"""The export every case offers (unless it says otherwise): one read and one block status cover it."""
CONTENT = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(SIZE))
"""What the export holds: no byte run of zeroes, so a hole where data belongs cannot pass for data."""
DONE = int(ReplyFlags.DONE)
REP = OptionReplyType
TF = TransmissionFlags


class Close(bytes):
    """Bytes to send, after which the server closes the connection (mid-reply, mid-handshake)."""


class Trickle(bytes):
    """Bytes to send one a second (a server that answers, but too slowly to be waited for)."""


class Parts(bytes):
    """Bytes to send in four parts, with a pause between (a reply that arrives a piece at a time, within the
    rules)."""


class Request(NamedTuple):
    command: int
    flags: int
    cookie: int
    offset: int
    length: int


class Wire:
    """The reply messages of transmission, in the form negotiated on this connection (structured or extended)."""

    def __init__(self) -> None:
        self.structured = False
        self.extended = False

    def chunk(self, request: Request, kind: int, payload: bytes, flags: int = DONE, length: int | None = None) -> bytes:
        size = len(payload) if length is None else length
        if self.extended:
            codec = h.EXTENDED_REPLY
            return codec.pack(codec.magic, flags, kind, request.cookie, request.offset, size) + payload
        codec = h.STRUCTURED_REPLY
        return codec.pack(codec.magic, flags, kind, request.cookie, size) + payload

    def data(self, request: Request, at: int, data: bytes, flags: int = DONE) -> bytes:
        return self.chunk(request, ChunkType.OFFSET_DATA, h.OFFSET_DATA_PREFIX.pack(at) + data, flags)

    def hole(self, request: Request, at: int, size: int, flags: int = DONE) -> bytes:
        return self.chunk(request, ChunkType.OFFSET_HOLE, h.OFFSET_HOLE.pack(at, size), flags)

    def status(self, request: Request, context_id: int, extents: list[tuple[int, int]], flags: int = DONE) -> bytes:
        if self.extended:
            payload = struct.pack(">II", context_id, len(extents))
            descriptor = h.EXTENT_DESCRIPTOR
            kind = ChunkType.BLOCK_STATUS_EXT
        else:
            payload = struct.pack(">I", context_id)
            descriptor = h.BLOCK_DESCRIPTOR
            kind = ChunkType.BLOCK_STATUS
        return self.chunk(request, kind, payload + b"".join(descriptor.pack(*e) for e in extents), flags)

    def error(self, request: Request, error: int, message: str = "", flags: int = DONE) -> bytes:
        payload = w.encode(w.ErrorChunkPayload, {"error": error, "message": message})
        return self.chunk(request, ChunkType.ERROR, payload, flags)

    def simple(self, request: Request, error: int = 0, data: bytes = b"") -> bytes:
        return h.SIMPLE_REPLY.pack(h.SIMPLE_REPLY.magic, error, request.cookie) + data

    def success(self, request: Request) -> bytes:
        if self.structured:
            return self.chunk(request, ChunkType.NONE, b"")
        return self.simple(request)


Reply = Callable[[Wire, Request], bytes]
"""How a case answers one request: the bytes to send (``Close(...)``: then close the connection)."""


def good_read(wire: Wire, request: Request) -> bytes:
    data = CONTENT[request.offset : request.offset + request.length]
    return wire.data(request, request.offset, data) if wire.structured else wire.simple(request, data=data)


def good_status(wire: Wire, request: Request) -> bytes:
    return wire.status(request, 1, [(min(request.length, SIZE - request.offset), 0)])


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    return h.OPTION_REPLY.pack(h.OPTION_REPLY.magic, option, reply_type, len(payload)) + payload


@dataclass
class Case:
    """One way of misbehaving (or of behaving oddly but within the rules, when ``match`` is None)."""

    name: str
    match: str | None
    """A regular expression the client's error message must contain, naming the rule; None: must succeed."""
    greeting: bytes = struct.pack(">QQH", Magic.NBDMAGIC, Magic.IHAVEOPT,
                                  HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES)  # fmt: skip
    extended: bool = False
    """Accept NBD_OPT_EXTENDED_HEADERS (else refuse it, so clients fall back to structured replies)."""
    size: int = SIZE
    flags: int = TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_DF
    block_sizes: tuple[int, int, int] | None = (1, 4096, 32 << 20)
    contexts: list[tuple[int, str]] = field(default_factory=lambda: [(1, BASE_ALLOCATION)])
    """The answer to NBD_OPT_SET_META_CONTEXT: (id, name) pairs."""
    go_replies: Callable[[int], bytes] | None = None
    """Replaces the whole answer to NBD_OPT_GO / NBD_OPT_INFO (given the option code); ``Close(...)`` closes after."""
    read: Reply = good_read
    block_status: Reply = good_status
    handshake_only: bool = False
    """The violation is in the handshake: the command line's ``info`` shows it (else ``copy`` does)."""
    replies_together: int = 1
    """Hold the replies until this many requests have come, then send them all with one send (a burst)."""

    def __str__(self) -> str:
        return self.name


class _Closed(Exception):
    pass


class _Script:
    """One connection of the scripted server."""

    def __init__(self, sock: socket.socket, case: Case) -> None:
        self.sock = sock
        self.case = case
        self.wire = Wire()

    def recv(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            got = self.sock.recv(min(size - len(data), 1 << 20))
            if not got:
                raise _Closed
            data += got
        return data

    def run(self) -> None:
        case = self.case
        self.sock.sendall(case.greeting)
        if not case.greeting.startswith(struct.pack(">QQ", Magic.NBDMAGIC, Magic.IHAVEOPT)):
            self.recv(1 << 20)  # the client gives up: wait for it to close
            return
        self.recv(4)  # client flags
        while True:
            _, option, length = struct.unpack(">QII", self.recv(16))
            self.recv(length)
            if option == Option.EXPORT_NAME:
                self.sock.sendall(struct.pack(">QH", self.case.size, self.case.flags))
                break
            if option == Option.GO:
                answer = self.info(option)
                self.sock.sendall(answer)
                if isinstance(answer, Close):
                    return
                if answer.endswith(option_reply(option, REP.ACK)):
                    break
                continue
            if option == Option.ABORT:
                self.sock.sendall(option_reply(option, REP.ACK))
                return
            self.sock.sendall(self.answer(option))
        self.transmission()

    def answer(self, option: int) -> bytes:
        case = self.case
        if option == Option.EXTENDED_HEADERS and case.extended:
            self.wire.extended = self.wire.structured = True
            return option_reply(option, REP.ACK)
        if option == Option.STRUCTURED_REPLY:
            self.wire.structured = True
            return option_reply(option, REP.ACK)
        if option in (Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT):
            replies = [
                option_reply(option, REP.META_CONTEXT, w.encode(w.MetaContextReplyPayload,
                                                                {"context_id": i, "name": name}))
                for i, name in case.contexts
            ]  # fmt: skip
            return b"".join(replies) + option_reply(option, REP.ACK)
        if option == Option.INFO:
            return self.info(option)
        if option == Option.LIST:
            return option_reply(option, REP.SERVER, w.encode(w.ServerPayload, {"name": "", "description": ""})) + (
                option_reply(option, REP.ACK)
            )
        return option_reply(option, REP.ERR_UNSUP)

    def info(self, option: int) -> bytes:
        case = self.case
        if case.go_replies is not None:
            return case.go_replies(option)
        export = {"size": case.size, "transmission_flags": case.flags}
        out = option_reply(option, REP.INFO, w.encode(w.InfoExportPayload, export))
        if case.block_sizes is not None:
            minimum, preferred, maximum = case.block_sizes
            payload = struct.pack(">HIII", InfoType.BLOCK_SIZE, minimum, preferred, maximum)
            out += option_reply(option, REP.INFO, payload)
        return out + option_reply(option, REP.ACK)

    def transmission(self) -> None:
        wire = self.wire
        held: list[bytes] = []
        while True:
            if wire.extended:
                _, flags, command, cookie, offset, length = h.EXTENDED_REQUEST.unpack_from(self.recv(32))
            else:
                _, flags, command, cookie, offset, length = h.REQUEST.unpack_from(self.recv(28))
            if command == Command.WRITE or flags & CommandFlags.PAYLOAD_LEN:
                self.recv(length)
            request = Request(command, flags, cookie, offset, length)
            if command == Command.DISC:
                return
            if command == Command.READ:
                answer = self.case.read(wire, request)
            elif command == Command.BLOCK_STATUS:
                answer = self.case.block_status(wire, request)
            else:
                answer = wire.success(request)
            if self.case.replies_together > 1:
                held.append(answer)
                if len(held) == self.case.replies_together:
                    self.sock.sendall(b"".join(held))
                    held.clear()
                continue
            if isinstance(answer, Parts):
                quarter = len(answer) // 4
                for start in range(0, len(answer), quarter):
                    if start:
                        time.sleep(0.2)
                    self.sock.sendall(answer[start : start + quarter])
                continue
            if isinstance(answer, Trickle):
                for byte in answer:
                    self.sock.sendall(bytes([byte]))
                    time.sleep(1)  # the server under test trickles on purpose: one byte a second
                return
            self.sock.sendall(answer)
            if isinstance(answer, Close):
                return


@contextlib.contextmanager
def serve_case(case: Case) -> Iterator[str]:
    """Serve ``case`` on a loopback port (any number of connections) and yield its nbd:// URI."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def connection(sock: socket.socket) -> None:
        sock.settimeout(10)
        try:
            _Script(sock, case).run()
        except (OSError, _Closed, struct.error):
            pass  # the client hung up on us: that is what most cases are for
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=connection, args=(sock,), daemon=True, name=f"hostile {case}").start()

    acceptor = threading.Thread(target=accept, daemon=True, name="hostile accept")
    acceptor.start()
    try:
        yield f"nbd://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept at once
        acceptor.join(5)
        listener.close()
