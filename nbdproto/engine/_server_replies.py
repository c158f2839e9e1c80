"""The server's replies in transmission: the application's ``ReadData`` / ``ReadHole`` / ``BlockStatusReply`` /
``SuccessReply`` / ``ErrorReply`` go out as simple, structured or extended reply messages, whichever was
negotiated, after checks that they fit the request they answer (a bug in the application is a
LocalProtocolError, not a malformed reply on the wire). The common reply (one chunk answering a whole read) is
answered in ``ServerConnection.send`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from nbdproto.wire import MAX_STRING_LENGTH, Errno, LocalProtocolError

from . import _replies
from ._commands import DF_BIT as _DF
from ._commands import REQ_ONE_BIT as _REQ_ONE
from ._payloads import Extent, Payload
from ._server_base import Progress, ServerBase
from ._transmission_events import (
    BlockStatusReply,
    BlockStatusRequest,
    ErrorReply,
    ReadRequest,
    Request,
    ResizeRequest,
)

__all__ = ["ServerReplies"]

_MAX_DESCRIPTORS = 1 << 20  # spec: a server SHOULD NOT send more than 2^20 descriptors in one chunk
_simple_reply = _replies.simple_reply
_offset_data_header = _replies.offset_data_header


def _wire_offset(request: Request) -> int:
    """The offset field the request had on the wire, which an extended reply must echo."""
    if type(request) is ResizeRequest:
        return request.size  # RESIZE carries the new size in the offset field
    return getattr(request, "offset", 0)


class ServerReplies(ServerBase):
    """Replies for ServerConnection."""

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
        progress = self._progress.get(cookie)  # (one chunk of data answering the whole read: send() takes it)
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
            # One descriptor, no longer than the request, and still a whole number of blocks where it can be (one
            # shorter than a block, at the export's tail, stays as it is).
            length = min(out[0].length, request.length)
            out = [Extent(length - length % min_block or length, out[0].status)]
        return out[:most]
