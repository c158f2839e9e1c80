"""The async NBD client on anyio: ``await connect(uri)``, then nbdproto.client.ClientRequests' methods, awaited.

Many tasks may use one client at once: their requests are in flight together. There is no background task:
a task waiting for its reply takes the reader's lock and reads for everyone, handing each reply to the task
it belongs to, until its own arrives (then the next waiter takes over). So a client needs no task group of
its own, and cancelling a waiting task is safe: its reply is read and dropped when it comes. The handshake and
the bookkeeping of requests are nbdproto.client.ClientSessionLogic's, shared with the threads client.

Time limits are the caller's cancel scopes (``anyio.fail_after``), as anyio code expects, or ``timeout=``
for symmetry with the threads client: it bounds the connect, the handshake and each request; a request that
runs out of time raises TimeoutError and closes the connection (its state is then unknown).
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.tls import TLSStream

import nbdproto
import nbdproto.client
from nbdproto.client import Awaiting, ClientRequests, ClientSessionLogic
from nbdproto.engine import HandshakeStep
from nbdproto.tls import connection_context

from ._socket import RawSocketStream, close_stream, connect_socket, receive, send_pieces

if TYPE_CHECKING:
    from nbdproto.sockets import ActivatedServer

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

__all__ = ["AsyncClient", "connect", "list_exports", "inquire", "export_info", "list_meta_contexts"]


class AsyncClient(ClientRequests[Awaiting]):
    """A connected async NBD client; make one with ``await connect(...)``; ``async with`` closes it."""

    def __init__(self, stream: anyio.abc.ByteStream, logic: ClientSessionLogic, timeout: float | None) -> None:
        self.stream = stream
        self.logic = logic
        self.engine = logic.engine
        self._timeout = timeout
        self._replies: dict[int, Any] = {}
        self._waiting: dict[int, anyio.Event] = {}
        self._abandoned: set[int] = set()
        self._read_lock = anyio.Lock()
        self._send_lock = anyio.Lock()
        self._closed = False
        self.server: ActivatedServer | None = None
        """The server started for this client (``connect(command=[...])``), stopped once it is closed."""

    # --- Handshake ----------------------------------------------------------------------------------------

    async def _negotiate(self, tls: ssl.SSLContext | None, hostname: str | None) -> None:
        logic = self.logic
        while (step := logic.handshake_step()) is not HandshakeStep.DONE:
            await self._flush()
            if step is HandshakeStep.EXCHANGE:
                self.engine.receive_data(await receive(self.stream))
                continue
            if tls is None:
                raise nbdproto.LocalProtocolError("STARTTLS accepted but no TLS context was given")
            self.stream = await TLSStream.wrap(
                self.stream, server_side=False, hostname=hostname, ssl_context=tls, standard_compatible=False
            )
            logic.tls_established()
        await self._flush()
        result = logic.result
        self.handshake = result if isinstance(result, nbdproto.HandshakeComplete) else None
        self.listing = result if isinstance(result, nbdproto.ExportList) else None

    # --- Requests -------------------------------------------------------------------------------------------

    async def _call(self, make: Callable[[int], nbdproto.Request], finish: Callable[[nbdproto.Event], Any]) -> Any:
        cookie = self.logic.submit(make)  # checks happen here; a refused request raises before anything is sent
        done = anyio.Event()
        self._waiting[cookie] = done
        try:
            with anyio.fail_after(self._timeout):
                await self._flush()
                while cookie not in self._replies:
                    async with self._read_lock:
                        if cookie in self._replies or done.is_set():
                            break
                        await self._read_some()
        except TimeoutError as exc:
            self.logic.fail(exc)
            await self._abort()
            raise TimeoutError(f"no reply within {self._timeout} s; the connection is closed") from None
        except BaseException:
            if cookie not in self._replies:
                self._abandoned.add(cookie)  # its reply will be read and dropped
            raise
        finally:
            self._waiting.pop(cookie, None)
        return finish(ClientSessionLogic.outcome(self._replies.pop(cookie)))

    async def _read_some(self) -> None:
        engine, logic = self.engine, self.logic
        try:
            # The rest of a read's data goes straight into the caller's buffer where the stream allows it
            # (plaintext); everything else comes in as chunks for the engine to parse.
            target = engine.read_buffer()
            if target is not None and isinstance(self.stream, RawSocketStream):
                engine.received_into(await self.stream.receive_into(target))
            else:
                engine.receive_data(await receive(self.stream))
            for event in logic.replies():
                cookie = event.cookie
                if cookie in self._abandoned:
                    self._abandoned.discard(cookie)
                    continue
                self._replies[cookie] = event
                waiter = self._waiting.get(cookie)
                if waiter is not None:
                    waiter.set()
            await self._flush()  # NBD_CMD_DISC after ESHUTDOWN
        except (nbdproto.ProtocolError, ConnectionError, anyio.BrokenResourceError) as exc:
            logic.fail(exc)
            for cookie, waiter in list(self._waiting.items()):
                self._replies.setdefault(cookie, exc)
                waiter.set()

    # --- Bytes ----------------------------------------------------------------------------------------------

    async def _flush(self) -> None:
        pieces = self.engine.data_to_send()
        if pieces:
            async with self._send_lock:
                await send_pieces(self.stream, pieces)

    async def _abort(self) -> None:
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()
            await self._stop_server()

    async def aclose(self) -> None:
        """Disconnect politely (NBD_CMD_DISC) and close; then stop the server started for this client, if one
        was."""
        with anyio.CancelScope(shield=True):
            if not self._closed:
                self._closed = True
                try:
                    if self.logic.disconnect():
                        with anyio.move_on_after(self._timeout or 5.0):
                            await self._flush()
                except (OSError, nbdproto.ProtocolError, anyio.BrokenResourceError):
                    pass
                await close_stream(self.stream)
            await self._stop_server()

    async def _stop_server(self) -> None:
        if self.server is not None:
            await anyio.to_thread.run_sync(self.server.stop)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _negotiated(uri: str | None, options: nbdproto.ConnectOptions, **asked: Any) -> AsyncClient:
    target, plan = nbdproto.client.plan_connection(uri, options, **asked)
    given = connection_context(target, plan.tls, options.get("tls"), options.get("tls_psk"))
    if options.get("command") is None:
        client = await _handshake(target, plan, given, options.get("timeout"))
    else:
        from nbdproto.sockets import ActivatedServer  # only here: most clients never start a server

        server = await anyio.to_thread.run_sync(ActivatedServer, options["command"])
        try:
            client = await _handshake(server.target(target), plan, given, options.get("timeout"))
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                failure = await anyio.to_thread.run_sync(server.failed, exc)
            if failure is exc:
                raise
            raise failure from exc
        client.server = server
    client.strict = options.get("strict", False)
    return client


async def _handshake(
    target: nbdproto.NbdUri, plan: nbdproto.client.ClientNegotiation, tls: ssl.SSLContext | None, timeout: float | None
) -> AsyncClient:
    with anyio.fail_after(timeout):
        try:
            stream = await connect_socket(target.socket if target.unix else (target.host, target.port))
        except OSError as exc:
            raise nbdproto.client.connect_error(exc, target) from None
        client = AsyncClient(stream, ClientSessionLogic(nbdproto.ClientConnection(), plan), timeout)
        try:
            await client._negotiate(tls, target.tls_hostname)
        except BaseException:
            await client._abort()
            raise
    return client


async def connect(uri: str | None = None, **options: Unpack[nbdproto.ConnectOptions]) -> AsyncClient:
    """Connect by URI (nbd://, nbds://, nbd+unix://, nbds+unix://) or by the ``host`` / ``port`` /
    ``socket_path`` / ``export_name`` options (nbdproto.ConnectOptions says what each does), or start a server
    (``command=["nbdkit", "memory", "1G"]``: socket activation, stopped when the client closes); ``timeout``
    (none by default: use cancel scopes) bounds the connect, the handshake and each request."""
    return await _negotiated(uri, options)


async def list_exports(
    uri: str | None = None, **options: Unpack[nbdproto.ConnectOptions]
) -> list[nbdproto.ExportListing]:
    """The exports a server lists (NBD_OPT_LIST), with their descriptions."""
    client = await _negotiated(uri, options, list_exports=True)
    with anyio.CancelScope(shield=True):
        await close_stream(client.stream)  # after NBD_OPT_ABORT: close_notify, as the spec asks
        await client._stop_server()
    assert client.listing is not None
    return list(client.listing.exports)


async def inquire(uri: str, *, list_exports: bool = False, info: bool = True,
                  list_meta_contexts: Sequence[str] | None = (), **options: Unpack[nbdproto.ConnectOptions]
                  ) -> nbdproto.Inquiry:  # fmt: skip
    """Ask a server about exports without selecting one (opt mode): as nbdproto_threads.inquire."""
    client = await _negotiated(uri, options, go=False, list_exports=list_exports, info=info,
                               list_meta_contexts=list_meta_contexts)  # fmt: skip
    await client._abort()
    inquiry = client.logic.result
    assert isinstance(inquiry, nbdproto.Inquiry)
    return inquiry


async def export_info(uri: str, **options: Unpack[nbdproto.ConnectOptions]) -> nbdproto.ExportDetails:
    """The URI's export as NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT describe it, without selecting it."""
    return (await inquire(uri, **options)).exports[0].checked()


async def list_meta_contexts(
    uri: str, queries: Sequence[str] = (), **options: Unpack[nbdproto.ConnectOptions]
) -> list[str]:
    """The meta contexts the server offers for the URI's export (NBD_OPT_LIST_META_CONTEXT), unselected."""
    inquiry = await inquire(uri, info=False, list_meta_contexts=queries, **options)
    return list(inquiry.exports[0].checked().meta_contexts or ())
