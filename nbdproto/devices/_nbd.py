"""NbdDevice: an export of another NBD server, as a block device (what nbdkit's nbd plugin is to nbdkit).

It makes proxies (``nbdproto serve nbd://other/disk``) and remote mirror targets. Every command and flag goes
through: reads, writes with FUA, flush, trim, write-zeroes with NO_HOLE and FAST_ZERO, cache, and block status
for every meta context the remote offers (asked for with NBD_OPT_LIST_META_CONTEXT, then all selected). The
capabilities are the remote export's: its transmission flags and block sizes. What the remote cannot do is
emulated where the meaning allows (FUA as a write then a flush, write-zeroes as writes of zeroes) and is
otherwise a no-op (trim and cache are hints).

Requests travel over ``Wire`` connections (see _nbdwire for why not a client of a backend): several
when the remote promises multi-conn (NBD_FLAG_CAN_MULTI_CONN), in turn. Calls block until the remote answers.
``call_batch`` sends every request a server read in one go together and waits for all their replies: a
server's "batch" dispatch (``nbdproto.serving.carry_out_all``) hands it whole batches, so a proxy costs one thread
hop and a few system calls per batch instead of per request (bench/bench_proxy.sh compares the proxy with
nbdkit's nbd plugin; a worker thread per request over a blocking client cost several times the CPU).

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
import itertools
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import nbdproto.client
import nbdproto.engine
import nbdproto.serving
import nbdproto.wire
from nbdproto.client import ClientNegotiation, NbdUri
from nbdproto.engine import Event
from nbdproto.serving import Buffer, DeviceCall, DeviceCapabilities, Dispatch
from nbdproto.sockets import connect_socket, negotiate_client, open_together
from nbdproto.tls import connection_context
from nbdproto.wire import CommandFlags, NBDError, TransmissionFlags

from ._emulation import flush_for_fua, native_fua, zero_by_writing
from ._nbdhandshake import DiscoveringNegotiation, capabilities_of
from ._nbdwire import Wire, WireBroken, WireTimedOut
from ._ranges import check_range

__all__ = ["NbdDevice"]

log = logging.getLogger("nbdproto.devices.nbd")

TF = TransmissionFlags
_F = CommandFlags
_COMPACT_LIMIT = (1 << 32) - 1
"""The longest block status request without extended headers (a 32-bit length)."""
Make = Callable[[int], Event]
"""Builds a request event for a cookie."""


def _connect(
    target: NbdUri, plan: ClientNegotiation, tls: ssl.SSLContext | None, timeout: float, request_timeout: float
) -> Wire:
    """A negotiated connection: ``timeout`` bounds each step of connecting and the handshake,
    ``request_timeout`` each batch of requests afterwards (Wire)."""
    sock = connect_socket(target, timeout)  # its timeout stays on through the handshake
    tls = connection_context(target, plan.tls, tls)
    connection = negotiate_client(sock, plan, tls=tls, server_hostname=target.tls_hostname)
    connection.stream.sock.settimeout(None)  # the wire bounds its waits itself
    if not isinstance(connection.result, nbdproto.engine.HandshakeComplete):
        connection.stream.close()
        raise nbdproto.client.NegotiationError("the server ended the handshake without an export")
    return Wire(connection, request_timeout)


class _Slot:
    """One of the device's connections: the wire while it works, None once it failed."""

    __slots__ = ("wire", "lock", "failed_attempts")

    def __init__(self, wire: Wire | None) -> None:
        self.wire = wire
        self.lock = threading.Lock()  # one reconnect at a time
        self.failed_attempts = 0  # reconnect sequences that failed: lets the queued requests fail at once


