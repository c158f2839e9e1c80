"""What NbdDevice sends for a device call, and what it makes of the remote's answer: the request that carries a
call out on the remote as it stands (or none, where the call takes more than one request or none at all), and
the call's result from the reply (``Submission``: the adapter between a wire's replies and a server's
``nbdproto.serving.Completions``)."""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import nbdproto.engine
from nbdproto.serving import Completions, DeviceCall, DeviceCapabilities
from nbdproto.wire import CommandFlags, NBDError

__all__ = [
    "Make",
    "request_for",
    "turn_of",
    "SPREAD_AT",
    "Submission",
    "Gathered",
    "MISSING",
    "checked",
    "extents_of",
    "result_of_failure",
]

_F = CommandFlags
_FUA, _NONE = _F.FUA, _F(0)
_ErrorReply = nbdproto.engine.ErrorReply
_ReadRequest = nbdproto.engine.ReadRequest
_WriteRequest = nbdproto.engine.WriteRequest

Make = Callable[[int], Any]
"""Builds a request event for a cookie."""
Check = Callable[..., None]
"""Raises OSError for a range the call may not touch: ``check(offset, length, writing=False)``."""


SPREAD_AT = 256 << 10
"""The bytes of payload from which a batch of one client connection's calls goes out on the next connection in
turn rather than on the connection of its lane (Completions.lane). Small requests stay together: a burst of
them split over several connections comes back through as many reader threads, each waking the server (with
one client reading 4 KiB at QD16, the threads proxy answered 0.77x the requests of one connection, at more CPU
a request). Big ones spread: the connections' reader threads copy their payloads in parallel, outside the GIL
(256 KiB reads at QD16 on one client connection: 1.13x those of one connection; nbdcopy's reads of 256 KiB:
1.1-1.2x those of its connections' lanes). Measured with bench/bench_proxy.sh and fio, threads backend."""

_PAYLOAD_CALLS = frozenset({"pread_into", "pwrite"})


def turn_of(completions: Completions, calls: Sequence[DeviceCall], turns: Iterator[int]) -> int:
    """Which of a device's connections a batch of ``calls`` goes out on first (modulo their count): the lane of
    ``completions`` (Completions.lane: a client connection of a proxy) while the batch carries less than
    SPREAD_AT bytes, else the next of ``turns``."""
    lane: int | None = getattr(completions, "lane", None)
    if lane is None:
        return next(turns)
    size = 0
    for call in calls:  # (a loop, not sum() of a generator: a generator's frame is resumed for every call)
        if call.method in _PAYLOAD_CALLS:
            size += len(call.args[0])
    return next(turns) if size >= SPREAD_AT else lane


def request_for(call: DeviceCall, capabilities: DeviceCapabilities, check: Check) -> Make | None:
    """The one request that carries ``call`` out on the remote as it stands, or None when it takes more (or
    less) than one request: emulated, a hint the remote does not take, block status (whose request names the
    connection's own context ids), or a call the remote has no request for. Raises OSError for a bad range."""
    method, args, kwargs, caps = call.method, call.args, call.kwargs, capabilities
    if method == "pread_into":
        buffer, offset = args
        length = len(buffer)
        check(offset, length)
        return functools.partial(_ReadRequest, offset=offset, length=length, buffer=buffer)  # (no frame of ours)
    if method == "pwrite":
        data, offset, fua = args
        check(offset, memoryview(data).nbytes, writing=True)
        if fua and not caps.can_fua:
            return None
        return functools.partial(_WriteRequest, offset=offset, data=data, flags=_FUA if fua else _NONE)
    if method == "flush":
        return (lambda c: nbdproto.engine.FlushRequest(c)) if caps.can_flush else None
    if method == "trim":
        offset, length, fua = args
        check(offset, length, writing=True)
        if not caps.can_trim or (fua and not caps.can_fua):
            return None
        return lambda c: nbdproto.engine.TrimRequest(c, offset, length, _FUA if fua else _NONE)
    if method == "write_zeroes":
        offset, length = args
        check(offset, length, writing=True)
        may_trim, fast, fua = kwargs.get("may_trim", True), kwargs.get("fast", False), kwargs.get("fua", False)
        if not caps.can_zero or (fast and not caps.can_fast_zero) or (fua and not caps.can_fua):
            return None
        flags = (_NONE if may_trim else _F.NO_HOLE) | (_F.FAST_ZERO if fast else _NONE) | (_FUA if fua else _NONE)
        return lambda c: nbdproto.engine.WriteZeroesRequest(c, offset, length, flags)
    if method == "cache":
        offset, length = args
        check(offset, length)
        return (lambda c: nbdproto.engine.CacheRequest(c, offset, length)) if caps.can_cache else None
    return None


def error_of(reply: Any) -> NBDError:
    """The remote's error reply as the exception a device call raises."""
    return NBDError(int(reply.error), reply.message or os.strerror(int(reply.error)))


def checked(reply: Any) -> Any:
    """``reply``, unless it is an error reply: then its error is raised."""
    if type(reply) is _ErrorReply:
        raise error_of(reply)
    return reply


def result_of_failure(exc: BaseException, uri: str) -> OSError:
    """A failed request's exception as a device call raises it: an OSError with an errno (EIO unless it says)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    return OSError(errno.EIO, f"the connection to {uri} failed: {exc}")


def extents_of(reply: Any, context_id: int, length: int, uri: str, context: str) -> list[tuple[int, int]]:
    """The (length, flags) runs of a block status reply for ``context_id``, cut to ``length`` (the last extent
    may reach past the request; the device's answer may not). Raises OSError when there are none."""
    if type(reply) is _ErrorReply:
        raise error_of(reply)
    extents = reply.extents.get(context_id)
    if not extents:
        raise OSError(errno.EIO, f"{uri} sent no extents for {context!r}")
    out: list[tuple[int, int]] = []
    left = length
    for extent in extents:
        size = min(extent.length, left)
        out.append((size, extent.status))
        left -= size
        if not left:
            break
    return out


class Submission:
    """The ReplySink for one batch of calls submitted together: each reply becomes the call's result (None, the
    remote's error as NBDError, or what ``convert`` makes of it) and goes to ``completions`` with the call's
    token."""

    __slots__ = ("completions", "tokens", "convert", "uri")

    def __init__(
        self,
        completions: Completions,
        tokens: Sequence[Any],
        uri: str,
        convert: Callable[[Any], object] | None = None,
    ) -> None:
        self.completions = completions
        self.tokens = tokens
        self.convert = convert
        self.uri = uri

    def complete(self, index: int, reply: Any) -> None:
        kind = type(reply)
        if kind is _ErrorReply:
            result: object = error_of(reply)
        elif isinstance(reply, BaseException):
            result = result_of_failure(reply, self.uri)
        elif self.convert is not None:
            try:
                result = self.convert(reply)
            except OSError as exc:
                result = exc
        else:
            result = None
        self.completions.complete(self.tokens[index], result)

    def completed(self) -> None:
        self.completions.completed()


MISSING = object()
"""A result not in yet."""


class Gathered:
    """The Completions of a blocking ``call_batch``: every result in place, and an event once all are in."""

    def __init__(self, count: int) -> None:
        self.results: list[object] = [MISSING] * count
        self.left = count
        self.done = threading.Event()
        self._lock = threading.Lock()  # results may come from several connections' reader threads at once

    def complete(self, token: int, result: object) -> None:
        self.results[token] = result
        with self._lock:
            self.left -= 1

    def completed(self) -> None:
        if self.left <= 0:
            self.done.set()
