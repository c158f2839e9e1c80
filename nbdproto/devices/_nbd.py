"""NbdDevice: an export of another NBD server, as a block device (what nbdkit's nbd plugin is to nbdkit).

It makes proxies (``nbdproto serve nbd://other/disk``) and remote mirror targets. Every command and flag goes
through: reads, writes with FUA, flush, trim, write-zeroes with NO_HOLE and FAST_ZERO, cache, and block status
for every meta context the remote offers (asked for with NBD_OPT_LIST_META_CONTEXT, then all selected). The
capabilities are the remote export's: its transmission flags and block sizes. What the remote cannot do is
emulated where the meaning allows (FUA as a write then a flush, write-zeroes as writes of zeroes) and is
otherwise a no-op (trim and cache are hints).

Requests travel over ``Wire`` connections (see _nbdwire for why not a client of a backend): several when the
remote promises multi-conn (NBD_FLAG_CAN_MULTI_CONN), in turn, the small ones of a proxy's client connection
together on one (``turn_of``). ``submit`` sends a batch of calls and returns at once; the results come back as
the remote answers, in any order, from the connection's reader thread (nbdproto.serving.Completions): a
server's pipelined transmission (``nbdproto.serving.Pipeline``) keeps reading its client's requests meanwhile,
so many are in flight upstream at once, as nbdkit's nbd plugin keeps them (bench/bench_proxy.sh compares the
two). The device methods (``pread_into`` and the rest) and ``call_batch`` are the blocking forms: submit, then
wait.

A remote that goes away fails the requests it had (EIO). The next request on that connection reconnects,
trying ``retries`` times with a doubling delay between tries (like nbdkit's retry filter), and fails with EIO if
the remote is still away or is no longer the same size; requests that queued behind a failed attempt fail at
once rather than each retrying in turn. A connection the remote closed while nothing was in flight is replaced
before a request is sent on it.

A remote that stops answering (stopped, a frozen VM, a network path that drops packets without a reset) is
given ``timeout`` seconds per request, reconnecting included: a request not answered by then fails with
ETIMEDOUT (EIO to an NBD client), one log line names the remote, and every connection to it is dropped,
since a remote that left one request unanswered that long is taken to be stalled, and NBD cannot take back a
request except by dropping its connection. Requests in flight on them fail at once with the same error
rather than each waiting out its own time; later requests reconnect, as after a remote that went away.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import nbdproto.client
import nbdproto.engine
import nbdproto.serving
import nbdproto.wire
from nbdproto.client import ClientNegotiation
from nbdproto.serving import Buffer, Completions, DeviceCall, DeviceCapabilities, Dispatch
from nbdproto.sockets import open_together
from nbdproto.wire import CommandFlags, TransmissionFlags

from ._emulation import flush_for_fua, native_fua, zero_by_writing
from ._nbdhandshake import DiscoveringNegotiation, capabilities_of, connect_wire
from ._nbdrequests import MISSING, Gathered, Make, Submission, checked, extents_of, request_for, turn_of
from ._nbdwire import Wire, WireBroken, WireClosed
from ._ranges import check_range

__all__ = ["NbdDevice"]

log = logging.getLogger("nbdproto.devices.nbd")

TF = TransmissionFlags
_F = CommandFlags
_COMPACT_LIMIT = (1 << 32) - 1
"""The longest block status request without extended headers (a 32-bit length)."""


class _Slot:
    """One of the device's connections: the wire while it works, None once it failed."""

    __slots__ = ("wire", "lock", "failed_attempts")

    def __init__(self, wire: Wire | None) -> None:
        self.wire = wire  # changed under the device's _dropping lock
        self.lock = threading.Lock()  # one reconnect at a time
        self.failed_attempts = 0  # reconnect sequences that failed: lets the queued requests fail at once


