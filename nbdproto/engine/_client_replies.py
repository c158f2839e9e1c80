"""The client's replies in transmission: checking and assembling them (``_client_requests`` sends the
requests).

Replies are matched by cookie, with any number in flight and in any order, and checked against the request they
answer: a structured read's chunks must lie inside the request, not overlap, and cover it on success; block
status must answer each requested context once, with extents the request allows; nothing may follow DONE.
Each chunk header is checked (type, length, what it answers) before its payload is read, so a length the
request cannot allow is never buffered (the checks themselves are in ``_client_checks``). Any violation is a
RemoteProtocolError. Each request ends in exactly one event (``ReadReply``, ``BlockStatusReply``,
``SuccessReply`` or ``ErrorReply``).
"""

from __future__ import annotations

import struct

from nbdproto.wire import (
    ChunkType,
    Command,
    Errno,
    ReplyFlags,
    headers,
    layout,
)

from ._client_checks import ReadCoverage, descriptor_count, parse_block_status
from ._client_requests import ClientRequesting, Pending
from ._commands import DF_BIT as _DF
from ._commands import REQ_ONE_BIT as _REQ_ONE
from ._events import ConnectionClosed, Event
from ._state import NEED_DATA, PAUSED, Trigger
from ._transmission_events import (
    BlockStatusReply,
    BlockStatusRequest,
    ErrorReply,
    ReadReply,
    SuccessReply,
)

__all__ = ["ClientReplies"]

_DONE = int(ReplyFlags.DONE)
_MESSAGE_CHUNK_LIMIT = 64 * 1024  # error chunks: a message for humans, no more
_KNOWN_ERRORS = {int(e) for e in Errno} - {0}
_OFFSET_DATA, _OFFSET_HOLE, _NONE = int(ChunkType.OFFSET_DATA), int(ChunkType.OFFSET_HOLE), int(ChunkType.NONE)
_STATUS_CHUNKS = (int(ChunkType.BLOCK_STATUS), int(ChunkType.BLOCK_STATUS_EXT))
_ZEROES = bytes(64 * 1024)
_SIMPLE, _STRUCTURED, _EXTENDED = (
    headers.SIMPLE_REPLY.magic,
    headers.STRUCTURED_REPLY.magic,
    headers.EXTENDED_REPLY.magic,
)
_MAGIC = struct.Struct(">I").unpack
_SIMPLE_HEADER = headers.SIMPLE_REPLY.unpack_from
_STRUCTURED_DATA = struct.Struct(
    headers.STRUCTURED_REPLY.struct.format + headers.OFFSET_DATA_PREFIX.struct.format[1:]
).unpack_from  # a structured chunk's header and an OFFSET_DATA payload's offset, in one unpack
_EXTENDED_DATA = struct.Struct(
    headers.EXTENDED_REPLY.struct.format + headers.OFFSET_DATA_PREFIX.struct.format[1:]
).unpack_from  # the same for an extended chunk