def _checked(reply: Any) -> Any:
    if type(reply) is nbdproto.engine.ErrorReply:
        raise NBDError(int(reply.error), reply.message or os.strerror(int(reply.error)))
    return reply


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
    """Calls wait for the remote, so never on an event loop; a batch at a time, because ``call_batch``
    pipelines a whole batch (see the module docstring)."""

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
        first = _connect(self._target, plan, tls, timeout, timeout)
        handshake: nbdproto.engine.HandshakeComplete = plan.result  # type: ignore[assignment]
        self.export = handshake.export
        self.extended_headers = handshake.extended_headers
        self.meta_context_names = tuple(sorted(first.context_ids))
        """The contexts the remote agreed to: each one is passed through."""
        self._capabilities = capabilities_of(self.export, self.meta_context_names)
        count = max(1, connections) if self._capabilities.can_multi_conn else 1
        self._slots = [_Slot(first)]
        try:
            self._slots += [_Slot(wire) for wire in self._open_many(count - 1)]
        except BaseException:
            first.close()
            raise
        self._turn = itertools.count()
        self._closed = False
        self._dropping = threading.Lock()  # one drop of every connection at a time (a stalled remote)
        self._outage = False  # the remote stalled or cannot be reached: said once, until it answers again

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
        wire = _connect(self._target, plan, self._tls, timeout or self._timeout, self._timeout)
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

    def _wire(self, deadline: float) -> tuple[_Slot, Wire]:
        slot = self._slots[next(self._turn) % len(self._slots)]
        wire = slot.wire
        if wire is not None:
            if wire.usable:
                return slot, wire
            # Closed by the remote while idle (it went away, or shut down): no request was lost on it, so this
            # one goes out on a new connection instead of failing.
            with slot.lock:
                if slot.wire is wire:
                    slot.wire = None
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
                    slot.wire = self._open(min(left, self._timeout))
                    self._outage = False
                    log.info("reconnected to %s", self.uri)
                    return slot.wire
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

    def _broken(self, slot: _Slot, wire: Wire, exc: BaseException) -> OSError:
        """The connection under a request failed: forget it (the next request reconnects); EIO for this one."""
        with slot.lock:
            if slot.wire is wire:
                slot.wire = None
                log.warning("lost the connection to %s: %s", self.uri, exc)
        wire.close()
        return OSError(errno.EIO, f"the connection to {self.uri} failed: {exc}")

    def _stalled(self, wire: Wire) -> OSError:
        """A request on ``wire`` went unanswered for the whole timeout: the remote is taken to be stalled, and
        every connection to it is dropped (logged once, by whoever finds ``wire`` still in use); ETIMEDOUT for
        the request."""
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
        for each in {id(w): w for w in [wire, *dropped]}.values():
            each.abandon(failure)  # the requests in flight on them fail now, with this error
        return failure

    def _run(self, makes: Sequence[Make], for_wire: Callable[[Wire], Sequence[Make]] | None = None) -> list[Any]:
        """The replies to the requests ``makes`` (or ``for_wire(wire)``, for requests that name something of
        the connection) builds, sent together on the next connection, within the timeout; EIO when the
        connection fails under them, ETIMEDOUT when the remote does not answer in time."""
        deadline = time.monotonic() + self._timeout
        slot, wire = self._wire(deadline)
        try:
            return wire.run(makes if for_wire is None else for_wire(wire), deadline)
        except nbdproto.wire.LocalProtocolError as exc:  # refused by our own engine, before anything was sent
            raise OSError(errno.EINVAL, str(exc)) from exc
        except WireTimedOut:
            raise self._stalled(wire) from None
        except (WireBroken, OSError, nbdproto.wire.ProtocolError) as exc:
            raise self._broken(slot, wire, exc) from exc

    def _one(self, make: Make) -> Any:
        (reply,) = self._run((make,))
        return _checked(reply)

    # --- Requests -----------------------------------------------------------------------------------------

    def _check(self, offset: int, length: int, writing: bool = False) -> None:
        check_range(self.export.size, offset, length, writing=writing, can_write=self._capabilities.can_write)

    def _request(self, call: DeviceCall) -> Make | None:
        """The request that carries ``call`` out on the remote as it stands, or None when it takes more (or less)
        than one request (emulated, or a hint the remote does not take). Raises OSError for a bad range."""
        method, args, kwargs, caps = call.method, call.args, call.kwargs, self._capabilities
        if method == "pread_into":
            buffer, offset = args
            self._check(offset, len(buffer))
            return lambda c: nbdproto.engine.ReadRequest(c, offset, len(buffer), buffer=buffer)
        if method == "pwrite":
            data, offset, fua = args
            self._check(offset, memoryview(data).nbytes, writing=True)
            if fua and not caps.can_fua:
                return None
            return lambda c: nbdproto.engine.WriteRequest(c, offset, data, _F.FUA if fua else _F(0))
        if method == "flush":
            return (lambda c: nbdproto.engine.FlushRequest(c)) if caps.can_flush else None
        if method == "trim":
            offset, length, fua = args
            self._check(offset, length, writing=True)
            if not caps.can_trim or (fua and not caps.can_fua):
                return None
            return lambda c: nbdproto.engine.TrimRequest(c, offset, length, _F.FUA if fua else _F(0))
        if method == "write_zeroes":
            offset, length = args
            self._check(offset, length, writing=True)
            may_trim, fast, fua = kwargs.get("may_trim", True), kwargs.get("fast", False), kwargs.get("fua", False)
            if not caps.can_zero or (fast and not caps.can_fast_zero) or (fua and not caps.can_fua):
                return None
            flags = (_F(0) if may_trim else _F.NO_HOLE) | (_F.FAST_ZERO if fast else _F(0)) | (_F.FUA if fua else _F(0))
            return lambda c: nbdproto.engine.WriteZeroesRequest(c, offset, length, flags)
        if method == "cache":
            offset, length = args
            self._check(offset, length)
            return (lambda c: nbdproto.engine.CacheRequest(c, offset, length)) if caps.can_cache else None
        return None

    def call_batch(self, calls: Sequence[DeviceCall]) -> list[object]:
        """Carry out ``calls`` together: every one that is a single request goes out in one batch on one
        connection, the rest (emulations, block status) one by one. Each result is the call's return value, or
        the exception it raised (the ``call_batch`` extension of nbdproto.serving.BlockDevice)."""
        results: list[object] = [None] * len(calls)
        makes: list[Make] = []
        where: list[int] = []
        for index, call in enumerate(calls):
            try:
                make = self._request(call)
                if make is None:
                    results[index] = getattr(self, call.method)(*call.args, **call.kwargs)
                else:
                    makes.append(make)
                    where.append(index)
            except Exception as exc:  # handed back as this call's result
                results[index] = exc
        if makes:
            try:
                replies = self._run(makes)
            except OSError as exc:
                for index in where:
                    results[index] = exc
                return results
            for index, reply in zip(where, replies, strict=True):
                if type(reply) is nbdproto.engine.ErrorReply:
                    results[index] = NBDError(int(reply.error), reply.message or os.strerror(int(reply.error)))
        return results

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

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        self._check(offset, length)
        if context not in self.meta_context_names:
            raise OSError(errno.EINVAL, f"{self.uri} did not agree to meta context {context!r}")
        if not self.extended_headers and length > _COMPACT_LIMIT:
            minimum = self._capabilities.minimum_block_size
            length = _COMPACT_LIMIT // minimum * minimum  # the answer may stop short; the caller asks again
        context_ids: list[int] = []

        def request(wire: Wire) -> Sequence[Make]:
            context_ids.append(wire.context_ids[context])  # each connection has its own ids
            # Only an extended request can name the context; otherwise the remote answers for all of them.
            chosen = (context_ids[0],) if self.export.flags & TF.BLOCK_STATUS_PAYLOAD else ()
            return (lambda c: nbdproto.engine.BlockStatusRequest(c, offset, length, _F(0), chosen),)

        (reply,) = self._run((), request)
        context_id = context_ids[0]
        extents = _checked(reply).extents.get(context_id)
        if not extents:
            raise OSError(errno.EIO, f"{self.uri} sent no extents for {context!r}")
        out: list[tuple[int, int]] = []
        left = length
        for extent in extents:  # the last extent may reach past the request; the device's answer may not
            size = min(extent.length, left)
            out.append((size, extent.status))
            left -= size
            if not left:
                break
        return out

    def close(self) -> None:
        self._closed = True
        for slot in self._slots:
            with slot.lock:
                wire, slot.wire = slot.wire, None
            if wire is not None:
                wire.close()
