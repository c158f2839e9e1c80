"""The server's half of transmission: validating requests, and turning the application's replies into bytes.

Every request is checked before the application sees it (spec: "Request types", "Command flags", "Error
values", "Block size constraints"); an invalid one is answered here with the error the spec names and never
surfaces as an event. Replies come in as ``ReadData`` / ``ReadHole`` / ``BlockStatusReply`` / ``SuccessReply`` /
``ErrorReply`` and go out as simple, structured or extended reply messages, whichever was negotiated, after
checks that they fit the request they answer (a bug in the application is a LocalProtocolError, not a
malformed reply on the wire).

This is the hot path: the common request (a READ or WRITE with valid fields) and the common reply (one chunk
answering a whole read) take the short road through ``_next_in_transmission`` and ``_read_chunk``.
"""

from __future__ import annotations

from collections.abc import Iterable

from nbdproto.wire import MAX_STRING_LENGTH, Command, CommandFlags, Errno, LocalProtocolError, TransmissionFlags, layout

from . import _replies
from ._commands import COMMANDS, request_error
from ._commands import DF_BIT as _DF
from ._commands import PAYLOAD_LEN_BIT as _PAYLOAD_LEN
from ._commands import REQ_ONE_BIT as _REQ_ONE
from ._events import ConnectionClosed, Event
from ._payloads import Extent, Payload
from ._server_base import Progress, ServerBase
from ._state import NEED_DATA, PAUSED, Trigger
from ._transmission_events import (
    BlockStatusReply,
    BlockStatusRequest,
    CacheRequest,
    DisconnectRequest,
    ErrorReply,
    FlushRequest,
    ReadRequest,
    Request,
    ResizeRequest,
    TrimRequest,
    WritePayload,
    WriteRequest,
    WriteZeroesRequest,
)

__all__ = ["ServerTransmission"]

# Every combination of the six command flags, made once: IntFlag construction costs ~300 ns per call.
_COMMAND_FLAGS = tuple(CommandFlags(i) for i in range(1 << len(CommandFlags)))
_READ, _WRITE, _DISC = int(Command.READ), int(Command.WRITE), int(Command.DISC)
_BLOCK_STATUS = int(Command.BLOCK_STATUS)
_MAX_DESCRIPTORS = 1 << 20  # spec: a server SHOULD NOT send more than 2^20 descriptors in one chunk
_simple_reply = _replies.simple_reply
_offset_data_header = _replies.offset_data_header


def _wire_offset(request: Request) -> int:
    """The offset field the request had on the wire, which an extended reply must echo."""
    if type(request) is ResizeRequest:
        return request.size  # RESIZE carries the new size in the offset field
    return getattr(request, "offset", 0)