class ClientReplies(ClientRequesting):
    """Replies for ClientConnection, read straight into the caller's buffers where they can be."""

    # --- Read payloads straight into the caller's buffer --------------------------------------------------

    def read_buffer(self) -> memoryview | None:
        """Where the next bytes from the server belong when they are the rest of a read's data: the unfilled
        part of the caller's ReadRequest buffer, else None. A driver may receive straight into it (e.g.
        ``socket.recv_into``) and report the count with ``received_into``, so that large read payloads are
        never copied in Python; passing them to ``receive_data`` is equally correct."""
        return self._into

    @property
    def arriving_read_size(self) -> int:
        """The length of the READ whose data is arriving into ``read_buffer()``, else 0: a driver that knows a
        big read's data is arriving can expect another big reply after it (nbdproto.devices' NbdDevice takes the
        next reply's header in the same turn then)."""
        pending = self._direct_pending
        return 0 if pending is None or self._into is None else pending.length

    def _start_direct(self, pending: Pending, destination: memoryview, done: bool) -> type[NEED_DATA]:
        # The header is consumed; what has arrived of the payload is copied, the rest will land in place.
        buf = self._buf
        have = len(buf)
        destination[:have] = buf.take(have)
        self._into = destination[have:] if have < len(destination) else None
        self._direct_pending = pending
        self._direct_done = done
        return NEED_DATA

    def _finish_direct(self) -> Event | None:
        pending = self._direct_pending
        assert pending is not None
        self._into = self._direct_pending = None
        if not self._direct_done:
            return None
        del self._pending[pending.request.cookie]
        return self._complete(pending)

    # --- Replies -------------------------------------------------------------------------------------------

    def _next_in_transmission(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        buf = self._buf
        while True:
            if self._direct_pending is not None:
                if self._into is not None:
                    return self._need_more()
                finished = self._finish_direct()
                if finished is not None:
                    return finished
                continue
            if len(buf) < 4:
                if self._eof:
                    if len(buf):
                        self._fail(f"the server closed the connection in the middle of a reply ({len(buf)} bytes)")
                    started = [c for c, p in self._pending.items() if p.started]
                    if started:
                        self._fail(f"the server closed the connection before the DONE chunk of cookie {started[0]:#x}")
                    self._move(Trigger.PEER_CLOSED)
                    return ConnectionClosed()
                return NEED_DATA
            if self._fast_paths and self._queue_whole_replies():
                return self._events.popleft()
            (magic,) = _MAGIC(buf.peek(4))
            if magic == _STRUCTURED:
                event = self._chunk(False)
            elif magic == _SIMPLE:
                event = self._simple_reply()
            elif magic == _EXTENDED:
                event = self._chunk(True)
            else:
                self._fail(f"reply magic {magic:#x} is not a reply magic")
            if event is NEED_DATA:
                return self._need_more()
            if event is not None:
                return event

    def _queue_whole_replies(self) -> bool:
        """Queue the event of every whole reply in the received chunk at the read position that every check of
        the full path lets through: a READ's in one piece (a simple reply and its data; or, with structured
        replies or extended headers, one OFFSET_DATA chunk with DONE that covers the whole read), and a simple
        reply without error to any request but READ and BLOCK_STATUS (a WRITE's, most often): one loop over
        them instead of an engine call each. The first reply that is anything else stops it, for the full path.
        True when it queued any."""
        buf = self._buf
        head, start = buf.chunk()
        pos, end = start, len(head)
        pending_of, events = self._pending, self._events
        form = 2 if self.extended_headers else 1 if self.structured_replies else 0
        while pos + 16 <= end:
            chunk = False  # a structured or extended chunk, its fields unpacked (else a simple reply, if any)
            if form == 1:
                if pos + 28 <= end:
                    magic, flags, chunk_type, cookie, size, offset = _STRUCTURED_DATA(head, pos)
                    wanted, echoed, data_at = _STRUCTURED, offset, pos + 28
                    chunk = magic == _STRUCTURED  # (a write's simple reply, most often, if not)
            elif form == 2:
                if pos + 40 > end:
                    break
                magic, flags, chunk_type, cookie, echoed, size, offset = _EXTENDED_DATA(head, pos)
                wanted, data_at, chunk = _EXTENDED, pos + 40, True
            if chunk:
                pending = pending_of.get(cookie)
                if (
                    magic != wanted
                    or flags != _DONE
                    or chunk_type != _OFFSET_DATA
                    or pending is None
                    or pending.command is not Command.READ
                    or pending.started
                    or size - 8 != pending.length
                    or offset != pending.offset
                    or echoed != offset
                ):
                    break
            else:
                magic, error, cookie = _SIMPLE_HEADER(head, pos)
                pending = pending_of.get(cookie)
                if magic != _SIMPLE or error or pending is None or pending.started:
                    break
                command = pending.command
                if command is not Command.READ:
                    if command is Command.BLOCK_STATUS:
                        break
                    del pending_of[cookie]
                    events.append(SuccessReply(cookie))
                    pos += 16
                    continue
                if form:  # a simple reply with a read's data, structured replies negotiated: the full path's error
                    break
                data_at = pos + 16
            length = pending.length
            if data_at + length > end:
                break
            buffer = pending.buffer
            if buffer is None:  # (Pending.own_buffer, made from the data)
                buffer = memoryview(bytearray(memoryview(head)[data_at : data_at + length]))
            else:
                buffer[:] = memoryview(head)[data_at : data_at + length]
            del pending_of[cookie]
            events.append(ReadReply(cookie, buffer))
            pos = data_at + length
        if pos == start:
            return False
        buf.skip(pos - start)
        return True

    def _need_more(self) -> type[NEED_DATA]:
        if self._eof:
            self._fail("the server closed the connection in the middle of a reply")
        return NEED_DATA

    def _lookup(self, cookie: int) -> Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            self._fail(f"reply for cookie {cookie:#x}, which is not in flight")
        return pending

    def _simple_reply(self) -> Event | type[NEED_DATA] | None:
        buf = self._buf
        header = buf.header(headers.SIMPLE_REPLY)
        if header is None:
            return NEED_DATA
        _, error, cookie = header
        if self.extended_headers:
            self._fail("a simple reply after extended headers were negotiated")
        pending = self._lookup(cookie)
        if pending.started:  # its chunks carry what came of it (an error, perhaps): only chunks may end it
            self._fail(f"a simple reply to {_what(pending)}, whose structured reply had begun")
        command = pending.command
        if error == 0 and command == Command.READ:
            if self.structured_replies:
                self._fail(f"simple reply with data to read {cookie:#x} while structured replies are in use")
            buf.skip(headers.SIMPLE_REPLY.size)
            buffer = pending.own_buffer()
            if len(buf) < pending.length:
                pending.started = True
                self._claim(pending, pending.offset, pending.length)
                return self._start_direct(pending, buffer, done=True)
            buffer[:] = buf.take(pending.length)
            del self._pending[cookie]
            return ReadReply(cookie, buffer)
        buf.skip(headers.SIMPLE_REPLY.size)
        del self._pending[cookie]
        if error:
            return self._error(ErrorReply(cookie, _errno(error)))
        if command == Command.BLOCK_STATUS:
            self._fail(f"block status {cookie:#x} answered by a simple reply without error")
        return SuccessReply(cookie)

    def _chunk(self, extended: bool) -> Event | type[NEED_DATA] | None:
        buf = self._buf
        codec = headers.EXTENDED_REPLY if extended else headers.STRUCTURED_REPLY
        header = buf.header(codec)
        if header is None:
            return NEED_DATA
        if extended:
            _, flags, chunk_type, cookie, offset, length = header
        else:
            _, flags, chunk_type, cookie, length = header
            offset = None
        if extended != self.extended_headers or not self.structured_replies:
            self._fail(f"{codec.name} chunk, but the negotiated reply form does not allow it")
        pending = self._lookup(cookie)
        if offset is not None and offset != pending.offset:
            self._fail(f"extended reply offset {offset} does not echo the request's {pending.offset}")
        if chunk_type == _OFFSET_DATA and pending.command is Command.READ and 9 <= length <= pending.length + 8:
            pass  # the usual chunk, checked in one line
        else:
            self._check_chunk(pending, chunk_type, flags, length)
        pending.started = True
        if len(buf) < codec.size + length:
            if chunk_type != _OFFSET_DATA or len(buf) < codec.size + 8:
                return NEED_DATA
            # Data for a read, its offset known: checked now, the bytes go straight where they belong.
            buf.skip(codec.size)
            (offset,) = headers.OFFSET_DATA_PREFIX.unpack_from(buf.take(8))
            destination = self._claim(pending, offset, length - 8)
            return self._start_direct(pending, destination, done=bool(flags & _DONE))
        buf.skip(codec.size)
        payload = buf.take(length)
        self._apply_chunk(pending, chunk_type, payload)
        if not flags & _DONE:
            return None
        del self._pending[cookie]
        return self._complete(pending)

    def _check_chunk(self, pending: Pending, chunk_type: int, flags: int, length: int) -> None:
        """A chunk header against the request it answers, before any of its payload is read (spec:
        "Structured reply types"): a type valid for the command, and a length that type and request allow."""
        export = self.export
        assert export is not None
        command = pending.command
        if chunk_type & 0x8000:
            if length > _MESSAGE_CHUNK_LIMIT:
                self._fail(f"error chunk of {length} bytes for {_what(pending)} exceeds {_MESSAGE_CHUNK_LIMIT} bytes")
        elif chunk_type == _NONE:
            if length or not flags & _DONE:
                self._fail(f"NONE chunk for {_what(pending)} with {length} bytes of payload, flags {flags:#x}: it "
                           "must be empty and carry DONE")  # fmt: skip
        elif chunk_type in (_OFFSET_DATA, _OFFSET_HOLE):
            if command != Command.READ:
                self._fail(f"read data for {_what(pending)}")
            if chunk_type == _OFFSET_HOLE and length != headers.OFFSET_HOLE.size:
                self._fail(f"OFFSET_HOLE chunk of {length} bytes for {_what(pending)}: it is always 12")
            if chunk_type == _OFFSET_DATA and not 9 <= length <= pending.length + 8:
                self._fail(f"OFFSET_DATA chunk of {length} bytes for {_what(pending)}: it carries 1 to "
                           f"{pending.length} bytes of data after its offset")  # fmt: skip
        elif chunk_type in _STATUS_CHUNKS:
            if command != Command.BLOCK_STATUS:
                self._fail(f"block status chunk for {_what(pending)}")
            if (chunk_type == ChunkType.BLOCK_STATUS_EXT) != self.extended_headers:
                self._fail(f"{ChunkType(chunk_type).name} chunk does not match the negotiated headers")
            req_one = bool(pending.flags & _REQ_ONE)
            descriptor_count(chunk_type, length, pending.length, export.minimum_block_size, req_one)
        else:
            self._fail(f"unknown chunk type {chunk_type} for {_what(pending)}")

    def _apply_chunk(self, pending: Pending, chunk_type: int, payload: memoryview) -> None:
        # The header was checked by _check_chunk: the type fits the command and the length fits the type.
        if chunk_type == _OFFSET_DATA:
            (offset,) = headers.OFFSET_DATA_PREFIX.unpack_from(payload)
            self._claim(pending, offset, len(payload) - 8)[:] = payload[8:]
        elif chunk_type == _OFFSET_HOLE:
            offset, size = headers.OFFSET_HOLE.unpack_from(payload)
            if size == 0:
                self._fail("OFFSET_HOLE chunk with a hole of 0 bytes")
            destination = self._claim(pending, offset, size)  # checked before a byte is sized from it
            destination[:] = _ZEROES[:size] if size <= len(_ZEROES) else bytes(size)
        elif chunk_type & 0x8000:
            self._error_chunk(pending, chunk_type, payload)
        elif chunk_type in _STATUS_CHUNKS:
            self._block_status_chunk(pending, chunk_type, payload)

    def _claim(self, pending: Pending, offset: int, size: int) -> memoryview:
        """Check that a read chunk fits its request and no earlier chunk; returns where its bytes go."""
        coverage = pending.coverage
        if coverage is None:
            coverage = pending.coverage = ReadCoverage(pending.offset, pending.length)
        coverage.claim(offset, size)
        start = pending.offset
        if pending.flags & _DF and (offset != start or size != pending.length):
            self._fail("a DF read answered in more than one chunk")
        at = offset - start
        return pending.own_buffer()[at : at + size]

    def _block_status_chunk(self, pending: Pending, chunk_type: int, payload: memoryview) -> None:
        export = self.export
        assert export is not None
        context_id = int.from_bytes(payload[:4], "big")
        request: BlockStatusRequest = pending.request  # type: ignore[assignment]
        wanted = request.context_ids or tuple(self._meta_contexts)
        got = pending.extents
        if got is None:
            got = pending.extents = {}
        if context_id not in wanted or context_id in got:
            self._fail(f"block status for context {context_id}, not asked for or answered twice")
        req_one = bool(pending.flags & _REQ_ONE)
        minimum, size = export.minimum_block_size, export.size
        _, extents = parse_block_status(chunk_type, payload, pending.offset, pending.length, minimum, size, req_one)
        got[context_id] = extents

    def _error_chunk(self, pending: Pending, chunk_type: int, payload: memoryview) -> None:
        offset: int | None = None
        if chunk_type == ChunkType.ERROR_OFFSET:
            fields = layout.decode(layout.ErrorOffsetChunkPayload, payload)
            error, message, offset = fields.error, fields.message, fields.offset
            if not pending.offset <= offset < pending.offset + max(pending.length, 1):
                self._fail(f"error offset {offset} is outside the request {pending.offset}+{pending.length}")
        elif chunk_type == ChunkType.ERROR:
            fields = layout.decode(layout.ErrorChunkPayload, payload)
            error, message = fields.error, fields.message
        else:
            # spec: every error chunk starts with the error and a message; an unknown one is still an error.
            if len(payload) < 6:
                self._fail(f"error chunk type {chunk_type} of {len(payload)} bytes")
            error, size = struct.unpack(">IH", payload[:6])
            message = bytes(payload[6 : 6 + size]).decode("utf8", "replace")
        if error == 0:
            self._fail("an error chunk with error 0")
        if pending.error is None:
            cookie = pending.request.cookie
            pending.error = ErrorReply(cookie, _errno(error), message, offset)

    def _error(self, reply: ErrorReply) -> ErrorReply:
        if reply.error == Errno.ESHUTDOWN:
            self.server_shutting_down = True
        return reply

    def _complete(self, pending: Pending) -> Event:
        cookie = pending.request.cookie
        if pending.error is not None:
            return self._error(pending.error)
        if pending.command == Command.READ:
            covered = 0 if pending.coverage is None else pending.coverage.covered
            if covered != pending.length:
                self._fail(f"read {cookie:#x} ended with {covered} of {pending.length} bytes answered")
            return ReadReply(cookie, pending.own_buffer())
        if pending.command == Command.BLOCK_STATUS:
            request: BlockStatusRequest = pending.request  # type: ignore[assignment]
            wanted = request.context_ids or tuple(self._meta_contexts)
            got = pending.extents or {}
            if set(got) != set(wanted):
                self._fail(f"block status {cookie:#x} answered contexts {sorted(got)} of {sorted(wanted)}")
            return BlockStatusReply(cookie, got)
        return SuccessReply(cookie)


def _what(pending: Pending) -> str:
    """The request a reply answers, for error messages: "READ 0x5"."""
    return f"{pending.command.name} {pending.request.cookie:#x}"


def _errno(value: int) -> Errno:
    # spec: a client SHOULD treat an unexpected error value as if it were EINVAL.
    return Errno(value) if value in _KNOWN_ERRORS else Errno.EINVAL
