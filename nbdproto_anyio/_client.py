"""The async NBD client on anyio: ``await connect(uri)``, then the threads client's methods, awaited.

Many tasks may use one client at once: their requests are in flight together. There is no background task:
a task waiting for its reply takes the reader's lock and reads for everyone, handing each reply to the task
it belongs to, until its own arrives (then the next waiter takes over). So a client needs no task group of
its own, and cancelling a waiting task is safe: its reply is read and dropped when it comes.
"""

from __future__ import annotations

import itertools
import os
import ssl
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

import nbdproto
from nbdproto import NBDError
from nbdproto._negotiation import ClientNegotiation, plan_connection
from nbdproto.tls import client_context

from ._socket import RawSocketStream, connect_socket, receive, send_pieces

__all__ = ["AsyncClient", "connect", "list_exports", "NBDError"]


class AsyncClient:
    """A connected async NBD client; make one with ``await connect(...)``; ``async with`` closes it."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.engine = nbdproto.ClientConnection()
        self.handshake: nbdproto.HandshakeComplete | None = None
        self.listing: nbdproto.ExportList | None = None
        self._cookies = itertools.count(1)
        self._replies: dict[int, Any] = {}
        self._waiting: dict[int, anyio.Event] = {}
        self._abandoned: set[int] = set()
        self._read_lock = anyio.Lock()
        self._send_lock = anyio.Lock()
        self._failure: BaseException | None = None
        self._closed = False

    # --- Handshake ----------------------------------------------------------------------------------------

    async def _negotiate(self, plan: ClientNegotiation, tls: ssl.SSLContext | None, hostname: str | None) -> None:
        engine = self.engine
        while not plan.done:
            event = engine.next_event()
            if event is nbdproto.NEED_DATA:
                await self._flush()
                engine.receive_data(await self._receive())
                continue
            if event is nbdproto.PAUSED:
                raise nbdproto.LocalProtocolError("the handshake stalled with nothing to send")
            if isinstance(event, nbdproto.ConnectionClosed):
                raise ConnectionError("the server closed the connection during the handshake")
            send = plan.step(event)  # type: ignore[arg-type]
            if isinstance(event, nbdproto.StartTLS):
                if tls is None:
                    raise nbdproto.LocalProtocolError("STARTTLS accepted but no TLS context was given")
                await self._flush()
                self.stream = await TLSStream.wrap(
                    self.stream, server_side=False, hostname=hostname, ssl_context=tls, standard_compatible=False
                )
                engine.tls_established()
                send = plan.tls_done()
            if send is not None:
                engine.send(send)
        await self._flush()
        result = plan.result
        self.handshake = result if isinstance(result, nbdproto.HandshakeComplete) else None
        self.listing = result if isinstance(result, nbdproto.ExportList) else None

    # --- What the export is -------------------------------------------------------------------------------

    @property
    def export(self) -> nbdproto.Export:
        assert self.handshake is not None, "a listing connection has no export"
        return self.handshake.export

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def flags(self) -> nbdproto.TransmissionFlags:
        return self.export.flags

    @property
    def meta_contexts(self) -> Mapping[int, str]:
        return self.engine.meta_contexts

    def can(self, flag: nbdproto.TransmissionFlags) -> bool:
        return bool(self.export.flags & flag)

    # --- Requests -------------------------------------------------------------------------------------------

    async def _request(self, make: Any) -> Any:
        if self._failure is not None:
            raise ConnectionError(f"the connection failed: {self._failure}") from self._failure
        if self.engine.phase is not nbdproto.Phase.TRANSMISSION:
            raise ConnectionError(f"the connection is {self.engine.phase.value}")
        cookie = next(self._cookies)
        done = anyio.Event()
        self.engine.send(make(cookie))  # checks happen here; a refused request raises before anything is sent
        self._waiting[cookie] = done
        try:
            await self._flush()
            while cookie not in self._replies:
                async with self._read_lock:
                    if cookie in self._replies or done.is_set():
                        break
                    await self._read_some()
        except BaseException:
            if cookie not in self._replies:
                self._abandoned.add(cookie)  # its reply will be read and dropped
            self._waiting.pop(cookie, None)
            raise
        self._waiting.pop(cookie, None)
        reply = self._replies.pop(cookie)
        if isinstance(reply, BaseException):
            raise ConnectionError(f"the connection failed: {reply}") from reply
        if isinstance(reply, nbdproto.ErrorReply):
            raise NBDError(int(reply.error), reply.message or os.strerror(int(reply.error)))
        return reply

    async def _read_some(self) -> None:
        engine = self.engine
        try:
            # The rest of a read's data goes straight into the caller's buffer where the stream allows it
            # (plaintext); everything else comes in as chunks for the engine to parse.
            target = engine.read_buffer()
            if target is not None and isinstance(self.stream, RawSocketStream):
                engine.received_into(await self.stream.receive_into(target))
            else:
                engine.receive_data(await self._receive())
            while True:
                event = engine.next_event()
                if event is nbdproto.NEED_DATA or event is nbdproto.PAUSED:
                    return
                if isinstance(event, nbdproto.ConnectionClosed):
                    raise ConnectionError("the server closed the connection")
                cookie: int = event.cookie  # type: ignore[union-attr]
                if cookie in self._abandoned:
                    self._abandoned.discard(cookie)
                    continue
                self._replies[cookie] = event
                waiter = self._waiting.get(cookie)
                if waiter is not None:
                    waiter.set()
                if engine.must_disconnect:  # the server said ESHUTDOWN: leave as the spec asks
                    engine.send(nbdproto.DisconnectRequest())
                    await self._flush()
        except (nbdproto.ProtocolError, ConnectionError, anyio.BrokenResourceError) as exc:
            self._failure = exc
            for cookie, waiter in list(self._waiting.items()):
                self._replies.setdefault(cookie, exc)
                waiter.set()

    async def pread(self, length: int, offset: int, *, df: bool = False) -> bytes:
        return bytes(await self.pread_into(bytearray(length), offset, df=df))

    async def pread_into(self, buffer: bytearray | memoryview, offset: int, *, df: bool = False) -> memoryview:
        flags = nbdproto.CommandFlags.DF if df else nbdproto.NO_FLAGS
        reply = await self._request(lambda c: nbdproto.ReadRequest(c, offset, len(buffer), flags, buffer))
        return reply.data  # type: ignore[no-any-return]

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False) -> None:
        flags = nbdproto.CommandFlags.FUA if fua else nbdproto.NO_FLAGS
        await self._request(lambda c: nbdproto.WriteRequest(c, offset, data, flags))

    async def flush(self) -> None:
        await self._request(lambda c: nbdproto.FlushRequest(c))

    async def trim(self, length: int, offset: int, *, fua: bool = False) -> None:
        flags = nbdproto.CommandFlags.FUA if fua else nbdproto.NO_FLAGS
        await self._request(lambda c: nbdproto.TrimRequest(c, offset, length, flags))

    async def zero(
        self, length: int, offset: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        f = nbdproto.CommandFlags
        flags = (f(0) if may_trim else f.NO_HOLE) | (f.FAST_ZERO if fast else f(0)) | (f.FUA if fua else f(0))
        await self._request(lambda c: nbdproto.WriteZeroesRequest(c, offset, length, flags))

    async def cache(self, length: int, offset: int) -> None:
        await self._request(lambda c: nbdproto.CacheRequest(c, offset, length))

    async def block_status(
        self, length: int, offset: int, *, contexts: Sequence[str] | None = None, req_one: bool = False
    ) -> dict[str, tuple[nbdproto.Extent, ...]]:
        names = dict(self.meta_contexts)
        ids = tuple(i for i, name in names.items() if contexts is None or name in contexts)
        flags = nbdproto.CommandFlags.REQ_ONE if req_one else nbdproto.NO_FLAGS
        wanted = () if contexts is None else ids
        reply = await self._request(lambda c: nbdproto.BlockStatusRequest(c, offset, length, flags, wanted))
        return {names[i]: extents for i, extents in reply.extents.items()}

    # --- Bytes ----------------------------------------------------------------------------------------------

    async def _receive(self) -> bytes:
        return await receive(self.stream)

    async def _flush(self) -> None:
        pieces = self.engine.data_to_send()
        if pieces:
            async with self._send_lock:
                await send_pieces(self.stream, pieces)

    async def aclose(self) -> None:
        """Disconnect politely (NBD_CMD_DISC) and close."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                if self.handshake is not None and self._failure is None:
                    self.engine.send(nbdproto.DisconnectRequest())
                    await self._flush()
            except (OSError, nbdproto.ProtocolError, anyio.BrokenResourceError):
                pass
            await self.stream.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _open(target: nbdproto.NbdUri) -> anyio.abc.ByteStream:
    return await connect_socket(target.socket if target.unix else (target.host, target.port))


