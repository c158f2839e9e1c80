"""The client's requests in transmission: each checked against what the server advertised before a byte is
queued (spec: "Transmission flags", "Command flags", "Block size constraints"), then remembered by cookie until
its reply is complete (``_client_replies`` reads the replies). Breaking a client MUST is a LocalProtocolError,
and a refused request leaves the connection as it was.
"""

from __future__ import annotations

import functools
from typing import cast

from nbdproto.wire import Command, LocalProtocolError, TransmissionFlags, headers, layout

from ._client_checks import ReadCoverage
from ._commands import PAYLOAD_LEN_BIT as _PAYLOAD_LEN
from ._commands import RULE_OF, request_error
from ._connection import Connection
from ._events import Event
from ._handshake_events import Export
from ._payloads import Extent
from ._state import Role
from ._transmission_events import (
    BlockStatusRequest,
    DisconnectRequest,
    ErrorReply,
    ReadRequest,
    Request,
    ResizeRequest,
    WriteRequest,
)

__all__ = ["ClientRequesting", "Pending"]

_READ, _WRITE = Command.READ, Command.WRITE
_READ_ONLY = int(TransmissionFlags.READ_ONLY)


class Pending:
    """A request waiting for (the rest of) its reply."""

    __slots__ = ("request", "command", "flags", "offset", "length", "buffer", "coverage", "started", "error",
                 "extents")  # fmt: skip

    def __init__(
        self,
        request: Request,
        command: Command,
        offset: int,
        length: int,
        flags: int,
        buffer: memoryview | None = None,
    ) -> None:
        self.request = request
        self.command = command
        self.flags = flags
        self.offset = offset
        self.length = length
        self.buffer = buffer
        self.coverage: ReadCoverage | None = None  # made at a read's first data or hole chunk
        self.started = False  # a chunk of the reply has arrived
        self.error: ErrorReply | None = None
        self.extents: dict[int, tuple[Extent, ...]] | None = None  # a block status's, made at its first chunk

    def own_buffer(self) -> memoryview:
        """Where a read's bytes go: the caller's buffer, or one of the read's length made now. A read sent
        without a buffer gets its own only when its data arrives (``buffer`` None until then): the fast road
        makes it from the received bytes with one copy, where a buffer made at sending was zeroed and then
        filled (bench_engine: a seventh of a client read's cost)."""
        buffer = self.buffer
        if buffer is None:
            buffer = self.buffer = memoryview(bytearray(self.length))
        return buffer


