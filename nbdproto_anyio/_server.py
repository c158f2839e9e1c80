"""The async NBD server on anyio (asyncio or trio): the threads backend's server, with ``await``.

- ``ServerSession``: one connection. ``await negotiate()`` returns the chosen export name or
  ``nbdproto.ClientAborted``; ``await serve(device)`` serves until the client disconnects; ``async with``
  guarantees the close.
- ``Server``: listens on TCP or a unix socket, maps names to devices (or asks a resolver), and serves every
  connection in its own task until cancelled (graceful: in-flight requests finish, devices are flushed).

Requests on one connection run concurrently, a task each (at most ``max_requests`` at once), and replies go
out as they complete. Backpressure: while the payload bytes of unfinished requests exceed
``max_bytes_in_flight``, the connection stops reading, so a client that pipelines writes faster than the
device takes them cannot make the server buffer them.

All protocol decisions belong to nbdproto.ServerConnection and nbdproto._dispatch; this module moves bytes and
awaits devices.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSStream

import nbdproto
from nbdproto import ExportSpec as AsyncExportSpec
from nbdproto import (
    RequestBudget,
    answer_export_request,
    carry_out_all,
    device_calls,
    error_reply_for,
    read_view_of,
    reply_for,
)

from ._device import AsyncBlockDevice
from ._socket import RawSocketStream, SocketAcceptor, receive, send_pieces

__all__ = ["AsyncExportSpec", "ServerSession", "Server", "AsyncResolver"]

log = logging.getLogger("nbdproto.anyio.server")

_REQUESTS = (
    nbdproto.ReadRequest,
    nbdproto.WriteRequest,
    nbdproto.FlushRequest,
    nbdproto.TrimRequest,
    nbdproto.CacheRequest,
    nbdproto.WriteZeroesRequest,
    nbdproto.BlockStatusRequest,
    nbdproto.ResizeRequest,
)


AsyncSpec = AsyncExportSpec[AsyncBlockDevice]
"""An export of an async device: nbdproto.ExportSpec, the class the threads backend uses too."""

AsyncResolver = Callable[[str], "AsyncSpec | None"]


class ServerSession:
    """One client connection on the server side, over an anyio byte stream."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        exports: Iterable[str | nbdproto.ExportListing] | None = None,
        tls: ssl.SSLContext | None = None,
        tls_mode: nbdproto.TlsMode | None = None,
        lookup: AsyncResolver | None = None,
        max_requests: int = 64,
        max_bytes_in_flight: int = 64 * 1024 * 1024,
    ) -> None:
        if tls_mode is None:
            tls_mode = nbdproto.TlsMode.FORCEDTLS if tls is not None else nbdproto.TlsMode.NOTLS
        if tls_mode is not nbdproto.TlsMode.NOTLS and tls is None:
            raise ValueError(f"TLS mode {tls_mode.value} needs an ssl.SSLContext")
        self.stream: anyio.abc.ByteStream = stream
        self.engine = nbdproto.ServerConnection(exports=exports, tls=tls_mode)
        self._tls = tls
        self._lookup = lookup
        self._chosen: str | None = None
        self._spec: AsyncSpec | None = None
        self._closed = False
        self._max_requests = max_requests
        self._max_bytes = max_bytes_in_flight
        self._send_lock = anyio.Lock(fast_acquire=True)  # no extra trip through the loop when it is free
        # Whether request tasks send replies alongside the connection's own task. Until they do, sending
        # needs no lock (on asyncio each acquire and release asks for the current task, a getpid() call).
        self._shared_sending = False

    async def negotiate(self) -> str | nbdproto.ClientAborted:
        """Run the handshake until the client chooses an export; its name, or ClientAborted.

        Raises ConnectionError when the client goes away, RemoteProtocolError when it breaks the protocol.
        """
        engine = self.engine
        while True:
            event = engine.next_event()
            if event is nbdproto.NEED_DATA:
                await self._flush()
                engine.receive_data(await self._receive())
            elif isinstance(event, nbdproto.ExportRequested):
                answer = answer_export_request(event, self._lookup, self._chosen, self._spec)
                if answer is None:
                    self._chosen = event.name
                    return event.name
                engine.send(answer)
            elif isinstance(event, nbdproto.StartTLS):
                await self._start_tls()
            elif isinstance(event, nbdproto.HandshakeComplete):
                return event.export.name
            elif isinstance(event, nbdproto.ClientAborted):
                await self._flush()
                return event
            elif isinstance(event, nbdproto.ConnectionClosed):
                raise ConnectionError("the connection ended during the handshake")
            else:
                raise nbdproto.LocalProtocolError(f"unexpected {event!r} during the handshake")

    async def serve(
        self, device: AsyncBlockDevice | AsyncSpec, *, read_only: bool = True, description: str = ""
    ) -> None:
        """Serve the chosen export from ``device`` until the client disconnects, then flush the device."""
        if self._chosen is None:
            raise RuntimeError("serve() needs a successful negotiate() first")
        spec = device if isinstance(device, AsyncExportSpec) else AsyncExportSpec(device, description, read_only)
        self._spec = spec
        engine = self.engine
        if engine.phase is nbdproto.Phase.AWAIT_EXPORT:
            engine.send(spec.export(self._chosen))
        if engine.phase is nbdproto.Phase.TRANSMISSION:
            complete = engine.next_event()
            assert isinstance(complete, nbdproto.HandshakeComplete), complete
        else:
            # The engine refused that GO (a TLS or block size rule): let the client try again.
            name = await self.negotiate()
            if isinstance(name, nbdproto.ClientAborted):
                return
        await self._transmission(spec.device)

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._flush()
            await self.stream.aclose()

    async def __aenter__(self) -> ServerSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    # --- Internals -----------------------------------------------------------------------------------------

    async def _receive(self) -> bytes:
        return await receive(self.stream)

    async def _flush(self) -> None:
        pieces = self.engine.data_to_send()
        if not pieces:
            return
        if self._shared_sending:
            async with self._send_lock:
                await send_pieces(self.stream, pieces)
        else:
            await send_pieces(self.stream, pieces)

    async def _start_tls(self) -> None:
        assert self._tls is not None
        await self._flush()
        self.stream = await TLSStream.wrap(
            self.stream, server_side=True, ssl_context=self._tls, standard_compatible=False
        )
        self.engine.tls_established()

    async def _transmission(self, device: AsyncBlockDevice) -> None:
        engine = self.engine
        contexts = engine.meta_contexts
        budget = _Budget(RequestBudget(self._max_requests, self._max_bytes))
        dispatch = getattr(device, "dispatch", "tasks")
        sync_device = getattr(device, "device", None)
        # A sync device's read views (nbdproto._dispatch.ReadView) only where the kernel alone reads them (our
        # raw socket's sendmsg, not TLS) and they never wait on a disk (inline dispatch: an in-memory file).
        read_view = None
        if dispatch == "inline" and isinstance(self.stream, RawSocketStream):
            read_view = read_view_of(sync_device)
        self._shared_sending = dispatch in ("tasks", "threads")
        try:
            async with anyio.create_task_group() as tasks:
                while True:
                    # Take every request the buffered bytes hold, then carry them out together.
                    batch: list[Any] = []
                    while True:
                        event = engine.next_event()
                        if type(event) not in _REQUESTS:
                            break
                        batch.append(event)
                        if dispatch == "tasks" or dispatch == "threads":
                            await budget.wait_for_room()
                            cost = RequestBudget.cost(event)  # type: ignore[arg-type]
                            budget.add(cost)
                            tasks.start_soon(self._carry_out, device, event, contexts, budget, cost)
                    if batch and dispatch == "inline":
                        if sync_device is not None:
                            # A sync device that never blocks: call it right here, no coroutine per request.
                            for reply in carry_out_all(sync_device, batch, contexts, _log_device_error, read_view):
                                engine.send(reply)
                        else:
                            for request in batch:
                                engine.send(await _carry_out_async(device, request, contexts))
                    elif batch and dispatch == "batch":
                        replies = await anyio.to_thread.run_sync(
                            carry_out_all, sync_device, batch, contexts, _log_device_error
                        )
                        for reply in replies:
                            engine.send(reply)
                    event_type = type(event)
                    if event is nbdproto.NEED_DATA:
                        await self._flush()
                        await budget.wait_for_room()
                        engine.receive_data(await self._receive())
                    elif event is nbdproto.PAUSED:
                        # DISC with replies still owed: let them finish; then the engine says closed.
                        await budget.wait_idle()
                    elif event_type is nbdproto.DisconnectRequest:
                        continue
                    elif event_type is nbdproto.ConnectionClosed:
                        await budget.wait_idle()
                        await self._flush()
                        break
                    else:
                        raise nbdproto.LocalProtocolError(f"unexpected {event!r} in transmission")
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await device.flush()
                except OSError:
                    log.exception("flushing the device after the connection ended failed")

    async def _carry_out(
        self, device: AsyncBlockDevice, request: Any, contexts: Mapping[int, str], budget: _Budget, cost: int
    ) -> None:
        try:
            self.engine.send(await _carry_out_async(device, request, contexts))
            # A dead connection is the reading side's to notice: it ends the session.
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._flush()
        finally:
            budget.done(cost)


