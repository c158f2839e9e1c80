"""The events of transmission: the requests a client sends and a server receives, and the replies.

Replies: the server sends ``ReadData`` / ``ReadHole`` chunks, ``BlockStatusReply``, ``SuccessReply`` and
``ErrorReply``; the client receives one complete reply per request: ``ReadReply``, ``BlockStatusReply``,
``SuccessReply`` or ``ErrorReply``. Requests are on the hot path: they are kept flat, their fields in wire order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import get_args

from nbdproto.wire import CommandFlags, Errno

from ._events import Event
from ._payloads import Extent, Payload

__all__ = [
    "NO_FLAGS",
    "ReadRequest",
    "WriteRequest",
    "WritePayload",
    "DisconnectRequest",
    "FlushRequest",
    "TrimRequest",
    "CacheRequest",
    "WriteZeroesRequest",
    "BlockStatusRequest",
    "ResizeRequest",
    "Request",
    "WORK_TYPES",
    "ReadData",
    "ReadHole",
    "ReadReply",
    "BlockStatusReply",
    "SuccessReply",
    "ErrorReply",
    "Reply",
]

NO_FLAGS = CommandFlags(0)
"""The empty set of command flags (the default of every request)."""


# --- Transmission requests -----------------------------------------------------------------------------------
# Requests are on the hot path: keep them flat, with the fields in wire order.


class ReadRequest(Event):
    """NBD_CMD_READ of ``length`` bytes at ``offset``. Client role: ``buffer``, if given, is where the reply's
    data is assembled (a writable buffer of ``length`` bytes); otherwise the connection allocates one. Server
    role: the engine leaves it None; a server may set it to where the device should read the data into."""

    __slots__ = ("cookie", "offset", "length", "flags", "buffer")
    _hidden = ("buffer",)

    cookie: int
    offset: int
    length: int
    flags: CommandFlags
    buffer: memoryview | bytearray | None

    def __init__(
        self,
        cookie: int,
        offset: int,
        length: int,
        flags: CommandFlags = NO_FLAGS,
        buffer: memoryview | bytearray | None = None,
    ) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.flags = flags
        self.buffer = buffer


class WriteRequest(Event):
    """NBD_CMD_WRITE of ``data`` at ``offset`` (FUA may be set in ``flags``).

    Server role, with ``more`` set: the payload goes on beyond ``data`` and arrives in ``WritePayload`` events,
    the last one marked (a server that streams large writes, see ``ServerConnection(stream_writes_over=...)``);
    the write may be answered only after the last part. With ``in_place`` set, the payload was received straight
    into the device's own storage (``data`` is the view ``ServerConnection.write_view`` gave): it is written
    already, and carrying it out is only FUA's flush."""

    __slots__ = ("cookie", "offset", "data", "flags", "more", "in_place")

    cookie: int
    offset: int
    data: bytes | bytearray | memoryview
    flags: CommandFlags
    more: bool
    in_place: bool

    def __init__(
        self,
        cookie: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        flags: CommandFlags = NO_FLAGS,
        more: bool = False,
        in_place: bool = False,
    ) -> None:
        self.cookie = cookie
        self.offset = offset
        self.data = data
        self.flags = flags
        self.more = more
        self.in_place = in_place


class WritePayload(Event):
    """Server role: the next part of a streamed write's payload (see ``WriteRequest.more``): ``data`` goes at
    ``offset`` of the export; ``last`` marks the end of write ``cookie``'s payload."""

    __slots__ = ("cookie", "offset", "data", "last")

    cookie: int
    offset: int
    data: memoryview
    last: bool

    def __init__(self, cookie: int, offset: int, data: memoryview, last: bool) -> None:
        self.cookie = cookie
        self.offset = offset
        self.data = data
        self.last = last


class DisconnectRequest(Event):
    """NBD_CMD_DISC: the client is done; the server finishes what is in flight, then closes. No reply."""

    __slots__ = ("cookie",)

    cookie: int

    def __init__(self, cookie: int = 0) -> None:
        self.cookie = cookie


class FlushRequest(Event):
    """NBD_CMD_FLUSH: make every completed write durable."""

    __slots__ = ("cookie", "flags")

    cookie: int
    flags: CommandFlags

    def __init__(self, cookie: int, flags: CommandFlags = NO_FLAGS) -> None:
        self.cookie = cookie
        self.flags = flags


class _RangeRequest(Event):
    """A request for ``length`` bytes at ``offset`` that carries no data either way (TRIM, CACHE, WRITE_ZEROES)."""

    __slots__ = ("cookie", "offset", "length", "flags")

    cookie: int
    offset: int
    length: int
    flags: CommandFlags

    def __init__(self, cookie: int, offset: int, length: int, flags: CommandFlags = NO_FLAGS) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.flags = flags


class TrimRequest(_RangeRequest):
    """NBD_CMD_TRIM: ``length`` bytes at ``offset`` need not be kept (they read back as anything)."""

    __slots__ = ()


