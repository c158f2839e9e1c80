"""The blocking NBD server: one accepted socket driven by nbdproto's ServerConnection, and a Server around it.

Two layers, as in the seed (OCaml's mirage ``nbd`` Server):

- ``ServerSession``: one connection. ``negotiate()`` runs the handshake and returns the export name the client
  chose, or ``nbdproto.ClientAborted``; ``serve(device)`` answers the choice and serves requests until the
  client disconnects; the session is a context manager that guarantees the close. ``negotiate(sock, ...)``
  is the one-call form.
- ``Server``: listens (TCP or unix socket), maps export names to devices (or asks a resolver), and runs a
  session per connection in its own thread, until ``shutdown()``.

All protocol decisions are the engine's (nbdproto.ServerConnection) and the shared dispatch helper's
(nbdproto._dispatch); this module only moves bytes and calls devices.

Requests are served inline by the connection's thread by default: it reads a large chunk, parses every
request in it, carries each out, and writes all the replies with one sendmsg. That is the fastest way for
devices that answer in microseconds (memory, files in the page cache). With ``workers > 0`` requests are
carried out by a pool instead, so a slow device serves many at once and replies go out as they complete
(in any order, as the protocol allows). On a plaintext connection a device's read views (FileDevice: slices of
the file's memory mapping) are queued as the replies' data, so a read costs no system call of its own.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nbdproto
from nbdproto import BlockDevice, ExportSpec, ReadView, RequestBudget, answer_export_request, carry_out, read_view_of

from ._stream import SocketStream

__all__ = ["ExportSpec", "ServerSession", "negotiate", "Server", "Resolver"]

log = logging.getLogger("nbdproto.threads.server")

SENDFILE_MIN = 64 * 1024
"""Reads at least this long are sent with os.sendfile where the device has a file descriptor but no read views:
below it, one preadv into a buffer that joins the batched sendmsg costs fewer system calls than a sendfile."""

_EVENT_REQUESTS = (
    nbdproto.ReadRequest,
    nbdproto.WriteRequest,
    nbdproto.FlushRequest,
    nbdproto.TrimRequest,
    nbdproto.CacheRequest,
    nbdproto.WriteZeroesRequest,
    nbdproto.BlockStatusRequest,
    nbdproto.ResizeRequest,
)


Spec = ExportSpec[BlockDevice]
"""An export of a sync device (nbdproto.ExportSpec, shared with the anyio backend)."""

Resolver = Callable[[str], "Spec | None"]
"""Looks an export name up: the spec to serve, or None for an unknown name."""


class ServerSession:
    """One client connection on the server side, over a connected blocking socket.

    ``exports``: names offered to NBD_OPT_LIST (None refuses listing). ``tls``: an ``ssl.SSLContext`` for the
    server side; with one, TLS is forced unless ``tls_mode`` says otherwise. ``lookup`` answers the export
    questions a client may ask before choosing (NBD_OPT_INFO, meta context queries); without it INFO is
    refused and meta contexts are offered as base:allocation.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        exports: Iterable[str | nbdproto.ExportListing] | None = None,
        tls: ssl.SSLContext | None = None,
        tls_mode: nbdproto.TlsMode | None = None,
        lookup: Resolver | None = None,
        workers: int = 0,
        max_bytes_in_flight: int = 64 * 1024 * 1024,
    ) -> None:
        if tls_mode is None:
            tls_mode = nbdproto.TlsMode.FORCEDTLS if tls is not None else nbdproto.TlsMode.NOTLS
        if tls_mode is not nbdproto.TlsMode.NOTLS and tls is None:
            raise ValueError(f"TLS mode {tls_mode.value} needs an ssl.SSLContext")
        self.stream = SocketStream(sock)
        self.engine = nbdproto.ServerConnection(exports=exports, tls=tls_mode)
        self._tls = tls
        self._lookup = lookup
        self._workers = workers
        self._max_bytes = max_bytes_in_flight
        self._chosen: str | None = None
        self._spec: Spec | None = None
        self._closed = False
        self._lock = threading.Lock()  # the engine and the socket's write side, when workers reply

    # --- The seed's contract: negotiate, serve, close ------------------------------------------------------

    def negotiate(self) -> str | nbdproto.ClientAborted:
        """Run the handshake until the client chooses an export; returns its name, or ClientAborted.

        Raises ConnectionError when the client goes away, RemoteProtocolError when it breaks the protocol.
        """
        engine = self.engine
        while True:
            event = engine.next_event()
            if event is nbdproto.NEED_DATA:
                self._flush()
                engine.receive_data(self.stream.recv())
            elif isinstance(event, nbdproto.ExportRequested):
                answer = answer_export_request(event, self._lookup, self._chosen, self._spec)
                if answer is None:
                    self._chosen = event.name
                    return event.name
                engine.send(answer)
            elif isinstance(event, nbdproto.StartTLS):
                self._start_tls()
            elif isinstance(event, nbdproto.HandshakeComplete):
                return event.export.name
            elif isinstance(event, nbdproto.ClientAborted):
                self._flush()
                return event
            elif isinstance(event, nbdproto.ConnectionClosed):
                raise ConnectionError("the connection ended during the handshake")
            else:
                raise nbdproto.LocalProtocolError(f"unexpected {event!r} during the handshake")

    def serve(self, device: BlockDevice | Spec, *, read_only: bool = True, description: str = "") -> None:
        """Serve the chosen export from ``device`` until the client disconnects, then flush the device.

        Read-only unless ``read_only=False`` (an ExportSpec carries its own settings).
        """
        if self._chosen is None:
            raise RuntimeError("serve() needs a successful negotiate() first")
        spec = device if isinstance(device, ExportSpec) else ExportSpec(device, description, read_only)
        self._spec = spec
        engine = self.engine
        if engine.phase is nbdproto.Phase.AWAIT_EXPORT:
            engine.send(spec.export(self._chosen))
        if engine.phase is nbdproto.Phase.TRANSMISSION:
            complete = engine.next_event()
            assert isinstance(complete, nbdproto.HandshakeComplete), complete
        else:
            # The engine refused that GO (a TLS or block size rule): let the client try again.
            name = self.negotiate()
            if isinstance(name, nbdproto.ClientAborted):
                return
        self._transmission(spec.device)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._flush()
            self.stream.close()

    def __enter__(self) -> ServerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- Internals -----------------------------------------------------------------------------------------

    def _flush(self) -> None:
        pieces = self.engine.data_to_send()
        if pieces:
            self.stream.send(pieces)

    def _start_tls(self) -> None:
        assert self._tls is not None
        self._flush()
        raw = self.stream.sock
        self.stream.sock = self._tls.wrap_socket(raw, server_side=True)
        self.engine.tls_established()

    def _transmission(self, device: BlockDevice) -> None:
        engine = self.engine
        contexts = engine.meta_contexts
        # Only the kernel reads a device's views on a plaintext socket (see nbdproto._dispatch.ReadView); TLS
        # would copy them in user space, where a file truncated under us is a SIGBUS rather than an error.
        plaintext = not isinstance(self.stream.sock, ssl.SSLSocket)
        read_view = read_view_of(device) if plaintext else None
        if self._workers:
            self._pooled_transmission(device, contexts, read_view)
            return
        # Inline: read a chunk, carry out every request in it, write every reply with one sendmsg. A device
        # with views answers reads with them (measured faster than sendfile even at 256 KiB); else large reads
        # of a file on a plaintext connection are answered with a FileRegion: sendfile, no copy through Python.
        fd = device.fileno() if plaintext and read_view is None and hasattr(device, "fileno") else -1
        read_request, read_data, file_region = nbdproto.ReadRequest, nbdproto.ReadData, nbdproto.FileRegion
        try:
            while True:
                event = engine.next_event()
                event_type = type(event)
                if event_type is read_request and fd >= 0 and event.length >= SENDFILE_MIN:  # type: ignore[union-attr]
                    read: Any = event
                    engine.send(read_data(read.cookie, read.offset, file_region(fd, read.offset, read.length)))
                elif event_type in _EVENT_REQUESTS:
                    engine.send(carry_out(device, event, contexts, _log_device_error, read_view))  # type: ignore[arg-type]
                elif event is nbdproto.NEED_DATA:
                    self._flush()
                    engine.receive_data(self.stream.recv())
                elif event_type is nbdproto.DisconnectRequest:
                    continue
                elif event_type is nbdproto.ConnectionClosed:
                    self._flush()
                    break
                else:
                    raise nbdproto.LocalProtocolError(f"unexpected {event!r} in transmission")
        finally:
            _flush_device(device)

    def _pooled_transmission(
        self, device: BlockDevice, contexts: Mapping[int, str], read_view: ReadView | None
    ) -> None:
        # Requests go to a pool and replies go out as they complete. The budget stops the reader while too
        # much is in flight, so the pool's queue (and the memory its requests pin) stays bounded.
        engine, lock = self.engine, self._lock
        budget = RequestBudget(self._workers * 4, self._max_bytes)
        room = threading.Condition(lock)
        pool = ThreadPoolExecutor(self._workers, thread_name_prefix="nbd-request")

        def serve_request(request: Any, cost: int) -> None:
            reply = carry_out(device, request, contexts, _log_device_error, read_view)
            with lock:
                engine.send(reply)
                budget.done(cost)
                room.notify_all()
                # A dead socket is the reader's to notice: it ends the session.
                with contextlib.suppress(OSError):
                    self._flush()

        try:
            while True:
                with lock:
                    event = engine.next_event()
                    event_type = type(event)
                    if event_type in _EVENT_REQUESTS:
                        while budget.full:
                            room.wait()
                        cost = RequestBudget.cost(event)  # type: ignore[arg-type]
                        budget.add(cost)
                        pool.submit(serve_request, event, cost)
                        continue
                    if (
                        event is nbdproto.NEED_DATA
                        or event is nbdproto.PAUSED
                        or event_type is nbdproto.ConnectionClosed
                    ):
                        # Receiving more, or ending: first let what is in flight finish where it must.
                        if event is not nbdproto.NEED_DATA:
                            while not budget.idle:
                                room.wait()
                        self._flush()
                if event is nbdproto.NEED_DATA:
                    data = self.stream.recv()
                    with lock:
                        engine.receive_data(data)
                elif event_type is nbdproto.ConnectionClosed:
                    break
                elif event is not nbdproto.PAUSED and event_type is not nbdproto.DisconnectRequest:
                    raise nbdproto.LocalProtocolError(f"unexpected {event!r} in transmission")
        finally:
            pool.shutdown(wait=True)
            _flush_device(device)