class ServerTransmission(ServerBase):
    """Requests and replies for ServerConnection."""

    _fast_paths = True
    """The short roads for valid READs and whole WRITEs (a test turns them off to compare with the full check)."""

    # The size before a successful NBD_CMD_RESIZE made the export smaller (RESIZE extension: requests between
    # the new and the old end fail with ENOSPC); 0 until then.
    _shrunk_from = 0

    # --- Requests ------------------------------------------------------------------------------------------

    def _next_in_transmission(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        buf = self._buf
        codec = self._request_codec
        header_size = codec.size
        in_flight = self._in_flight
        fast = self._fast_paths
        while True:
            if self._payload_event is not None:
                if self._into is not None:
                    return self._closed_or_need_data()
                whole, self._payload_event = self._payload_event, None
                return whole
            if self._write_rest is not None:
                return self._write_payload()
            if self._disconnecting:
                return PAUSED if in_flight else self._closed()
            if self._skip:
                return self._closed_or_need_data()
            header = buf.header(codec)
            if header is None:
                return self._closed_or_need_data()
            magic, flags, command, cookie, offset, length = header
            if magic != codec.magic:
                self._fail(f"request magic {magic:#x} is not {codec.magic:#x} ({codec.name})")
            if cookie in in_flight:
                # spec ("Transmission"): cookies are opaque to the server, and a client merely SHOULD keep them
                # distinct while in flight. The request waits, unparsed, until the first one is answered.
                return PAUSED
            # The common case, a valid READ, in as few steps as possible.
            if (
                fast
                and command == _READ
                and not flags
                and 0 < length <= self._max_payload
                and offset + length <= self._size
                and not (offset | length) % self._min_block
            ):
                buf.skip(header_size)
                event: Request = ReadRequest(cookie, offset, length, _COMMAND_FLAGS[0])
                in_flight[cookie] = event
                return event
            # The next most common: a valid WRITE (FUA allowed where advertised), its payload all here or not.
            if (
                fast
                and command == _WRITE
                and 0 < length <= self._max_payload
                and (flags & ~_PAYLOAD_LEN) in self._plain_write_flags
                and bool(flags & _PAYLOAD_LEN) == self.extended_headers
                and offset + length <= self._size
                and not (offset | length) % self._min_block
            ):
                buf.skip(header_size)
                if len(buf) < length:
                    return self._arriving_write(flags, cookie, offset, length)
                event = WriteRequest(cookie, offset, buf.take(length), _COMMAND_FLAGS[flags & ~_PAYLOAD_LEN])
                in_flight[cookie] = event
                return event
            if self.extended_headers:
                payload = length if flags & _PAYLOAD_LEN else 0
            else:
                payload = length if command == _WRITE else 0
            if payload:
                if payload > self._max_payload:
                    if self.extended_headers:
                        # spec: SHOULD hard-disconnect on a payload above the maximum.
                        self._fail(f"request payload of {payload} bytes exceeds the maximum {self._max_payload}")
                    # The compact header's length is trustworthy: drop the payload unread and refuse.
                    buf.skip(header_size)
                    self._skip = payload - buf.skip(payload)
                    self._reject(cookie, Errno.EINVAL, f"write of {payload} bytes exceeds the maximum payload")
                    continue
                if len(buf) < header_size + payload:
                    if command != _WRITE:
                        return self._closed_or_need_data()
                    if self._refused_write(header_size, flags, cookie, offset, payload):
                        continue  # the payload is being skipped
                    return self._arriving_write(flags, cookie, offset, payload)
            buf.skip(header_size)
            data = buf.take(payload) if payload else None
            context_ids = None
            if command == _BLOCK_STATUS and data is not None:
                parsed = self._block_status_filter(data)
                if isinstance(parsed, str):
                    self._reject(cookie, Errno.EINVAL, parsed, offset)
                    continue
                length, context_ids = parsed
            error = self._check_request(command, flags, offset, length)
            if error is None and command == _WRITE and data is None:
                error = Errno.EINVAL, "extended NBD_CMD_WRITE without NBD_CMD_FLAG_PAYLOAD_LEN"
            if error:
                self._reject(cookie, error[0], error[1], offset)
                continue
            return self._request_event(command, flags & ~_PAYLOAD_LEN, cookie, offset, length, data, context_ids)

    def _arriving_write(self, flags: int, cookie: int, offset: int, payload: int) -> Event | type[NEED_DATA]:
        """A checked WRITE (its header taken) whose payload has not all arrived: received in place when none of
        it has and the application gave a ``write_view`` for it, else streamed or into a buffer of its own."""
        write_view = self.write_view
        if write_view is not None and not len(self._buf):
            view = write_view(offset, payload)
            if view is not None:
                return self._fill_own_buffer(flags, cookie, offset, payload, view)
        streams = self._stream_writes_over
        if streams is not None and payload > streams:
            return self._stream_write(flags, cookie, offset, payload)
        return self._fill_own_buffer(flags, cookie, offset, payload)

    def _stream_write(self, flags: int, cookie: int, offset: int, payload: int) -> Event:
        """A checked WRITE (its header taken) too large to wait for: its payload handed over in parts as it
        arrives."""
        buf = self._buf
        data = buf.take_some(payload) if len(buf) else memoryview(b"")
        self._write_rest = (cookie, offset + len(data), payload - len(data))
        event = WriteRequest(cookie, offset, data, _COMMAND_FLAGS[flags & ~_PAYLOAD_LEN], True)
        self._in_flight[cookie] = event
        return event

    def _refused_write(self, header_size: int, flags: int, cookie: int, offset: int, payload: int) -> bool:
        """Check a WRITE whose payload has not all arrived; a refused one is answered and its payload skipped
        (the length is trustworthy: it passed the payload limit). True when it was refused."""
        buf = self._buf
        buf.skip(header_size)
        # (A payload is being received, so PAYLOAD_LEN is set with extended headers; without them the check
        # refuses it: no other mismatch of the two can reach here.)
        error = self._check_request(_WRITE, flags, offset, payload)
        if error is None:
            return False
        self._skip = payload - buf.skip(payload)
        self._reject(cookie, error[0], error[1], offset)
        return True

    def _fill_own_buffer(
        self, flags: int, cookie: int, offset: int, payload: int, in_place: memoryview | None = None
    ) -> Event | type[NEED_DATA]:
        """A checked WRITE (its header taken) whose payload has not all arrived: the payload gets a buffer of its
        own (or the device's storage, ``in_place``, where none of it has arrived), filled with what is here and
        then straight from the socket (write_buffer), so it is never joined from receive chunks."""
        buf = self._buf
        data: bytearray | memoryview
        if in_place is None:
            data = bytearray(payload)
            view = memoryview(data)
        else:
            data = view = in_place
        have = len(buf)
        if have:
            view[:have] = buf.take(have)
        self._into = view[have:]
        event = WriteRequest(cookie, offset, data, _COMMAND_FLAGS[flags & ~_PAYLOAD_LEN], in_place=in_place is not None)
        self._in_flight[cookie] = event
        self._payload_event = event
        return self._closed_or_need_data()

    def _write_payload(self) -> Event | type[NEED_DATA]:
        """The next part of the streamed write's payload, as much as has arrived."""
        buf = self._buf
        if not len(buf):
            return self._closed_or_need_data()
        cookie, offset, left = self._write_rest  # type: ignore[misc]
        data = buf.take_some(left)
        left -= len(data)
        self._write_rest = (cookie, offset + len(data), left) if left else None
        return WritePayload(cookie, offset, data, not left)

    def _closed(self) -> ConnectionClosed:
        self._move(Trigger.DISCONNECTED)
        return ConnectionClosed()

    def _check_request(self, command: int, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """The error a request must be refused with, or None if the application may see it."""
        rule = COMMANDS.get(command)
        if rule is None:
            return Errno.EINVAL, f"unknown command {command}"
        if flags & _PAYLOAD_LEN and not (self.extended_headers and rule.payload):
            return Errno.EINVAL, f"{rule.command.name} takes no payload here"
        refusal = request_error(
            rule,
            flags & ~_PAYLOAD_LEN,
            offset,
            length,
            export_flags=self._flags,
            size=self._size,
            alignment=self._min_block,
            max_payload=self._max_payload,
            has_contexts=bool(self._meta_contexts),
            structured=self.structured_replies,
        )
        end = offset + length
        if refusal is not None and rule.ranged and self._size < end <= self._shrunk_from:
            # RESIZE extension: a range between a shrunk size and the old one is ENOSPC.
            return Errno.ENOSPC, refusal[1]
        return refusal

    def _reject(self, cookie: int, error: Errno, message: str, offset: int = 0) -> None:
        # The engine's own error replies: structured where negotiated, so the message reaches the client.
        if self.structured_replies:
            limit = min(MAX_STRING_LENGTH, self._max_payload)
            self._out.append(
                _replies.error_chunk(self.extended_headers, True, cookie, offset, error, message, None, limit)
            )
        else:
            self._out.append(_simple_reply(error, cookie))

    def _request_event(
        self,
        command: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        data: memoryview | None,
        context_ids: tuple[int, ...] | None,
    ) -> Event:
        command_flags = _COMMAND_FLAGS[flags]
        event: Request
        if command == _DISC:
            self._disconnecting = True
            return DisconnectRequest(cookie)
        if command == _READ:
            event = ReadRequest(cookie, offset, length, command_flags)
        elif command == _WRITE:
            assert data is not None  # _next_request refused a write without one
            event = WriteRequest(cookie, offset, data, command_flags)
        elif command == Command.FLUSH:
            event = FlushRequest(cookie, command_flags)
        elif command == Command.TRIM:
            event = TrimRequest(cookie, offset, length, command_flags)
        elif command == Command.CACHE:
            event = CacheRequest(cookie, offset, length, command_flags)
        elif command == Command.WRITE_ZEROES:
            event = WriteZeroesRequest(cookie, offset, length, command_flags)
        elif command == Command.RESIZE:
            event = ResizeRequest(cookie, offset, command_flags)
        else:
            ids = context_ids if context_ids is not None else tuple(self._meta_contexts)
            event = BlockStatusRequest(cookie, offset, length, command_flags, ids)
        self._in_flight[cookie] = event
        return event

    def _block_status_filter(self, data: memoryview) -> tuple[int, tuple[int, ...]] | str:
        """The payload form of an extended NBD_CMD_BLOCK_STATUS: (effect length, context ids), or why not."""
        if not self._flags & TransmissionFlags.BLOCK_STATUS_PAYLOAD:
            return "block status payloads were not advertised"
        if len(data) < 8 or len(data) % 4:
            return f"block status payload of {len(data)} bytes is not 8 + 4n"
        fields = layout.decode(layout.BlockStatusRequestPayload, data)
        ids = tuple(fields.context_ids)
        if not ids or len(set(ids)) != len(ids) or any(i not in self._meta_contexts for i in ids):
            return f"block status context ids {list(ids)} are empty, repeated or not negotiated"
        return fields.effect_length, ids

    # --- Replies -------------------------------------------------------------------------------------------

    def _request_for(self, cookie: int) -> Request:
        request = self._in_flight.get(cookie)
        if request is None:
            raise LocalProtocolError(f"no request with cookie {cookie:#x} is waiting for a reply")
        if self._write_rest is not None and self._write_rest[0] == cookie:
            raise LocalProtocolError(f"write {cookie:#x} cannot be answered before its whole payload arrived")
        return request

    def _read_chunk(self, cookie: int, offset: int, size: int, data: Payload | None, done: bool) -> None:
        request = self._in_flight.get(cookie)
        if type(request) is not ReadRequest:
            what = "no request" if request is None else type(request).__name__
            raise LocalProtocolError(f"read reply for cookie {cookie:#x}, which is {what}")
        start, length = request.offset, request.length
        progress = self._progress.get(cookie)
        # The common case: one chunk of data answering the whole read.
        if progress is None and data is not None and offset == start and size == length:
            if self.structured_replies:
                self._out += (_offset_data_header(self.extended_headers, True, cookie, start, offset, size), data)
            else:
                self._out += (_simple_reply(0, cookie), data)
            del self._in_flight[cookie]
            return
        if size <= 0 or offset < start or offset + size > start + length:
            raise LocalProtocolError(f"read chunk {offset}+{size} is empty or outside request {start}+{length}")
        covered = (progress.covered if progress else 0) + size
        complete = covered == length
        if done and not complete:
            raise LocalProtocolError(f"read {cookie:#x} marked done with {covered} of {length} bytes answered")
        out = self._out
        if not self.structured_replies:
            # A simple reply is one header and then the data in order: chunks must follow each other.
            expected = start + (progress.covered if progress else 0)
            if offset != expected:
                raise LocalProtocolError(f"simple read reply chunk at {offset}, expected {expected}")
            if progress is None:
                out.append(_simple_reply(0, cookie))
            if data is None:
                out += _replies.zero_pieces(size)
            else:
                out.append(data)
        else:
            if request.flags & _DF and not (offset == start and complete):
                raise LocalProtocolError(f"read {cookie:#x} has DF set: answer it in one chunk")
            if progress is not None:
                for other, other_size in progress.ranges:
                    if offset < other + other_size and other < offset + size:
                        raise LocalProtocolError(f"read chunk {offset}+{size} overlaps chunk {other}+{other_size}")
            last = done or complete
            if data is None:
                out.append(_replies.offset_hole_chunk(self.extended_headers, last, cookie, start, offset, size))
            else:
                out += (_offset_data_header(self.extended_headers, last, cookie, start, offset, size), data)
        if complete:
            del self._in_flight[cookie]
            self._progress.pop(cookie, None)
            return
        if progress is None:
            progress = self._progress[cookie] = Progress()
        progress.covered = covered
        progress.ranges.append((offset, size))

    def _success(self, cookie: int) -> None:
        request = self._request_for(cookie)
        if type(request) in (ReadRequest, BlockStatusRequest):
            raise LocalProtocolError(f"SuccessReply cannot answer {type(request).__name__} {cookie:#x}: send data")
        del self._in_flight[cookie]
        if type(request) is ResizeRequest:
            # RESIZE extension: once it succeeded, requests are checked against the new size.
            self._shrunk_from = self._size if request.size < self._size else 0
            self._size = request.size
        if self.extended_headers:
            # spec: with extended headers every reply is a chunk; success is a NONE chunk with DONE.
            self._out.append(_replies.chunk_header(True, 1, 0, cookie, _wire_offset(request), 0))
        else:
            self._out.append(_simple_reply(0, cookie))

    def _error_reply(self, event: ErrorReply) -> None:
        cookie = event.cookie
        request = self._request_for(cookie)
        error = Errno(event.error)
        if error == Errno.OK:
            raise LocalProtocolError("ErrorReply needs a non-zero error")
        if not self.structured_replies:
            if cookie in self._progress:
                raise LocalProtocolError(
                    f"read {cookie:#x} already sent data in a simple reply; an error can only be a disconnect"
                )
            self._out.append(_simple_reply(error, cookie))
        else:
            start = _wire_offset(request)
            span = getattr(request, "length", 0)
            offset = event.offset
            if offset is not None and not start <= offset < start + max(span, 1):
                raise LocalProtocolError(f"error offset {offset} is outside the request {start}+{span}")
            limit = min(MAX_STRING_LENGTH, self._max_payload)
            chunk = _replies.error_chunk(
                self.extended_headers, True, cookie, start, error, event.message, offset, limit
            )
            self._out.append(chunk)
        del self._in_flight[cookie]
        self._progress.pop(cookie, None)

    def _block_status(self, event: BlockStatusReply) -> None:
        request = self._request_for(event.cookie)
        if type(request) is not BlockStatusRequest:
            raise LocalProtocolError(f"block status sent for cookie {event.cookie:#x}, a {type(request).__name__}")
        if set(event.extents) != set(request.context_ids):
            raise LocalProtocolError(
                f"block status reply covers contexts {sorted(event.extents)}, the request asked for "
                f"{sorted(request.context_ids)}"
            )
        chunks = [(i, self._normalise_extents(request, event.extents[i])) for i in request.context_ids]
        for n, (context_id, extents) in enumerate(chunks):
            last = n == len(chunks) - 1
            chunk = _replies.block_status_chunk(
                self.extended_headers, last, event.cookie, request.offset, context_id, extents
            )
            self._out.append(chunk)
        del self._in_flight[event.cookie]

    def _normalise_extents(self, request: BlockStatusRequest, extents: Iterable[Extent]) -> list[Extent]:
        """Make the application's extents what the spec allows: positive lengths that fit the descriptor and are
        multiples of the minimum block size, none starting past the request's end, at most 2^20, a single one
        no longer than the request under REQ_ONE, and at least one."""
        wide = self.extended_headers
        limit = 0xFFFFFFFFFFFFFFFF if wide else 0xFFFFFFFF
        step_limit = limit - limit % self._min_block
        # spec: at most 2^20 descriptors a chunk, and the descriptor list (the chunk's variable part) no larger
        # than the maximum payload.
        most = min(_MAX_DESCRIPTORS, self._max_payload // (16 if wide else 8))
        out: list[Extent] = []
        covered = 0
        min_block = self._min_block
        for length, status in extents:
            if length <= 0:
                raise LocalProtocolError(f"extent length {length} must be positive")
            if not 0 <= status <= 0xFFFFFFFF:
                # Every context nbdproto knows has 32-bit status; with extended headers the high half MUST be 0.
                raise LocalProtocolError(f"extent status {status:#x} does not fit the descriptor")
            if length % min_block and request.offset + covered + length < self._size:
                # spec: descriptor lengths MUST be multiples of the minimum block size (the export's tail aside).
                raise LocalProtocolError(f"extent length {length} is not a multiple of the {min_block}-byte block")
            while length > 0 and covered < request.length:
                step = min(length, step_limit)
                out.append(Extent(step, status))
                covered += step
                length -= step
            if covered >= request.length or len(out) >= most:
                break
        if not out:
            raise LocalProtocolError("a block status reply needs at least one extent per context")
        if request.flags & _REQ_ONE:
            # One descriptor, no longer than the request, and still a whole number of blocks where it can be.
            length = min(out[0].length, request.length)
            if length > min_block:
                length -= length % min_block
            out = [Extent(length, out[0].status)]
        return out[:most]