class ClientRequesting(Connection):
    """The transmission state of a client connection, and its requests (for ClientConnection)."""

    role = Role.CLIENT
    _peer = "server"
    _fast_paths = True
    """The short roads for plain READs and their whole replies (a test turns them off to compare with the full
    checks)."""
    strict: bool
    """Hold every request to what the server stated, whether or not the client asked for it: ranges aligned to
    the minimum block size it sent even when NBD_INFO_BLOCK_SIZE was not requested (otherwise only a client that
    asked is bound: spec "Size constraints"), and write payloads within its maximum payload (otherwise only
    reads are). Set by ClientConnection from its ``strict`` argument; may be switched at any time; see
    ``_send_request``."""

    def __init__(self) -> None:
        super().__init__()
        self.export: Export | None = None
        self._alignment = 1
        self._export_flags = 0  # the export's transmission flags as an int: an IntFlag operation costs a call
        self._pending: dict[int, Pending] = {}
        self._disconnected = False
        # A read payload arriving straight into the caller's buffer: the part still to fill, the request it
        # belongs to, and whether the request is complete once it is filled (a simple reply, or a DONE chunk).
        self._direct_pending: Pending | None = None
        self._direct_done = False
        self.server_shutting_down = False
        """True once a reply carried NBD_ESHUTDOWN: no new request may be sent, and the driver must send
        NBD_CMD_DISC (spec: "Terminating the transmission phase"), best once ``in_flight`` is 0."""

    @property
    def must_disconnect(self) -> bool:
        """True when the driver should send DisconnectRequest now: the server is shutting down and every
        request in flight has its reply."""
        return self.server_shutting_down and not self._pending and not self._disconnected

    @property
    def in_flight(self) -> int:
        """Requests sent whose replies are not complete yet."""
        return len(self._pending)

    def _start_transmission(self, export: Export, bound: bool = True) -> None:
        # spec ("Size constraints"): a client that asked for NBD_INFO_BLOCK_SIZE MUST keep to the minimum it got;
        # one that did not is free to send unaligned requests, which the server must then fail cleanly.
        self.export = export
        self._alignment = export.minimum_block_size if bound else 1
        self._export_flags = int(export.flags)
        codec = headers.EXTENDED_REQUEST if self.extended_headers else headers.REQUEST
        self._read_header = functools.partial(codec.pack, codec.magic, 0, int(Command.READ))
        """(cookie, offset, length) -> a READ's request header with no flags (the fast path below)."""

    # --- Requests ------------------------------------------------------------------------------------------

    def _send_request(self, event: Event) -> None:
        export = self.export
        assert export is not None
        # The common request first: a READ without flags, that every check below lets through as it is. (Its
        # length needs no check against the compact header's 32 bits: the maximum payload is never more, being
        # NBD_INFO_BLOCK_SIZE's 32-bit field or the default.)
        if (
            type(event) is ReadRequest
            and not event.flags
            and self._fast_paths
            and not (self._disconnected or self.server_shutting_down)
        ):
            cookie, offset, length, buffer = event.cookie, event.offset, event.length, event.buffer
            if (  # _plainly_valid, written out: the call costs this, the client's hottest path, 5% (bench_engine)
                0 < length <= export.maximum_payload
                and offset >= 0
                and offset + length <= export.size
                and not (offset | length) % (export.minimum_block_size if self.strict else self._alignment)
                and cookie not in self._pending
            ):
                if buffer is None:  # (made when the data arrives: Pending.own_buffer)
                    self._pending[cookie] = Pending(event, _READ, offset, length, 0)
                    self._out.append(self._read_header(cookie, offset, length))
                    return
                view = memoryview(buffer).cast("B")  # the caller's: a wrong size or a read-only one meets the
                if len(view) == length and not view.readonly:  # full check below
                    self._pending[cookie] = Pending(event, _READ, offset, length, 0, view)
                    self._out.append(self._read_header(cookie, offset, length))
                    return
        # The other common one: a WRITE without flags, within the maximum payload, on a writable export.
        elif (
            type(event) is WriteRequest
            and not event.flags
            and self._fast_paths
            and not (self._disconnected or self.server_shutting_down or self._export_flags & _READ_ONLY)
        ):
            cookie, offset, data = event.cookie, event.offset, event.data
            length = len(data)
            if self._plainly_valid(export, cookie, offset, length):
                self._pending[cookie] = Pending(event, _WRITE, offset, length, 0)
                self._queue_header(_WRITE, _PAYLOAD_LEN if self.extended_headers else 0, cookie, offset, length)
                self._out.append(data)
                return
        if self._disconnected:
            raise LocalProtocolError("no request may follow NBD_CMD_DISC")
        kind = type(event)
        rule = RULE_OF[kind]  # send() lets nothing else through in transmission (_state.SENDS: the requests)
        request = cast(Request, event)
        if self.server_shutting_down and kind is not DisconnectRequest:
            raise LocalProtocolError("the server is shutting down (NBD_ESHUTDOWN): only NBD_CMD_DISC may follow")
        cookie = request.cookie
        if kind is DisconnectRequest:
            self._disconnected = True
            self._queue_header(Command.DISC, 0, cookie, 0, 0)
            return
        if cookie in self._pending:
            raise LocalProtocolError(f"cookie {cookie:#x} is still in flight")
        flags = int(getattr(request, "flags", 0))
        if flags & _PAYLOAD_LEN:
            raise LocalProtocolError("NBD_CMD_FLAG_PAYLOAD_LEN is the connection's to set, not the caller's")
        if kind is WriteRequest:
            offset, length = request.offset, len(request.data)  # type: ignore[union-attr]
        elif kind is ResizeRequest:
            offset, length = request.size, 0  # type: ignore[union-attr]  # RESIZE: the new size, in offset
        else:
            offset, length = getattr(request, "offset", 0), getattr(request, "length", 0)
        strict = self.strict
        refusal = request_error(
            rule,
            flags,
            offset,
            length,
            export_flags=self._export_flags,
            size=export.size,
            alignment=export.minimum_block_size if strict else self._alignment,
            max_payload=export.maximum_payload,
            has_contexts=bool(self._meta_contexts),
            structured=self.structured_replies,
            write_limit=strict,
        )
        if refusal is not None:
            # error_code: what a server would answer the request with (EINVAL, EPERM, ENOSPC, EOVERFLOW).
            raise LocalProtocolError(refusal[1], refusal[0])
        if not self.extended_headers and length > 0xFFFFFFFF:
            raise LocalProtocolError(f"length {length} needs extended headers")
        pending = Pending(request, rule.command, offset, length, flags)
        if kind is ReadRequest:
            read: ReadRequest = request  # type: ignore[assignment]
            buffer = read.buffer if read.buffer is not None else bytearray(length)
            view = memoryview(buffer).cast("B")
            if len(view) != length or view.readonly:
                raise LocalProtocolError(f"read buffer must be writable and {length} bytes long")
            pending.buffer = view
        elif kind is BlockStatusRequest:
            payload = self._context_filter(request)  # type: ignore[arg-type]
            if payload is not None:
                self._pending[cookie] = pending
                self._queue_header(rule.command, flags | _PAYLOAD_LEN, cookie, offset, len(payload))
                self._out.append(payload)
                return
        self._pending[cookie] = pending
        if kind is WriteRequest:
            extra = _PAYLOAD_LEN if self.extended_headers else 0
            self._queue_header(rule.command, flags | extra, cookie, offset, length)
            self._out.append(request.data)  # type: ignore[union-attr]
            return
        self._queue_header(rule.command, flags, cookie, offset, length)

    def _plainly_valid(self, export: Export, cookie: int, offset: int, length: int) -> bool:
        """What the full check asks of a READ or WRITE without flags, for the short roads: a free cookie and a
        range inside the export, aligned as the client is bound to, within the maximum payload."""
        return (
            0 < length <= export.maximum_payload
            and offset >= 0
            and offset + length <= export.size
            and not (offset | length) % (export.minimum_block_size if self.strict else self._alignment)
            and cookie not in self._pending
        )

    @property
    def can_choose_contexts(self) -> bool:
        """Whether a block status request may ask for some of the agreed meta contexts rather than all of them
        (extended headers and NBD_FLAG_BLOCK_STATUS_PAYLOAD)."""
        export = self.export
        return (
            export is not None and self.extended_headers and bool(export.flags & TransmissionFlags.BLOCK_STATUS_PAYLOAD)
        )

    def _context_filter(self, status: BlockStatusRequest) -> bytes | None:
        """The payload that chooses some of the agreed meta contexts for a block status request, or None when
        it asks for all of them (the compact form)."""
        ids = status.context_ids
        if any(i not in self._meta_contexts for i in ids) or len(set(ids)) != len(ids):
            raise LocalProtocolError(f"context ids {list(ids)} are repeated or were not agreed")
        if not ids or set(ids) == set(self._meta_contexts):
            return None
        if not self.can_choose_contexts:
            raise LocalProtocolError("choosing contexts per request needs NBD_FLAG_BLOCK_STATUS_PAYLOAD")
        return layout.encode(layout.BlockStatusRequestPayload, {"effect_length": status.length, "context_ids": ids})

    def _queue_header(self, command: int, flags: int, cookie: int, offset: int, length: int) -> None:
        codec = headers.EXTENDED_REQUEST if self.extended_headers else headers.REQUEST
        self._out.append(codec.pack(codec.magic, flags, command, cookie, offset, length))
