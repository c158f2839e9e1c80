"""The server's requests in transmission: every request checked before the application sees it (spec: "Request
types", "Command flags", "Error values", "Block size constraints"); an invalid one is answered here with the
error the spec names and never surfaces as an event.

This is the hot path: the common request (a READ or WRITE with valid fields) takes the short road through
``_next_in_transmission`` (and a row of valid READs one loop, ``_queue_reads``); the replies are
``_server_replies``'.
"""

from __future__ import annotations

import struct

from nbdproto.wire import MAX_STRING_LENGTH, Command, CommandFlags, Errno, TransmissionFlags, headers, layout

from . import _replies
from ._commands import COMMANDS, request_error
from ._commands import PAYLOAD_LEN_BIT as _PAYLOAD_LEN
from ._events import ConnectionClosed, Event
from ._server_base import ServerBase
from ._state import NEED_DATA, PAUSED, Phase, Trigger
from ._transmission_events import (
    BlockStatusRequest,
    CacheRequest,
    DisconnectRequest,
    FlushRequest,
    ReadRequest,
    Request,
    ResizeRequest,
    TrimRequest,
    WritePayload,
    WriteRequest,
    WriteZeroesRequest,
)

__all__ = ["ServerRequests"]

# Every combination of the six command flags, made once: IntFlag construction costs ~300 ns per call.
_COMMAND_FLAGS = tuple(CommandFlags(i) for i in range(1 << len(CommandFlags)))
_NO_FLAGS = _COMMAND_FLAGS[0]
_READ, _WRITE, _DISC = int(Command.READ), int(Command.WRITE), int(Command.DISC)
_BLOCK_STATUS = int(Command.BLOCK_STATUS)
_TRANSMISSION = Phase.TRANSMISSION
_simple_reply = _replies.simple_reply


def _read_rows(codec: headers.HeaderCodec) -> tuple[struct.Struct, int]:
    """``codec``'s layout with its first three fields (magic, flags, type: 4 + 2 + 2 bytes) read as one 64-bit
    number, and that number for a READ without flags: a row of READs is checked with one comparison each."""
    fmt = codec.struct.format
    magic = codec.magic
    if magic is None or struct.calcsize(fmt[:4]) != 8 or codec.names[:3] != ("magic", "flags", "type"):
        raise TypeError(f"{codec.name} ({fmt}) does not start with magic, flags and type")
    return struct.Struct(">Q" + fmt[4:]), magic << 32 | _READ


_READ_ROWS = {codec: _read_rows(codec) for codec in (headers.REQUEST, headers.EXTENDED_REQUEST)}


