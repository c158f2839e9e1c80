"""From a request event to block-device calls, and from their results to the reply event: no I/O.

Both backends serve requests the same way; only *how* a device method is called differs (directly in
nbdproto_threads, awaited in nbdproto_anyio). So the decisions live here, once:

    calls = device_calls(request, meta_contexts)      # which device methods, with which arguments
    results = [device.<call.method>(*call.args) ...]  # the backend's only part (sync or async)
    reply = reply_for(request, calls, results)        # the event to send
    # or, when a call raised:
    reply = error_reply_for(request, exc)

The device methods named here are the block-device protocol of both backends: ``pread_into(buffer, offset)``,
``pwrite(data, offset, fua)``, ``flush()``, ``trim(offset, length, fua)``, ``write_zeroes(offset, length,
may_trim=..., fast=..., fua=...)``, ``cache(offset, length)``, ``extents(context, offset, length)`` and
``resize(size)``.
"""

from __future__ import annotations

import errno as _errno
import os as _os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from nbdproto.engine import (
    BlockStatusReply,
    BlockStatusRequest,
    CacheRequest,
    DisconnectRequest,
    ErrorReply,
    Event,
    Extent,
    FlushRequest,
    ReadData,
    ReadRequest,
    Request,
    ResizeRequest,
    SuccessReply,
    TrimRequest,
    WriteRequest,
    WriteView,
    WriteZeroesRequest,
)
from nbdproto.wire import BASE_ALLOCATION, AllocationState, CommandFlags, Errno

__all__ = [
    "DeviceCall",
    "device_calls",
    "reply_for",
    "error_reply_for",
    "nbd_errno",
    "client_message",
    "OnError",
    "carry_out",
    "carry_out_all",
    "ReadView",
    "read_view_of",
    "WriteView",
    "write_view_of",
    "write_view_ended",
]

_ALLOCATION_BITS = int(AllocationState.HOLE | AllocationState.ZERO)
# int(flags) & bit: an IntFlag & IntFlag builds a new flag in Python, ~0.5 us per write.
_FUA_BIT = int(CommandFlags.FUA)


class DeviceCall(NamedTuple):
    """One call a backend makes on its device: ``getattr(device, method)(*args, **kwargs)``."""

    method: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = {}


def device_calls(request: Request, meta_contexts: Mapping[int, str]) -> list[DeviceCall]:
    """The device calls that carry out ``request`` (a request the engine already validated).

    A read gets the buffer its request names (a pipeline's, kept from a reply sent: ``pipelined_batch``), else
    a fresh one of its length, to fill; a block status request gets one ``extents`` call per
    meta context it asks for, by context name. ``DisconnectRequest`` needs no call (the backend flushes on
    close).
    """
    kind = type(request)
    if kind is ReadRequest:
        read: ReadRequest = request  # type: ignore[assignment]
        buffer = read.buffer
        return [
            DeviceCall("pread_into", (memoryview(bytearray(read.length) if buffer is None else buffer), read.offset))
        ]
    if kind is WriteRequest:
        write: WriteRequest = request  # type: ignore[assignment]
        if write.in_place:  # received into the device's storage: written already, FUA aside
            return [DeviceCall("flush", ())] if int(write.flags) & _FUA_BIT else []
        return [DeviceCall("pwrite", (write.data, write.offset, bool(int(write.flags) & _FUA_BIT)))]
    if kind is FlushRequest:
        return [DeviceCall("flush", ())]
    if kind is TrimRequest:
        trim: TrimRequest = request  # type: ignore[assignment]
        return [DeviceCall("trim", (trim.offset, trim.length, bool(int(trim.flags) & _FUA_BIT)))]
    if kind is WriteZeroesRequest:
        zero: WriteZeroesRequest = request  # type: ignore[assignment]
        options = {
            "may_trim": not zero.flags & CommandFlags.NO_HOLE,
            "fast": bool(zero.flags & CommandFlags.FAST_ZERO),
            "fua": bool(int(zero.flags) & _FUA_BIT),
        }
        return [DeviceCall("write_zeroes", (zero.offset, zero.length), options)]
    if kind is CacheRequest:
        cache: CacheRequest = request  # type: ignore[assignment]
        return [DeviceCall("cache", (cache.offset, cache.length))]
    if kind is BlockStatusRequest:
        status: BlockStatusRequest = request  # type: ignore[assignment]
        return [
            DeviceCall("extents", (meta_contexts[context_id], status.offset, status.length))
            for context_id in status.context_ids
        ]
    if kind is ResizeRequest:
        resize: ResizeRequest = request  # type: ignore[assignment]
        return [DeviceCall("resize", (resize.size,))]
    if kind is DisconnectRequest:
        return []
    raise TypeError(f"{kind.__name__} is not a request")