async def connect(
    uri: str | None = None,
    *,
    host: str = "localhost",
    port: int = nbdproto.DEFAULT_PORT,
    socket_path: str | None = None,
    export_name: str = "",
    tls: ssl.SSLContext | None = None,
    require_tls: bool | None = None,
    structured_replies: bool = True,
    extended_headers: bool = True,
    meta_contexts: Sequence[str] = (nbdproto.BASE_ALLOCATION,),
) -> AsyncClient:
    """Connect by URI (nbd://, nbds://, nbd+unix://, nbds+unix://) or host/port or socket_path."""
    target, plan = plan_connection(
        uri, host=host, port=port, socket_path=socket_path, export_name=export_name, tls=tls is not None,
        require_tls=require_tls, structured_replies=structured_replies, extended_headers=extended_headers,
        meta_contexts=meta_contexts,
    )  # fmt: skip
    if plan.tls and tls is None:
        tls = client_context(target)  # the URI's TLS settings (nbdproto.tls)
    client = AsyncClient(await _open(target))
    try:
        await client._negotiate(plan, tls, target.tls_hostname)
    except BaseException:
        await client.stream.aclose()
        raise
    return client


async def list_exports(uri: str, *, tls: ssl.SSLContext | None = None) -> list[nbdproto.ExportListing]:
    """The exports a server lists (NBD_OPT_LIST), with their descriptions."""
    target, plan = plan_connection(uri, tls=tls is not None, list_exports=True)
    if plan.tls and tls is None:
        tls = client_context(target)  # the URI's TLS settings (nbdproto.tls)
    client = AsyncClient(await _open(target))
    try:
        await client._negotiate(plan, tls, target.tls_hostname)
    finally:
        await client.stream.aclose()
    assert client.listing is not None
    return list(client.listing.exports)