def _flush_device(device: BlockDevice) -> None:
    try:
        device.flush()
    except OSError:
        log.exception("flushing the device after the connection ended failed")


def _log_device_error(request: Any, exc: BaseException) -> None:
    log.error("device failed on %r", request, exc_info=exc)


def negotiate(
    sock: socket.socket,
    exports: Iterable[str | nbdproto.ExportListing] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
) -> tuple[ServerSession, str | nbdproto.ClientAborted]:
    """The seed's one-call handshake: negotiate on an accepted socket with an optional offer list.

    Returns the session (a context manager that guarantees the close) and the export name the client chose,
    or ``ClientAborted``. TLS is forced when ``tls`` is given. Then call ``session.serve(device)``.
    """
    session = ServerSession(sock, exports=exports, tls=tls)
    try:
        return session, session.negotiate()
    except BaseException:
        session.close()
        raise


class Server:
    """Serves exports to many clients at once: a thread per connection, until ``shutdown()``.

    ``exports`` maps names to devices or ExportSpecs (a plain device is served read-only), or is a resolver
    called with each name a client asks for. ``listen`` is a ``(host, port)`` pair, a unix socket path, or an
    already bound socket. ``tls`` / ``tls_mode`` as for ServerSession; ``list_exports`` answers NBD_OPT_LIST
    with the mapping's names (and descriptions).
    """

    def __init__(
        self,
        exports: Mapping[str, BlockDevice | Spec] | Resolver,
        listen: tuple[str, int] | str | socket.socket = ("127.0.0.1", nbdproto.DEFAULT_PORT),
        *,
        tls: ssl.SSLContext | None = None,
        tls_mode: nbdproto.TlsMode | None = None,
        list_exports: bool = True,
        workers: int = 0,
        max_bytes_in_flight: int = 64 * 1024 * 1024,
    ) -> None:
        if callable(exports):
            self._resolve: Resolver = exports
            offer = None
        else:
            specs = {
                name: value if isinstance(value, ExportSpec) else ExportSpec(value) for name, value in exports.items()
            }
            self._resolve = specs.get
            offer = [nbdproto.ExportListing(name, spec.description) for name, spec in specs.items()]
        self._offer = offer if list_exports else None
        self._tls = tls
        self._tls_mode = tls_mode
        self._workers = workers
        self._max_bytes = max_bytes_in_flight
        self.sock = listen if isinstance(listen, socket.socket) else _listen(listen)
        self._sessions: set[ServerSession] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def address(self) -> Any:
        """What the listening socket is bound to: (host, port) or the unix socket path."""
        return self.sock.getsockname()

    def serve_forever(self) -> None:
        """Accept and serve connections until shutdown() is called."""
        while not self._stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            thread = threading.Thread(target=self._serve_one, args=(conn, peer), daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve_one(self, conn: socket.socket, peer: Any) -> None:
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = ServerSession(
            conn,
            exports=self._offer,
            tls=self._tls,
            tls_mode=self._tls_mode,
            lookup=self._resolve,
            workers=self._workers,
            max_bytes_in_flight=self._max_bytes,
        )
        with self._lock:
            self._sessions.add(session)
        try:
            with session:
                name = session.negotiate()
                if isinstance(name, nbdproto.ClientAborted):
                    log.info("client %s aborted the handshake", peer)
                    return
                spec = self._resolve(name)
                if spec is None:
                    return  # the resolver changed its mind since negotiate() asked it
                log.info("client %s uses export %r", peer, name)
                session.serve(spec)
        except (ConnectionError, nbdproto.RemoteProtocolError, ssl.SSLError) as exc:
            log.info("client %s: connection ended: %s", peer, exc)
        except Exception:
            log.exception("client %s: server error", peer)
        finally:
            with self._lock:
                self._sessions.discard(session)
                self._threads.discard(threading.current_thread())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let connected clients finish, then flush every device (graceful shutdown)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            sessions = list(self._sessions)
            threads = list(self._threads)
        for session in sessions:
            # Wake readers blocked in recv; each session flushes its device as it ends.
            with contextlib.suppress(OSError):
                session.stream.sock.shutdown(socket.SHUT_RD)
        for thread in threads:
            thread.join(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _listen(address: tuple[str, int] | str) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
    else:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(128)
    return sock