def reply_for(request: Request, calls: Sequence[DeviceCall], results: Sequence[Any]) -> Event:
    """The reply to ``request`` once every call of ``device_calls`` returned ``results`` (in order)."""
    kind = type(request)
    if kind is ReadRequest:
        read: ReadRequest = request  # type: ignore[assignment]
        return ReadData(read.cookie, read.offset, calls[0].args[0])
    if kind is BlockStatusRequest:
        status: BlockStatusRequest = request  # type: ignore[assignment]
        extents = {}
        for call, context_id, result in zip(calls, status.context_ids, results, strict=True):
            # spec ("base:allocation"): the flags other than HOLE and ZERO are reserved, sent as zero.
            if call.args[0] == BASE_ALLOCATION:
                extents[context_id] = tuple(Extent(int(n), int(flags) & _ALLOCATION_BITS) for n, flags in result)
            else:
                extents[context_id] = tuple(Extent(int(n), int(flags)) for n, flags in result)
        return BlockStatusReply(status.cookie, extents)
    return SuccessReply(request.cookie)


def error_reply_for(request: Request, exc: BaseException) -> ErrorReply:
    """The error reply for a request whose device call raised ``exc``.

    spec ("Error values"): ENOTSUP is only for a FAST_ZERO write-zeroes that cannot be fast, and EOVERFLOW only
    for sizes; a device that raises them elsewhere is reported as EINVAL.

    What a client is told, the rule for every device failure: the NBD error and its errno text ("Input/output
    error"), nothing else. The exception's own text stays in the server: it names what only the server should
    know (an upstream's socket path or URI, an object store's endpoint and keys, file paths), and the client
    can do nothing with it. The detail goes to the server's log, one line per failure (``OnError``:
    ConnectionLog.device_failed).
    """
    error = nbd_errno(exc)
    if (
        error == Errno.ENOTSUP and not (type(request) is WriteZeroesRequest and request.flags & CommandFlags.FAST_ZERO)
    ) or error == Errno.EOVERFLOW:
        error = Errno.EINVAL
    return ErrorReply(request.cookie, error, client_message(error))


def client_message(error: Errno) -> str:
    """The message an error reply carries to the client for ``error``: its errno's text, as strerror(3) says
    it on this system ("Input/output error")."""
    code = getattr(_errno, error.name, None)
    return _os.strerror(code) if code is not None else error.name


# errno of an OSError -> the NBD error the spec wants for it (spec: "Error values"); everything else is EIO.
_ERRNO_MAP = {
    _errno.EPERM: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.ENOTSUP: Errno.ENOTSUP,
    _errno.EOPNOTSUPP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> Errno:
    """The NBD error value that reports ``exc`` to the client (EIO for anything that is not a known OSError)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_MAP.get(exc.errno, Errno.EIO)
    return Errno.EIO


OnError = Callable[[Any, BaseException], None]
"""Told (request, exception) of every device failure, whose detail the client is not told (error_reply_for): an
OSError is the device's report (a log line), anything else a bug in it (worth a traceback; the client gets
EIO)."""
OnFlushError = Callable[[Any, str, OSError], None]
"""Told (client, export name, error) of a failed flush as a connection ends (nobody is left to answer)."""


ReadView = Callable[[int, int], Any]
"""A device's optional ``read_view(offset, length)``: the bytes as a zero-copy buffer, or None (then the read
goes through ``pread_into``). A backend passes it only where nothing but the kernel will read the buffer."""


def read_view_of(device: Any) -> ReadView | None:
    """The device's ``read_view`` method, if it has one."""
    return getattr(device, "read_view", None)