class NbdDevice:
    """The export at ``uri`` (nbd://, nbds://, nbd+unix://, nbds+unix://) as a block device.

    ``tls``: the client TLS context (an nbds URI without one gets the one its TLS keys ask for, as both
    clients do: nbdproto.tls.connection_context). ``connections``: how many to open when the remote
    offers multi-conn (one otherwise). ``retries`` and ``retry_delay``: the reconnect attempts after the remote
    goes away, and the first delay between them (it doubles). ``timeout``: the most each request may take,
    reconnecting included, and each step of the first connect and handshake (``nbdproto serve
    --remote-timeout``); a request that takes longer fails with ETIMEDOUT and drops the connections (see the
    module docstring). Raises OSError or nbdproto.wire.ProtocolError when the first connection cannot be made,
    ValueError for a timeout that is not positive.
    """

    dispatch: Dispatch = "batch"
    """Calls wait for the remote, so never on an event loop. A server drives the device through ``submit``
    (pipelined: see the module docstring); one without it a batch at a time (``call_batch``)."""

    def __init__(
        self,
        uri: str,
        *,
        tls: ssl.SSLContext | None = None,
        connections: int = 4,
        retries: int = 5,
        retry_delay: float = 0.1,
        timeout: float = 30.0,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout {timeout} must be positive")
        self.uri = uri
        self._target = nbdproto.client.parse_uri(uri)
        self._tls = tls
        self._retries = max(0, retries)
        self._retry_delay = retry_delay
        self._timeout = timeout
        plan = DiscoveringNegotiation(
            self._target.export_name, tls=tls is not None or self._target.tls, require_tls=self._target.tls
        )
        first = connect_wire(self._target, plan, tls, timeout, timeout)
        handshake: nbdproto.engine.HandshakeComplete = plan.result  # type: ignore[assignment]
        self.export = handshake.export
        self.extended_headers = handshake.extended_headers
        self.meta_context_names = tuple(sorted(first.context_ids))
        """The contexts the remote agreed to: each one is passed through."""
        self._capabilities = capabilities_of(self.export, self.meta_context_names)
        # check(offset, length, writing=False): the range checks of every call, without a call of our own
        # around check_range's (each request pays for it).
        self._check: Callable[..., None] = functools.partial(
            check_range, self.export.size, can_write=self._capabilities.can_write
        )
        count = max(1, connections) if self._capabilities.can_multi_conn else 1
        try:
            wires = [first, *self._open_many(count - 1)]
        except BaseException:
            first.close()
            raise
        self._turn = itertools.count()
        self._closed = False
        self._dropping = threading.Lock()  # slots' wires change under it (short), one drop of them all at a time
        self._outage = False  # the remote stalled or cannot be reached: said once, until it answers again
        self._slots = [_Slot(None) for _ in wires]
        for slot, wire in zip(self._slots, wires, strict=True):
            self._install(slot, wire)

    @property
    def timeout(self) -> float:
        """The most a request may take (seconds), reconnecting included."""
        return self._timeout

    def _open(self, timeout: float | None = None) -> Wire:
        """A new connection agreeing to the same contexts as the first, each step bounded by ``timeout``
        (default: the device's)."""
        plan = ClientNegotiation(
            self._target.export_name,
            tls=self._tls is not None or self._target.tls,
            require_tls=self._target.tls,
            meta_contexts=self.meta_context_names,
        )
        wire = connect_wire(self._target, plan, self._tls, timeout or self._timeout, self._timeout)
        size = plan.result.export.size  # type: ignore[union-attr]
        if size != self.export.size:
            wire.close()
            raise OSError(errno.EIO, f"{self.uri} is now {size} bytes, not {self.export.size}")
        return wire

    def _open_many(self, count: int) -> list[Wire]:
        """``count`` connections opened at once."""
        return open_together(count, self._open, Wire.close)

    # --- What the device is -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._capabilities

    @property
    def connections(self) -> int:
        """How many connections the device spreads its requests over."""
        return len(self._slots)

    # --- Connections ----------------------------------------------------------------------------------------

    def _install(self, slot: _Slot, wire: Wire) -> Wire:
        """Start ``wire``'s reader, its failures reported to this device, and make it ``slot``'s."""
        wire.start(functools.partial(self._wire_failed, slot))
        with self._dropping:
            slot.wire = wire
        return wire

    def _forget(self, slot: _Slot, wire: Wire) -> bool:
        """``slot`` no longer has ``wire`` (True if it still had it)."""
        with self._dropping:
            if slot.wire is wire:
                slot.wire = None
                return True
        return False

    def _wire(self, deadline: float, turn: int) -> tuple[_Slot, Wire]:
        slot = self._slots[turn % len(self._slots)]
        wire = slot.wire
        if wire is not None:
            if wire.usable:
                return slot, wire
            # Closed by the remote while idle (it went away, or shut down): no request was lost on it, so this
            # one goes out on a new connection instead of failing.
            self._forget(slot, wire)
            wire.close()
        return slot, self._reconnect(slot, deadline)

    def _reconnect(self, slot: _Slot, deadline: float) -> Wire:
        """A new connection for ``slot``, tried until ``deadline`` at the latest (the request's own)."""
        seen = slot.failed_attempts
        with slot.lock:
            if slot.wire is not None:
                return slot.wire
            if self._closed:
                raise OSError(errno.EIO, "the device is closed")
            if slot.failed_attempts != seen:
                raise OSError(errno.EIO, f"{self.uri} is unreachable (reconnecting failed just now)")
            delay = self._retry_delay
            failure: BaseException | None = None
            for attempt in range(self._retries + 1):
                if attempt:
                    if time.monotonic() + delay >= deadline:
                        break
                    time.sleep(delay)  # a backoff between attempts, not a synchronisation
                    delay *= 2
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    wire = self._install(slot, self._open(min(left, self._timeout)))
                    self._outage = False
                    log.info("reconnected to %s", self.uri)
                    return wire
                except (OSError, nbdproto.wire.ProtocolError) as exc:
                    failure = exc
            slot.failed_attempts += 1
            error: OSError
            if failure is None or isinstance(failure, TimeoutError):  # the request's time ran out
                error = TimeoutError(errno.ETIMEDOUT, f"cannot reconnect to {self.uri} within {self._timeout:g} s")
            else:
                error = OSError(errno.EIO, f"cannot reconnect to {self.uri}: {failure}")
            if not self._outage:
                self._outage = True
                log.warning("%s (requests fail until it answers again)", error.strerror)
            raise error from failure

    def _wire_failed(self, slot: _Slot, wire: Wire, exc: BaseException, lost: bool) -> BaseException:
        """``wire`` (``slot``'s) failed under ``exc``, ``lost`` saying whether requests were in flight on it:
        forget it (the next request reconnects); what those requests get: ETIMEDOUT for a remote that did not
        answer in time (``_stalled``), EIO otherwise."""
        if isinstance(exc, TimeoutError):
            return self._stalled(wire)
        if self._forget(slot, wire) and lost:
            log.warning("lost the connection to %s: %s", self.uri, exc)
        return OSError(errno.EIO, f"the connection to {self.uri} failed: {exc}")

    def _stalled(self, wire: Wire) -> OSError:
        """A request on ``wire`` went unanswered for the whole timeout: the remote is taken to be stalled, and
        every connection to it is dropped (logged once, by whoever finds ``wire`` still in use); ETIMEDOUT for
        the requests on them."""
        failure = TimeoutError(errno.ETIMEDOUT, f"{self.uri} did not answer within {self._timeout:g} s")
        dropped: list[Wire] = []
        with self._dropping:
            if any(slot.wire is wire for slot in self._slots):
                for slot in self._slots:
                    if slot.wire is not None:
                        dropped.append(slot.wire)
                        slot.wire = None
                if not self._outage:
                    self._outage = True
                    log.warning("%s: dropped its connections; the next request reconnects", failure.strerror)
        for each in dropped:
            if each is not wire:
                each.abandon(failure)  # the requests in flight on them fail now, with this error
        return failure

    def _start(
        self,
        makes: Sequence[Make],
        sink: Submission | Any,
        for_wire: Callable[[Wire], Sequence[Make]] | None,
        turn: int,
    ) -> None:
        """Send the requests ``makes`` (or ``for_wire(wire)``, for requests that name something of the
        connection) builds together on connection ``turn`` (``turn_of``; the others after it if it fails), their
        replies to ``sink`` (a ReplySink, whose tokens are the requests' indexes); a connection that had failed
        before they were sent is replaced."""
        deadline = time.monotonic() + self._timeout
        count = len(makes) if for_wire is None else 1
        failure: BaseException = OSError(errno.EIO, f"the connections to {self.uri} keep failing")
        for attempt in range(len(self._slots) + 1):
            try:
                slot, wire = self._wire(deadline, turn + attempt)
            except OSError as exc:
                failure = exc
                break
            try:
                wire.submit(makes if for_wire is None else for_wire(wire), sink, range(count), deadline)
                return
            except WireClosed:  # nothing was sent: another connection takes them
                self._forget(slot, wire)
        for index in range(count):
            sink.complete(index, failure)
        sink.completed()

    def _run(self, makes: Sequence[Make], for_wire: Callable[[Wire], Sequence[Make]] | None = None) -> list[Any]:
        """The replies to the requests (as ``_start``), waited for: within the timeout; EIO when the connection
        fails under them, ETIMEDOUT when the remote does not answer in time."""
        deadline = time.monotonic() + self._timeout
        for _ in range(len(self._slots) + 1):
            slot, wire = self._wire(deadline, next(self._turn))
            try:
                return wire.run(makes if for_wire is None else for_wire(wire), deadline)
            except WireClosed:  # nothing was sent: another connection takes them
                self._forget(slot, wire)
            except WireBroken as exc:  # (the device closed under it)
                raise OSError(errno.EIO, f"the connection to {self.uri} failed: {exc}") from exc
        raise OSError(errno.EIO, f"the connections to {self.uri} keep failing")

    def _one(self, make: Make) -> Any:
        (reply,) = self._run((make,))
        return checked(reply)

    # --- Requests -----------------------------------------------------------------------------------------

    def submit(self, calls: Sequence[DeviceCall], tokens: Sequence[Any], completions: Completions) -> None:
        """Start carrying out ``calls`` without waiting for the remote (nbdproto.serving.Completions says how the
        results come back): every call that is a single request goes out in one batch on one connection
        (``turn_of``), block status on its own, and the rest (emulations) is carried out here and now. Blocks
        only to send, or to reconnect."""
        makes: list[Make] = []
        sent: list[Any] = []
        done = False
        for call, token in zip(calls, tokens, strict=True):
            try:
                make = request_for(call, self._capabilities, self._check)
                if make is not None:
                    makes.append(make)
                    sent.append(token)
                    continue
                if call.method == "extents":
                    self._submit_extents(call, token, completions)
                    continue
                result = getattr(self, call.method)(*call.args, **call.kwargs)
            except Exception as exc:  # handed back as this call's result
                result = exc
            completions.complete(token, result)
            done = True
        if makes:
            self._start(makes, Submission(completions, sent, self.uri), None, turn_of(completions, calls, self._turn))
        if done:
            completions.completed()

    def submit_nowait(
        self, calls: Sequence[DeviceCall], tokens: Sequence[Any], completions: Completions
    ) -> Callable[[], None] | None:
        """``submit`` for an event loop, which must not wait (nbdproto.serving.BlockDevice): raises
        BlockingIOError, having started nothing, where starting ``calls`` could wait (a call that is not one
        request, block status, a connection to make again or busy sending, TLS). Otherwise sends them on one
        connection (``turn_of``) as far as its socket takes them now and returns None, or a callable that sends the
        rest, to be called off the loop, soon."""
        makes: list[Make] = []
        sent: list[Any] = []
        failed: list[tuple[Any, BaseException]] = []
        for call, token in zip(calls, tokens, strict=True):
            try:
                make = request_for(call, self._capabilities, self._check)
            except Exception as exc:  # handed back as this call's result
                failed.append((token, exc))
                continue
            if make is None:
                raise BlockingIOError(errno.EAGAIN, f"{call.method} is not one request")
            makes.append(make)
            sent.append(token)
        rest = None
        if makes:
            wire = self._slots[turn_of(completions, calls, self._turn) % len(self._slots)].wire
            if wire is None or not wire.usable:
                raise BlockingIOError(errno.EAGAIN, "the connection must be made again")
            sink = Submission(completions, sent, self.uri)
            try:
                rest = wire.submit_nowait(makes, sink, range(len(makes)), time.monotonic() + self._timeout)
            except WireClosed:  # failed meanwhile, nothing sent: ``submit`` makes it again
                raise BlockingIOError(errno.EAGAIN, "the connection must be made again") from None
        for token, failure in failed:
            completions.complete(token, failure)
        if failed:
            completions.completed()
        return rest

    def _submit_extents(self, call: DeviceCall, token: Any, completions: Completions) -> None:
        context, offset, length = self._extents_request(*call.args)
        context_ids: list[int] = []
        sink = Submission(
            completions, (token,), self.uri, lambda reply: extents_of(reply, context_ids[0], length, self.uri, context)
        )
        request = self._status_request(context, offset, length, context_ids)
        self._start((), sink, request, turn_of(completions, (), self._turn))

    def call_batch(self, calls: Sequence[DeviceCall]) -> list[object]:
        """Carry out ``calls`` together (``submit``, then wait for every result): each result is the call's
        return value, or the exception it raised (the ``call_batch`` extension of nbdproto.serving.BlockDevice)."""
        gathered = Gathered(len(calls))
        self.submit(calls, range(len(calls)), gathered)
        # Every request has the device's timeout (the connection fails when one runs out): this is only a bound.
        if not gathered.done.wait(2 * self._timeout + 5):
            failure = TimeoutError(errno.ETIMEDOUT, f"{self.uri} did not answer within {self._timeout:g} s")
            return [failure if result is MISSING else result for result in gathered.results]
        return gathered.results

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buffer) > self.export.size:
            self._check(offset, len(buffer))
        self._one(lambda c: nbdproto.engine.ReadRequest(c, offset, len(buffer), buffer=buffer))

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        size = memoryview(data).nbytes
        if offset < 0 or offset + size > self.export.size or not self._capabilities.can_write:
            self._check(offset, size, writing=True)
        native = native_fua(self._capabilities, fua)
        self._one(lambda c: nbdproto.engine.WriteRequest(c, offset, data, _F.FUA if native else _F(0)))
        flush_for_fua(self._capabilities, fua, self.flush)

    def flush(self) -> None:
        if self._capabilities.can_flush:
            self._one(lambda c: nbdproto.engine.FlushRequest(c))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check(offset, length, writing=True)
        if not self._capabilities.can_trim:
            return  # advisory: the remote keeps the data
        native = native_fua(self._capabilities, fua)
        self._one(lambda c: nbdproto.engine.TrimRequest(c, offset, length, _F.FUA if native else _F(0)))
        flush_for_fua(self._capabilities, fua, self.flush)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, writing=True)
        caps = self._capabilities
        if fast and not (caps.can_zero and caps.can_fast_zero):
            raise OSError(errno.ENOTSUP, f"{self.uri} cannot zero quickly")
        if not caps.can_zero:
            zero_by_writing(self.pwrite, offset, length, caps.maximum_payload)
            if fua:
                self.flush()
            return
        native = native_fua(caps, fua)
        flags = (_F(0) if may_trim else _F.NO_HOLE) | (_F.FAST_ZERO if fast else _F(0)) | (_F.FUA if native else _F(0))
        self._one(lambda c: nbdproto.engine.WriteZeroesRequest(c, offset, length, flags))
        flush_for_fua(caps, fua, self.flush)

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self._capabilities.can_cache:  # otherwise it is only a hint
            self._one(lambda c: nbdproto.engine.CacheRequest(c, offset, length))

    def _extents_request(self, context: str, offset: int, length: int) -> tuple[str, int, int]:
        """A block status call's (context, offset, length) checked, the length cut to what one request can ask."""
        self._check(offset, length)
        if context not in self.meta_context_names:
            raise OSError(errno.EINVAL, f"{self.uri} did not agree to meta context {context!r}")
        if not self.extended_headers and length > _COMPACT_LIMIT:
            minimum = self._capabilities.minimum_block_size
            length = _COMPACT_LIMIT // minimum * minimum  # the answer may stop short; the caller asks again
        return context, offset, length

    def _status_request(
        self, context: str, offset: int, length: int, context_ids: list[int]
    ) -> Callable[[Wire], Sequence[Make]]:
        """The block status request for the connection it goes out on (each has its own context ids, noted in
        ``context_ids``)."""

        def request(wire: Wire) -> Sequence[Make]:
            context_ids.append(wire.context_ids[context])
            # Only an extended request can name the context; otherwise the remote answers for all of them.
            chosen = (context_ids[-1],) if self.export.flags & TF.BLOCK_STATUS_PAYLOAD else ()
            return (lambda c: nbdproto.engine.BlockStatusRequest(c, offset, length, _F(0), chosen),)

        return request

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        context, offset, length = self._extents_request(context, offset, length)
        context_ids: list[int] = []
        (reply,) = self._run((), self._status_request(context, offset, length, context_ids))
        return extents_of(reply, context_ids[-1], length, self.uri, context)

    def close(self) -> None:
        self._closed = True
        for slot in self._slots:
            with slot.lock, self._dropping:
                wire, slot.wire = slot.wire, None
            if wire is not None:
                wire.close()