class ServerRequests(ServerBase):
    """Requests for ServerConnection."""

    _fast_paths = True
    """The short roads for valid READs and whole WRITEs (a test turns them off to compare with the full check)."""

    # --- Requests ------------------------------------------------------------------------------------------

    def receive_lone_read(self, data: bytes | bytearray | memoryview) -> ReadRequest | None:
        """``receive_data(data)``, for a server whose client sends one request at a time: when ``data`` (all
        that one receive brought) is one valid READ without flags, with nothing received or handed over before
        it still waiting, that READ is returned at once, in flight as if ``next_requests`` had handed it over
        (it will not be handed over again: answer it with ``send``). Otherwise None, and the bytes wait for
        ``next_requests``, as after ``receive_data``.

        The one-request road: one call, where ``next_requests`` goes through ``next_event`` twice (the request,
        then NEED_DATA) to end a batch of one, and one request at a time costs a batch each (fio QD1). The READ
        is checked as the short roads of ``_server_requests`` check it (tests/test_command_rules.py holds them
        all to the full check)."""
        codec = self._request_codec
        if (
            type(data) is bytes
            and len(data) == codec.size
            and self._phase is _TRANSMISSION
            and not self._in_flight
            and not self._buf.size
            and self._payload_event is None
            and self._write_rest is None
            and self._into is None
            and not (self._skip or self._disconnecting or self._events)
            and self._fast_paths
        ):
            rows, read_head = _READ_ROWS[codec]
            head, cookie, offset, length = rows.unpack(data)
            if (
                head == read_head  # the magic, no flags, READ
                and 0 < length <= self._max_payload
                and offset + length <= self._size
                and not (offset | length) % self._min_block
            ):
                # ReadRequest(cookie, offset, length), without the call to its __init__ (as _queue_reads makes it).
                self._in_flight[cookie] = read = object.__new__(ReadRequest)
                read.cookie, read.offset, read.length, read.flags, read.buffer = cookie, offset, length, _NO_FLAGS, None
                return read
        self.receive_data(data)
        return None

    def received_in_place(self, count: int, header: memoryview) -> WriteRequest | None:
        """The driver received ``count`` bytes into ``write_buffer()`` (the rest of a write's payload: in place,
        see ``write_view``, or into the payload's own buffer) and then into ``header`` (room for a request
        header), with one receive. When they are the whole rest of that payload and one whole header, the write
        is returned, handed over here (no ``next_requests`` returns it), and the header is taken: a valid WRITE
        goes to ``_arriving_write`` at once (received in place or into a buffer of its own: its
        ``write_buffer()`` is ready, and nothing else has arrived, so ``next_requests`` would say NEED_DATA;
        streamed in parts: its first part waits for ``next_requests``).
        Otherwise None: the bytes are taken as ``received_into`` and ``receive_data`` take them (0: the client
        closed), for ``next_requests``.

        The road of a client that streams big writes (nbdcopy's 256 KiB): a call a write where ``next_requests``
        went through ``next_event`` twice (the write done, then the next header: NEED_DATA) and the receive's
        bytes through two calls more. The header is checked as the fast path of ``_next_in_transmission`` checks
        it (tests/test_command_rules.py holds both to the full check)."""
        into, event, codec = self._into, self._payload_event, self._request_codec
        size = codec.size
        if (
            into is None
            or type(event) is not WriteRequest
            or count != len(into) + size
            or self._events
            or self._buf.size
            or self._phase is not _TRANSMISSION
            or not self._fast_paths
        ):
            into_payload = 0 if into is None else min(count, len(into))
            if into_payload or not count:
                self.received_into(into_payload)
            if count > into_payload:
                self.receive_data(bytes(header[: count - into_payload]))
            return None
        self._into = self._payload_event = None
        magic, flags, command, cookie, offset, length = codec.unpack_from(header)
        if (
            command == _WRITE
            and magic == codec.magic
            and 0 < length <= self._max_payload
            and (flags & ~_PAYLOAD_LEN) in self._plain_write_flags
            and bool(flags & _PAYLOAD_LEN) == self.extended_headers
            and offset + length <= self._size
            and not (offset | length) % self._min_block
            and cookie not in self._in_flight
        ):
            arrived = self._arriving_write(flags, cookie, offset, length)  # (nothing of its payload is here)
            if isinstance(arrived, Event):  # a write streamed in parts: its first, for next_requests
                self._events.append(arrived)
            return event
        self._buf.append(bytes(header[:size]))  # for next_requests, whatever it is
        return event

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
                event: Request = ReadRequest(cookie, offset, length, _NO_FLAGS)
                in_flight[cookie] = event
                if buf.size >= header_size:
                    self._queue_requests()
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
                if buf.size < length:
                    return self._arriving_write(flags, cookie, offset, length)
                event = WriteRequest(cookie, offset, buf.take(length), _COMMAND_FLAGS[flags & ~_PAYLOAD_LEN])
                in_flight[cookie] = event
                if buf.size >= header_size:
                    self._queue_requests()
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
                if buf.size < header_size + payload:
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

    def _queue_requests(self) -> None:
        """Queue every valid READ, and every valid WRITE whose payload is all here, that lies right behind the
        request just taken in the same received chunk, as the fast paths above check them: one loop over the
        headers instead of an engine call each (a pipelining client sends dozens back to back). The first
        request that is anything else stops it, for the full path."""
        buf = self._buf
        head, start = buf.chunk()
        codec = self._request_codec
        size, unpack, magic_ok = codec.size, codec.unpack_from, codec.magic
        in_flight, append = self._in_flight, self._events.append
        limit, export_size, block = self._max_payload, self._size, self._min_block
        write_flags, extended = self._plain_write_flags, self.extended_headers
        pos, end = start, len(head)
        while pos + size <= end:
            magic, flags, command, cookie, offset, length = unpack(head, pos)
            if (
                magic != magic_ok
                or not 0 < length <= limit
                or offset + length > export_size
                or (offset | length) % block
                or cookie in in_flight
            ):
                break
            if command == _READ and not flags:
                pos += size * self._queue_reads(memoryview(head)[pos : pos + (end - pos) // size * size])
                continue
            if (
                command == _WRITE
                and (flags & ~_PAYLOAD_LEN) in write_flags
                and bool(flags & _PAYLOAD_LEN) == extended
                and pos + size + length <= end
            ):
                # WriteRequest(cookie, offset, data, flags), without the call to its __init__ (as reads are made).
                in_flight[cookie] = event = object.__new__(WriteRequest)
                event.cookie, event.offset, event.flags, event.more, event.in_place = (
                    cookie, offset, _COMMAND_FLAGS[flags & ~_PAYLOAD_LEN], False, False
                )  # fmt: skip
                event.data = memoryview(head)[pos + size : pos + size + length]
                append(event)
                pos += size + length
            else:
                break
        if pos != start:
            buf.skip(pos - start)

    def _queue_reads(self, headers: memoryview) -> int:
        """Queue the valid READs at the start of ``headers`` (whole request headers), as the fast path checks
        them, with one iter_unpack over them; how many it queued (at least one, when the first is one)."""
        rows, read_head = _READ_ROWS[self._request_codec]
        queued, in_flight = self._events, self._in_flight
        append, before = queued.append, len(queued)
        limit, export_size, block = self._max_payload, self._size, self._min_block
        new = object.__new__
        for head, cookie, offset, length in rows.iter_unpack(headers):
            if (
                head != read_head  # the magic, no flags, READ
                or not 0 < length <= limit
                or offset + length > export_size
                or (offset | length) % block
                or cookie in in_flight
            ):
                break
            # ReadRequest(cookie, offset, length), without the call to its __init__ (a third of the cost here).
            in_flight[cookie] = event = new(ReadRequest)
            event.cookie, event.offset, event.length = cookie, offset, length
            event.flags, event.buffer = _NO_FLAGS, None
            append(event)
        return len(queued) - before

    def _arriving_write(self, flags: int, cookie: int, offset: int, payload: int) -> Event | type[NEED_DATA]:
        """A checked WRITE (its header taken) whose payload has not all arrived: received in place when none of
        it has and the application gave a ``write_view`` for it, else streamed or into a buffer of its own."""
        write_view = self.write_view
        if write_view is not None and not self._buf.size:
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
        data = buf.take_some(payload) if buf.size else memoryview(b"")
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
        have = buf.size
        if have:
            view[:have] = buf.take(have)
        self._into = view[have:]
        event = WriteRequest(cookie, offset, data, _COMMAND_FLAGS[flags & ~_PAYLOAD_LEN], in_place=in_place is not None)
        self._in_flight[cookie] = event
        self._payload_event = event
        return self._closed_or_need_data() if self._eof else NEED_DATA  # (the call only at the end: a call a write)

    def _write_payload(self) -> Event | type[NEED_DATA]:
        """The next part of the streamed write's payload, as much as has arrived."""
        buf = self._buf
        if not buf.size:
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