def write_view_of(device: Any) -> WriteView | None:
    """The device's ``write_view`` method (nbdproto.WriteView), if it has one."""
    return getattr(device, "write_view", None)


def write_view_ended(device: Any, write: WriteRequest) -> None:
    """Tell ``device`` that nothing more will be received into the view the in-place ``write`` went to (its
    ``write_view_ended``, if it has one; see nbdproto.BlockDevice)."""
    ended = getattr(device, "write_view_ended", None)
    if ended is not None:
        ended(write.data)


def _carried_out_in_place(device: Any, write: WriteRequest, on_error: OnError | None) -> Event:
    """The reply to a write received in place: its data is in the device already; FUA makes it durable."""
    try:
        if int(write.flags) & _FUA_BIT:
            device.flush()
    except Exception as exc:
        if on_error is not None:
            on_error(write, exc)
        return error_reply_for(write, exc)
    finally:
        write_view_ended(device, write)
    return SuccessReply(write.cookie)


def carry_out(
    device: Any,
    request: Request,
    meta_contexts: Mapping[int, str],
    on_error: OnError | None = None,
    read_view: ReadView | None = None,
) -> Event:
    """Carry ``request`` out on a sync ``device`` and return the reply event (an error reply if a call raised).

    nbdproto itself touches no file or socket: it only calls the methods of the device object it is given.
    Both backends use this for sync devices (the threads server directly, the anyio server in a worker thread).
    With ``read_view`` (see ReadView), reads are answered with the device's own buffer instead of a copy.
    """
    try:
        if type(request) is ReadRequest:
            # The commonest requests, straight through: one device call (the generic path below costs more
            # per request: bench/bench_engine.py).
            read: ReadRequest = request
            if read_view is not None:
                view = read_view(read.offset, read.length)
                if view is not None:
                    return ReadData(read.cookie, read.offset, view)
            buffer = bytearray(read.length)
            device.pread_into(memoryview(buffer), read.offset)
            return ReadData(read.cookie, read.offset, buffer)
        if type(request) is WriteRequest:
            write: WriteRequest = request
            if write.in_place:
                return _carried_out_in_place(device, write, on_error)
            device.pwrite(write.data, write.offset, bool(int(write.flags) & _FUA_BIT))
            return SuccessReply(write.cookie)
        calls = device_calls(request, meta_contexts)
        results = [getattr(device, call.method)(*call.args, **call.kwargs) for call in calls]
    except Exception as exc:  # a device failure becomes an NBD error reply, never a dead connection
        if on_error is not None:
            on_error(request, exc)
        return error_reply_for(request, exc)
    return reply_for(request, calls, results)


def carry_out_all(
    device: Any,
    requests: Sequence[Request],
    meta_contexts: Mapping[int, str],
    on_error: OnError | None = None,
    read_view: ReadView | None = None,
) -> list[Event]:
    """``carry_out`` for each request of a batch, in order: one call where a thread hop costs more than the I/O.

    A device with ``call_batch`` (a remote one) is handed every call of the batch at once, so that it can have
    them all in flight together; its results come back in order, each a return value or the exception raised.
    """
    call_batch = getattr(device, "call_batch", None)
    if call_batch is None:
        return [carry_out(device, request, meta_contexts, on_error, read_view) for request in requests]
    plans: list[tuple[Request, int, list[DeviceCall]]] = []
    calls: list[DeviceCall] = []
    for request in requests:
        these = device_calls(request, meta_contexts)
        plans.append((request, len(calls), these))
        calls += these
    try:
        results = call_batch(calls)
    except Exception as exc:  # the device broke its contract: every request of the batch fails
        results = [exc] * len(calls)
    finally:
        for request in requests:
            if type(request) is WriteRequest and request.in_place:
                write_view_ended(device, request)
    replies: list[Event] = []
    for request, start, these in plans:
        got = results[start : start + len(these)]
        failure = next((result for result in got if isinstance(result, BaseException)), None)
        if failure is None:
            replies.append(reply_for(request, these, got))
            continue
        if on_error is not None:
            on_error(request, failure)
        replies.append(error_reply_for(request, failure))
    return replies