class CacheRequest(_RangeRequest):
    """NBD_CMD_CACHE: prefetch ``length`` bytes at ``offset``."""

    __slots__ = ()


class WriteZeroesRequest(_RangeRequest):
    """NBD_CMD_WRITE_ZEROES: ``length`` bytes at ``offset`` read back as zero. Without NO_HOLE the server may
    punch a hole; with FAST_ZERO it must fail quickly (ENOTSUP) rather than write zeroes slowly."""

    __slots__ = ()


class BlockStatusRequest(Event):
    """NBD_CMD_BLOCK_STATUS for ``length`` bytes at ``offset``. ``context_ids`` are the meta contexts to
    answer for: all agreed ones, or the subset an extended request's payload named (server role); empty on
    the client side means all."""

    __slots__ = ("cookie", "offset", "length", "flags", "context_ids")

    cookie: int
    offset: int
    length: int
    flags: CommandFlags
    context_ids: tuple[int, ...]

    def __init__(
        self, cookie: int, offset: int, length: int, flags: CommandFlags = NO_FLAGS, context_ids: tuple[int, ...] = ()
    ) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.flags = flags
        self.context_ids = context_ids


class ResizeRequest(Event):
    """NBD_CMD_RESIZE (experimental extension): change the export's size to ``size`` bytes."""

    __slots__ = ("cookie", "size", "flags")

    cookie: int
    size: int
    flags: CommandFlags

    def __init__(self, cookie: int, size: int, flags: CommandFlags = NO_FLAGS) -> None:
        self.cookie = cookie
        self.size = size
        self.flags = flags


Request = (
    ReadRequest
    | WriteRequest
    | DisconnectRequest
    | FlushRequest
    | TrimRequest
    | CacheRequest
    | WriteZeroesRequest
    | BlockStatusRequest
    | ResizeRequest
)

WORK_TYPES: frozenset[type[Event]] = (frozenset(get_args(Request)) - {DisconnectRequest}) | {WritePayload}
"""What a server carries out and answers: every request but NBD_CMD_DISC (which nothing answers), and the parts
of a streamed write's payload (``ServerConnection.next_requests`` gathers them)."""

# --- Transmission replies ------------------------------------------------------------------------------------


# --- Transmission replies ------------------------------------------------------------------------------------


class ReadData(Event):
    """Server role: ``data`` read at ``offset`` for read ``cookie``. One chunk covering the whole request is
    the common case; several (with ReadHole) may cover it in pieces when structured replies are in use. With
    simple replies the pieces must arrive in order and cover the request exactly. ``done`` ends the reply.
    ``data`` is queued as it is, never copied: a buffer, or a FileRegion (see there)."""

    __slots__ = ("cookie", "offset", "data", "done")

    cookie: int
    offset: int
    data: Payload
    done: bool

    def __init__(self, cookie: int, offset: int, data: Payload, done: bool = True) -> None:
        self.cookie = cookie
        self.offset = offset
        self.data = data
        self.done = done


class ReadHole(Event):
    """Server role: ``length`` bytes at ``offset`` of read ``cookie`` read as zeroes (an OFFSET_HOLE chunk, or
    zero bytes in a simple reply)."""

    __slots__ = ("cookie", "offset", "length", "done")

    cookie: int
    offset: int
    length: int
    done: bool

    def __init__(self, cookie: int, offset: int, length: int, done: bool = False) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.done = done


class ReadReply(Event):
    """Client role: read ``cookie`` completed; ``data`` is the caller's buffer (or one the connection made),
    filled with the whole request's bytes (holes zeroed)."""

    __slots__ = ("cookie", "data")

    cookie: int
    data: memoryview

    def __init__(self, cookie: int, data: memoryview) -> None:
        self.cookie = cookie
        self.data = data


class BlockStatusReply(Event):
    """Both roles: block status for ``cookie``: for each meta context id, extents from the request's offset.
    The server sends it whole; the client receives it once every context's chunk arrived."""

    __slots__ = ("cookie", "extents")

    cookie: int
    extents: Mapping[int, tuple[Extent, ...]]

    def __init__(self, cookie: int, extents: Mapping[int, tuple[Extent, ...]]) -> None:
        self.cookie = cookie
        self.extents = extents


class SuccessReply(Event):
    """Both roles: request ``cookie`` (not a read or block status) succeeded."""

    __slots__ = ("cookie",)

    cookie: int

    def __init__(self, cookie: int) -> None:
        self.cookie = cookie


class ErrorReply(Event):
    """Both roles: request ``cookie`` failed with ``error``; ``message`` is for humans; ``offset`` is where the
    failure happened, when the server knows it (ERROR_OFFSET)."""

    __slots__ = ("cookie", "error", "message", "offset")

    cookie: int
    error: Errno
    message: str
    offset: int | None

    def __init__(self, cookie: int, error: Errno, message: str = "", offset: int | None = None) -> None:
        self.cookie = cookie
        self.error = error
        self.message = message
        self.offset = offset


Reply = ReadReply | BlockStatusReply | SuccessReply | ErrorReply
"""What a client receives: one complete reply per request."""