def _log_device_error(request: Any, exc: BaseException) -> None:
    log.error("device failed on %r", request, exc_info=exc)


async def _carry_out_async(device: AsyncBlockDevice, request: Any, contexts: Mapping[int, str]) -> nbdproto.Event:
    """The async twin of nbdproto._dispatch.carry_out: the same calls and replies, awaited."""
    calls = device_calls(request, contexts)
    try:
        results = [await getattr(device, call.method)(*call.args, **call.kwargs) for call in calls]
    except Exception as exc:  # a device failure becomes an NBD error reply
        if not isinstance(exc, OSError):
            _log_device_error(request, exc)
        return error_reply_for(request, exc)
    return reply_for(request, calls, results)


class _Budget:
    """RequestBudget with the waiting an event loop needs: the reader waits for room, DISC waits for idle."""

    def __init__(self, budget: RequestBudget) -> None:
        self.budget = budget
        self._changed = anyio.Event()

    def add(self, cost: int) -> None:
        self.budget.add(cost)

    def done(self, cost: int) -> None:
        self.budget.done(cost)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for_room(self) -> None:
        while self.budget.full:
            await self._changed.wait()

    async def wait_idle(self) -> None:
        while not self.budget.idle:
            await self._changed.wait()


class Server:
    """Serves exports to many clients at once, a task per connection, until cancelled.

    ``exports`` maps names to async devices or AsyncExportSpecs (a plain device is served read-only), or is a
    resolver. ``listen``: (host, port), a unix socket path, or a ready anyio listener.
    """

    def __init__(
        self,
        exports: Mapping[str, AsyncBlockDevice | AsyncSpec] | AsyncResolver,
        *,
        tls: ssl.SSLContext | None = None,
        tls_mode: nbdproto.TlsMode | None = None,
        list_exports: bool = True,
        max_requests: int = 64,
        max_bytes_in_flight: int = 64 * 1024 * 1024,
    ) -> None:
        if callable(exports):
            self._resolve: AsyncResolver = exports
            offer = None
        else:
            specs = {
                name: value if isinstance(value, AsyncExportSpec) else AsyncExportSpec(value)
                for name, value in exports.items()
            }
            self._resolve = specs.get
            offer = [nbdproto.ExportListing(name, spec.description) for name, spec in specs.items()]
        self._offer = offer if list_exports else None
        self._tls = tls
        self._tls_mode = tls_mode
        self._max_requests = max_requests
        self._max_bytes = max_bytes_in_flight

    async def serve(self, listener: SocketAcceptor | anyio.abc.Listener[Any]) -> None:
        """Serve every connection ``listener`` accepts, until cancelled. ``listen()`` makes the fast kind (a
        SocketAcceptor); any anyio Listener works too."""
        if not isinstance(listener, SocketAcceptor):
            await listener.serve(self.handle)
            return
        async with anyio.create_task_group() as tasks:
            while True:
                tasks.start_soon(self.handle, await listener.accept())

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one accepted connection to its end (a listener's handler)."""
        peer = _peer_name(stream)
        session = ServerSession(
            stream,
            exports=self._offer,
            tls=self._tls,
            tls_mode=self._tls_mode,
            lookup=self._resolve,
            max_requests=self._max_requests,
            max_bytes_in_flight=self._max_bytes,
        )
        async with session:
            try:
                name = await session.negotiate()
                if isinstance(name, nbdproto.ClientAborted):
                    log.info("client %s aborted the handshake", peer)
                    return
                spec = self._resolve(name)
                if spec is None:
                    return
                log.info("client %s uses export %r", peer, name)
                await session.serve(spec)
            except (ConnectionError, nbdproto.RemoteProtocolError, ssl.SSLError, anyio.BrokenResourceError) as exc:
                log.info("client %s: connection ended: %s", peer, exc)
            except Exception:
                log.exception("client %s: server error", peer)


async def listen(address: tuple[str, int] | str | socket.socket) -> SocketAcceptor:
    """Listen on (host, port), a unix socket path, or an already bound socket; for ``Server.serve``."""
    if isinstance(address, socket.socket):
        sock = address
    elif isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
    else:
        host, port = address
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(128)
    await anyio.lowlevel.checkpoint()
    return SocketAcceptor(sock)


def _peer_name(stream: anyio.abc.ByteStream) -> Any:
    return stream.extra(SocketAttribute.remote_address, "?")
