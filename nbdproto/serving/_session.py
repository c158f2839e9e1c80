"""One server connection's decisions that are not I/O, shared by the threads and anyio servers.

A backend's server session is an I/O loop around a ``ServerSessionLogic``: the logic owns the engine
(``ServerConnection``), resolves the exports a client asks about, answers the negotiate-then-serve contract,
and in transmission hands the backend batches of requests and carries them out on the device; the backend only
moves bytes (receive, send, wrap TLS) and decides *where* device calls run (inline, a worker thread, a task).
So the handshake loop of either backend reads::

    while (step := logic.handshake_step()) is not HandshakeStep.DONE:
        start_tls() if step is HandshakeStep.START_TLS else exchange()   # exchange: send, then receive

and the transmission loop follows ``logic.inline_transmission()``'s steps (``_steps``), or takes
``logic.next_batch()`` until it says the connection is over. The handshake half is here, the transmission half
in ``_session_transmission``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from nbdproto.engine import (
    NEED_DATA,
    ClientAborted,
    ConnectionClosed,
    ExportRequested,
    HandshakeComplete,
    HandshakeStep,
    Phase,
    ServerConnection,
    StartTLS,
    WriteRequest,
)
from nbdproto.wire import CommandFlags, LocalProtocolError

from ._admission import ClientInfo, ClientRefused
from ._budget import MemoryShare
from ._carry_out import OnError, OnFlushError, write_view_ended
from ._core import SessionSettings
from ._device import BlockDevice, Dispatch, dispatch_of
from ._export import ExportSpec, answer_export_request
from ._log import ConnectionLog
from ._receive_size import ReceiveSize
from ._session_transmission import SessionTransmission
from ._steps import STREAM_WRITES_OVER
from ._subject import subject_of, write_subject

__all__ = ["ServerSessionLogic"]


class ServerSessionLogic(SessionTransmission):
    """The I/O-free half of one server connection, set up as ``settings`` say (nbdproto.serving.SessionSettings).
    ``client``: who is at the other end (nbdproto.ClientInfo), which a resolver taking two arguments is given;
    the session adds what the TLS upgrade tells about it. ``log``: the server's ConnectionLog, told of every
    device failure (whose detail the client is not told) and of a flush that failed as the connection ended
    (unless ``on_device_error`` or ``on_flush_error`` say otherwise)."""

    def __init__(
        self,
        settings: SessionSettings,
        *,
        share: MemoryShare | None = None,
        on_device_error: OnError | None = None,
        on_flush_error: OnFlushError | None = None,
        client: ClientInfo | None = None,
        log: ConnectionLog | None = None,
    ) -> None:
        self.engine = ServerConnection(
            exports=settings.offer, tls=settings.effective_tls_mode, stream_writes_over=STREAM_WRITES_OVER
        )
        self.settings = settings
        self.client = client if client is not None else ClientInfo()
        self._lookup = None if settings.lookup is None else self._resolve
        self._limits = limits = settings.limits
        self._request_wait = limits.seconds(limits.request_timeout)
        self._idle_wait = limits.seconds(limits.idle_timeout)
        self.share = share
        """This connection's draw on the server's MemoryBudget (None: unlimited). In the threads server
        several threads share the budget: theirs is wrapped so that every call holds the budget's lock."""
        if log is not None:
            on_device_error = on_device_error or functools.partial(log.device_failed, peer=self.client)
            on_flush_error = on_flush_error or log.flush_failed
        self.on_device_error = on_device_error
        """Told of every device failure (the log: one line for an OSError, a traceback for a bug); the client is
        told the errno's text alone."""
        self.on_flush_error = on_flush_error
        """Told (client, export name, error) when the flush as the connection ends fails (ConnectionLog's
        flush_failed: one line); None: ``flush_device`` raises it."""
        self.shutting_down = False
        """Set by the driver when the server shuts down: requests carried out from then on get ESHUTDOWN."""
        self._closed = False
        self._queued = 0  # reply bytes queued since the last send, counted against FLUSH_AT
        self._queued_cost = 0  # the budget they took, given back once they are sent
        self._failed_writes: dict[int, BaseException] = {}  # streamed writes that failed part-way, by cookie
        self._streamed_flags: dict[int, CommandFlags] = {}  # streamed writes' flags, until their last part
        self._receive_size = ReceiveSize()
        self._header_room = memoryview(bytearray(32))  # in_place_buffers: where the next request header lands
        self._handed_writes: list[WriteRequest] = []  # received_in_place's whole writes, for next_batch
        self._reply_buffers = None  # reuse_read_buffers
        self._lone_reads = None  # answer_lone_read's device, meta contexts and views, in inline_transmission
        self.outcome: str | ClientAborted | None = None
        """How the handshake ended: the chosen export's name, or ClientAborted (None while it goes on)."""
        self.spec: ExportSpec[Any] | None = None
        """The export being served, once ``offer_export`` was called."""

    # --- Handshake ------------------------------------------------------------------------------------------

    def handshake_step(self) -> HandshakeStep:
        """Advance the handshake as far as the bytes received allow and say what the driver must do next.

        DONE once the client chose an export (``outcome`` is its name: hand it to ``offer_export``, or check
        it first, as ``nbdproto_threads.negotiate`` lets an application do) or aborted (``outcome`` is ClientAborted).
        Raises ConnectionError when the client goes away, RemoteProtocolError when it breaks the protocol.
        """
        engine = self.engine
        while True:
            event = engine.next_event()
            if event is NEED_DATA:
                return HandshakeStep.EXCHANGE
            kind = type(event)
            if kind is ExportRequested:
                requested: ExportRequested = event  # type: ignore[assignment]
                chosen = self.outcome if isinstance(self.outcome, str) else None
                answer = answer_export_request(requested, self._lookup, chosen, self.spec)
                if answer is None:
                    self.outcome = requested.name
                    return HandshakeStep.DONE
                engine.send(answer)
            elif kind is StartTLS:
                return HandshakeStep.START_TLS
            elif kind is HandshakeComplete:
                complete: HandshakeComplete = event  # type: ignore[assignment]
                self.outcome = complete.export.name
                return HandshakeStep.DONE
            elif kind is ClientAborted:
                self.outcome = event  # type: ignore[assignment]
                return HandshakeStep.DONE
            elif kind is ConnectionClosed:
                raise ConnectionError("the connection ended during the handshake")
            else:
                raise LocalProtocolError(f"unexpected {event!r} during the handshake")

    def _resolve(self, name: str) -> ExportSpec[Any] | None:
        return self.settings.resolve(name, self.client)

    def tls_established(self, peer_certificate: Mapping[str, Any] | None, psk_identity: str | None) -> None:
        """The driver finished the TLS upgrade the last step asked for; ``peer_certificate`` is the client's
        verified certificate as ``getpeercert()`` gives it ({} or None without one), ``psk_identity`` the
        pre-shared key identity it used (nbdproto.tls.psk_identity). Raises ClientRefused when the connection
        policy does not accept the certificate's subject: the driver ends the connection there."""
        self.engine.tls_established()
        client = self.client
        client.certificate_name = subject_of(peer_certificate) if peer_certificate else None
        client.certificate_subject = write_subject(client.certificate_name) if client.certificate_name else None
        client.psk_identity = psk_identity
        policy = self.settings.policy
        reason = policy.certificate_refusal(client) if policy is not None else None
        if reason is not None:
            raise ClientRefused(reason)

    def offer_export(
        self, device: BlockDevice | ExportSpec[Any], *, read_only: bool = True, description: str = ""
    ) -> bool:
        """Answer the client's choice with ``device`` (read-only unless ``read_only=False``; an ExportSpec
        carries its own settings). True once transmission has begun; False when the engine refused that
        choice (a TLS or block-size rule) and the handshake goes on: keep stepping it (a later choice of the
        same export is answered from this spec).
        """
        if not isinstance(self.outcome, str):
            raise RuntimeError("offer_export() needs a handshake that ended with a chosen export")
        spec = device if isinstance(device, ExportSpec) else ExportSpec(device, description, read_only)
        self.spec = spec
        engine = self.engine
        if engine.phase is Phase.AWAIT_EXPORT:
            engine.send(spec.export(self.outcome))
        if engine.phase is not Phase.TRANSMISSION:
            return False
        complete = engine.next_event()
        assert type(complete) is HandshakeComplete, complete
        return True

    @property
    def transmitting(self) -> bool:
        """True once the handshake is over and requests flow."""
        return self.engine.phase is Phase.TRANSMISSION

    # --- Transmission ---------------------------------------------------------------------------------------

    @property
    def device(self) -> BlockDevice:
        """The device of the export being served."""
        assert self.spec is not None, "no export is being served"
        return self.spec.device  # type: ignore[no-any-return]

    def dispatch(self) -> Dispatch:
        """How the device wants to be called (nbdproto.Dispatch)."""
        return dispatch_of(self.device)

    def begin_shutdown(self) -> None:
        """The server is shutting down: work carried out from now on gets ESHUTDOWN, and waits for the client
        are cut short (``next_wait``)."""
        self.shutting_down = True
        self.engine.write_view = None  # a write now refused must leave no trace: none is received in place

    def flush_device(self) -> None:
        """Make the served device's writes durable (called as the connection ends). An OSError (a remote that
        stalled or went away, a full disk: the device's to bound in time) goes to ``on_flush_error``, or is
        raised when there is none."""
        flush = getattr(self.device, "flush", None) if self.spec is not None else None
        if flush is None:
            return  # a device without flush has nothing to make durable (capabilities_of offers no FLUSH for it)
        try:
            flush()
        except OSError as exc:
            if self.on_flush_error is None:
                raise
            self.on_flush_error(self.client, self.outcome if isinstance(self.outcome, str) else "", exc)

    def close(self) -> bool:
        """The connection is ending: give back every byte of the budget it held. True the first time only (the
        driver then sends what is queued, if the client takes it, and closes the stream)."""
        if self._closed:
            return False
        self._closed = True
        if self._reply_buffers is not None:  # first: what it gives back is part of what give_all would
            self._reply_buffers.release()
            self._reply_buffers = None  # (a pipelined driver's thread that sends late keeps nothing more)
        if self.share is not None:
            self.share.give_all()
        if self.spec is not None:
            for write in self.engine.in_place_writes():  # views nothing will be received into any more
                write_view_ended(self.device, write)
        return True
