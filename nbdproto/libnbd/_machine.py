"""One handle's connection: libnbd's model, a state machine moved along by poll (libnbd(3) "USING THE
ASYNCHRONOUS (LOW LEVEL) API"), built on the sans-IO engine ``nbdproto.engine.ClientConnection``.

The socket never blocks. ``pump()`` does everything that can be done without waiting: finish a connect, send
what is queued, receive what has arrived, hand each event to the handshake (``Negotiator``) or to the commands
(``CommandTable``), until nothing moves. ``direction()`` says what to wait for; ``poll()`` waits for it once
and pumps. The aio calls queue a request and pump once (so a request goes out at once when the socket takes
it); the synchronous calls are an aio call and ``wait_until`` its completion, as in libnbd. Read data is
received straight into the caller's buffer (``ClientConnection.read_buffer``), never copied in Python.

A failure that ends the connection (the server breaks the protocol, a reset, a TLS failure, a refusal the
automatic handshake cannot get past) makes the handle *dead*: the commands in flight complete with ENOTCONN,
the socket is closed, and the call that found it raises the error. A clean end (the server closes between
replies, NBD_OPT_ABORT, NBD_CMD_DISC answered by a close) makes it *closed*.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import select
import socket
import ssl
import time
from collections.abc import Callable

import nbdproto.engine
from nbdproto.engine import NEED_DATA, PAUSED
from nbdproto.sockets import IOV_MAX, step_past
from nbdproto.wire import LocalProtocolError, RemoteProtocolError

from ._commands import CommandTable, system_errno
from ._constants import (
    AIO_DIRECTION_BOTH,
    AIO_DIRECTION_READ,
    AIO_DIRECTION_WRITE,
    HANDSHAKE_FLAG_FIXED_NEWSTYLE,
    HANDSHAKE_FLAG_NO_ZEROES,
)
from ._errors import Failure
from ._negotiation import Negotiator, OptionCall, Outcome
from ._settings import Facts, Settings
from ._tlscontext import tls_context
from ._transport import Address, Subprocess, begin_connect, finish_connect

__all__ = ["Public", "Stage", "Machine"]

_RECV_SIZE = 256 * 1024
"""Bytes asked for by a receive that is not the rest of a read's data (headers, small replies: many at once)."""
_HEADER_RECV = 64
"""Bytes asked for instead while a large read is in flight: its reply's header (and the offset of its data,
40 bytes at most), so that the data itself is received straight into the caller's buffer, not copied there."""
_POLLIN, _POLLOUT, _POLLHUP = select.POLLIN, select.POLLOUT, select.POLLHUP
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Public:
    """libnbd's public states, as bits (the states a call may be made in are a mask of them)."""

    CREATED = 1
    CONNECTING = 2
    NEGOTIATING = 4
    CONNECTED = 8
    CLOSED = 16
    DEAD = 32


class Stage(enum.Enum):
    """Where a connection is: libnbd's name and description of the state, and the public state it is part of
    (``aio_is_*``; an int, as every call checks it)."""

    CREATED = ("START: Handle after being initially created", Public.CREATED)
    CONNECTING = ("CONNECT.CONNECTING: Waiting for the connection to the server to complete", Public.CONNECTING)
    HANDSHAKE = ("NEWSTYLE.RECV_REPLY: Negotiating with the server", Public.CONNECTING)
    TLS = ("NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE: Running the TLS handshake", Public.CONNECTING)
    NEGOTIATING = ("NEGOTIATING: Connection is ready to negotiate an NBD option", Public.NEGOTIATING)
    READY = ("READY: Connection is ready to process NBD commands", Public.CONNECTED)
    CLOSED = ("CLOSED: Connection is closed", Public.CLOSED)
    DEAD = ("DEAD: Connection is in an unrecoverable error state, can only be closed", Public.DEAD)

    def __init__(self, description: str, public: int) -> None:
        self.description = description
        self.public = public


class Machine:
    """The connection of one handle (see the module docstring)."""

    def __init__(self, settings: Settings, debug: Callable[[str], None]) -> None:
        self.settings = settings
        self.debug = debug
        self.facts = Facts()
        self.commands = CommandTable()
        self.stage = Stage.CREATED
        self.sock: socket.socket | None = None
        self.engine: nbdproto.engine.ClientConnection | None = None
        self.negotiator: Negotiator | None = None
        self.subprocess: Subprocess | None = None
        self.failure: Failure | None = None
        self.host: str | None = None
        """The TCP host name asked for (TLS checks the server's certificate against it), None otherwise."""
        self.port: str | None = None
        self.address: tuple[int, Address] | None = None
        self._addresses: list[tuple[int, Address]] = []
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_start = 0
        self._closing = False
        self._eof = False
        self._disc_shut = False
        self._tls_want = AIO_DIRECTION_READ
        self._poller = select.poll()
        self._poll_mask = 0
        self.bytes_sent = self.bytes_received = self.chunks_sent = self.chunks_received = 0

    # --- What state the connection is in ------------------------------------------------------------------

    @property
    def processing(self) -> bool:
        """Ready, with a request still being written (libnbd's "processing" state)."""
        return self.stage is Stage.READY and bool(self._out)

    def state_name(self) -> str:
        """libnbd's short name of the state, as its errors quote it (``READY``, ``NEGOTIATING``, ...)."""
        if self.processing:
            return "ISSUE_COMMAND.SEND_REQUEST"
        return self.stage.description.split(":", 1)[0]

    def describe(self) -> str:
        if self.processing:
            return "ISSUE_COMMAND.SEND_REQUEST: Sending a request to the server"
        return self.stage.description

    def direction(self) -> int:
        stage = self.stage
        if stage is Stage.READY:
            return AIO_DIRECTION_BOTH if self._out else AIO_DIRECTION_READ
        if stage is Stage.HANDSHAKE:
            return AIO_DIRECTION_WRITE if self._out else AIO_DIRECTION_READ
        if stage is Stage.CONNECTING:
            return AIO_DIRECTION_WRITE
        if stage is Stage.TLS:
            return self._tls_want
        return 0

    def fileno(self) -> int:
        if self.sock is None:
            raise Failure(errno.EINVAL, "connection is not in a connected state")
        return self.sock.fileno()

    # --- Connecting -----------------------------------------------------------------------------------------

    def connect(self, addresses: list[tuple[int, Address]], host: str | None = None, port: str | None = None) -> None:
        """Start connecting to the first of ``addresses`` that does not refuse at once (the rest are tried
        when a connect in progress fails)."""
        self.host, self.port = host, port
        self._addresses = list(addresses)
        self.stage = Stage.CONNECTING
        self._next_address()

    def adopt(self, sock: socket.socket, subprocess: Subprocess | None = None) -> None:
        """Talk over a socket that is connected already (connect_socket, connect_command)."""
        self.subprocess = subprocess or self.subprocess
        self._connected(sock)

    def _next_address(self) -> None:
        failure: OSError | None = None
        while self._addresses:
            self.address = self._addresses.pop(0)
            try:
                sock, connected = begin_connect(*self.address)
            except OSError as exc:
                failure = exc
                continue
            if connected:
                self._connected(sock)
            else:
                self.sock = sock
                self._poller.register(sock, _POLLOUT)
                self._poll_mask = _POLLOUT
            return
        raise self.die(Failure(failure.errno or 0 if failure else 0, "connect"))

    def _connect_step(self) -> bool:
        sock = self.sock
        assert sock is not None
        if not self._poller.poll(0):
            return False
        try:
            finish_connect(sock)
        except OSError as exc:
            self._poller.unregister(sock)
            sock.close()
            self.sock = None
            if not self._addresses:
                raise self.die(Failure(exc.errno or 0, "connect")) from None
            self._next_address()
            return True
        self._connected(sock)
        return True

    def _connected(self, sock: socket.socket) -> None:
        self.sock = sock
        self._poller.register(sock, _POLLIN)
        self._poll_mask = _POLLIN
        flags = self.settings.handshake_flags
        self.engine = nbdproto.engine.ClientConnection(
            no_zeroes=bool(flags & HANDSHAKE_FLAG_NO_ZEROES), fixed_newstyle=bool(flags & HANDSHAKE_FLAG_FIXED_NEWSTYLE)
        )
        self.negotiator = Negotiator(self.settings, self.facts, self.engine)
        self.stage = Stage.HANDSHAKE
        self.debug("connected; waiting for the server's greeting")

    # --- Moving things along -------------------------------------------------------------------------------

    def pump(self) -> None:
        """Do all that can be done without waiting (see the module docstring). Raises Failure, the handle
        then dead, when the connection fails."""
        try:
            while self._step():
                pass
        except Failure as failure:
            if self.stage is not Stage.DEAD:
                raise self.die(failure) from None
            raise
        except RemoteProtocolError as exc:
            raise self.die(self._protocol_failure(exc)) from None
        except LocalProtocolError as exc:
            error = system_errno(exc.error_code) if exc.error_code else errno.EINVAL
            raise self.die(Failure(error, str(exc))) from None
        except ssl.SSLError as exc:
            raise self.die(Failure(0, f"TLS: {exc}")) from None
        except OSError as exc:
            raise self.die(Failure(exc.errno or 0, f"recv: {exc.strerror or exc}")) from None

    def _protocol_failure(self, exc: RemoteProtocolError) -> Failure:
        if self._eof:  # the server closed the connection where the protocol does not allow it
            return Failure(0, "recv: server disconnected unexpectedly")
        return Failure(errno.EPROTO, f"protocol error: {exc}")

    def _step(self) -> bool:
        stage = self.stage
        if stage is Stage.READY or stage is Stage.HANDSHAKE:
            moved = self._flush() if self._out else False
            if self._closing:
                if not self._out:
                    self._finish_closing()
                return False
            if self.commands.disconnecting and not self._out and not self._disc_shut:
                self._shut_writes()
            return self._receive() or moved
        if stage is Stage.CONNECTING:
            return self._connect_step()
        if stage is Stage.TLS:
            return self._tls_step()
        if stage is Stage.NEGOTIATING and self._out:
            return self._flush()
        return False

    def send_now(self) -> None:
        """After a request was queued: send what the socket takes now, without reading (a reply is read when
        the script polls or notifies, as in libnbd, so aio_in_flight counts the request until then)."""
        if self.stage is Stage.READY and self._out:
            try:
                self._flush()
                if self.commands.disconnecting and not self._out and not self._disc_shut:
                    self._shut_writes()
            except Failure as failure:
                raise self.die(failure) from None

    def queue(self) -> None:
        """Take what the engine has to send."""
        engine = self.engine
        assert engine is not None
        pieces = engine.data_to_send()
        if pieces:
            self._out.extend(pieces)  # type: ignore[arg-type]  # the client never queues FileRegions
            self.chunks_sent += 1

    def _flush(self) -> bool:
        sock, pieces, start = self.sock, self._out, self._out_start
        assert sock is not None
        sent_any = False
        try:
            while start < len(pieces):
                if isinstance(sock, ssl.SSLSocket):
                    piece = pieces[start]
                    sent = sock.send(piece)
                    start = start + 1 if sent == len(piece) else start
                    if sent < len(piece):
                        pieces[start] = memoryview(piece)[sent:]
                else:
                    sent = sock.sendmsg(pieces[start : start + IOV_MAX])
                    start = step_past(pieces, start, sent)
                self.bytes_sent += sent
                sent_any = True
                while start < len(pieces) and not len(pieces[start]):
                    start += 1
        except _WOULD_BLOCK:
            pass
        except OSError as exc:
            raise Failure(exc.errno or 0, "send") from None
        if start >= len(pieces):
            self._out, self._out_start = [], 0
        else:
            self._out_start = start
        return sent_any

    def _receive(self) -> bool:
        sock, engine = self.sock, self.engine
        assert sock is not None and engine is not None
        target = engine.read_buffer()
        try:
            if target is not None:
                count = sock.recv_into(target)
                engine.received_into(count)
                if count and count < len(target):
                    self.bytes_received += count
                    return True  # more of the same data to come: no event yet
            else:
                data = sock.recv(_HEADER_RECV if self.commands.large_reads else _RECV_SIZE)
                count = len(data)
                engine.receive_data(data)
        except _WOULD_BLOCK:
            return False
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            count = 0
            engine.receive_data(b"")
        except OSError as exc:
            raise Failure(exc.errno or 0, f"recv: {exc.strerror}") from None
        self.bytes_received += count
        self._eof = self._eof or not count
        self._take_events()
        return True

    def _take_events(self) -> None:
        """Hand every event the engine has to whoever waits for it (a command, or the handshake)."""
        engine, commands = self.engine, self.commands
        assert engine is not None
        while True:
            event = engine.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            self.chunks_received += 1
            if self.stage is Stage.READY:
                if type(event) is nbdproto.engine.ConnectionClosed:
                    self.close_cleanly()
                    return
                commands.finish(event, engine.meta_contexts)  # type: ignore[arg-type]
                continue
            if type(event) is nbdproto.engine.ConnectionClosed:
                raise Failure(0, "recv: server disconnected unexpectedly")
            assert self.negotiator is not None
            self.apply(self.negotiator.handle(event))  # type: ignore[arg-type]
            if self.stage not in (Stage.HANDSHAKE, Stage.READY):  # paused, closing, TLS: no more events now
                return

    def apply(self, outcome: Outcome) -> None:
        """Act on what the handshake says comes next."""
        self.queue()
        if outcome is Outcome.WAIT:
            self.stage = Stage.HANDSHAKE
        elif outcome is Outcome.PAUSE:
            self.stage = Stage.NEGOTIATING
        elif outcome is Outcome.READY:
            self.stage = Stage.READY
        elif outcome is Outcome.TLS:
            self._start_tls()
        elif outcome is Outcome.CLOSE:
            self.stage = Stage.HANDSHAKE
            self._closing = True

    def start_option(self, call: OptionCall) -> None:
        """Option mode: run ``call`` from the negotiating state."""
        assert self.negotiator is not None
        self.stage = Stage.HANDSHAKE
        self.apply(self.negotiator.start(call))
        self.pump()

    # --- TLS ------------------------------------------------------------------------------------------------

    def _start_tls(self) -> None:
        context, hostname = tls_context(self.settings, self.host)
        assert self.sock is not None
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname, do_handshake_on_connect=False)
        self.stage = Stage.TLS

    def _tls_step(self) -> bool:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket) and self.engine is not None and self.negotiator is not None
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._tls_want = AIO_DIRECTION_READ
            return False
        except ssl.SSLWantWriteError:
            self._tls_want = AIO_DIRECTION_WRITE
            return False
        except (ssl.SSLError, OSError) as exc:
            raise Failure(0, f"TLS handshake: {exc}") from None
        self.engine.tls_established()
        self.stage = Stage.HANDSHAKE
        self.debug("TLS negotiated")
        self.apply(self.negotiator.tls_done())
        return True

    # --- Waiting --------------------------------------------------------------------------------------------

    def poll(self, timeout: int) -> int:
        """Wait up to ``timeout`` ms (-1: for ever) for what ``direction()`` says, then pump: 1, or 0 when the
        time ran out."""
        direction = self.direction()
        sock = self.sock
        if not direction or sock is None:
            raise Failure(errno.EINVAL, f"nothing to poll for in state {self.state_name()}")
        if isinstance(sock, ssl.SSLSocket) and direction & AIO_DIRECTION_READ and sock.pending():
            self.pump()
            return 1
        mask = (_POLLIN if direction & AIO_DIRECTION_READ else 0) | (_POLLOUT if direction & AIO_DIRECTION_WRITE else 0)
        poller = self._poller
        if mask != self._poll_mask:
            poller.modify(sock, mask)
            self._poll_mask = mask
        events = poller.poll(timeout)
        if not events:
            return 0
        if events[0][1] & (_POLLIN | _POLLOUT | _POLLHUP):
            self.pump()
            return 1
        raise self.die(Failure(errno.ENOTCONN, "server closed socket unexpectedly"))

    def wait_until(self, done: Callable[[], bool]) -> None:
        """Poll until ``done()`` (a synchronous call's wait), within the handle's wait timeout if it has one."""
        limit = self.settings.wait_timeout
        if limit is None:
            while not done():
                self.poll(-1)
            return
        deadline = time.monotonic() + limit
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.die(Failure(errno.ETIMEDOUT, f"no progress within the wait timeout of {limit} s"))
            self.poll(max(1, int(left * 1000) + 1))

    # --- Ending ---------------------------------------------------------------------------------------------

    def _shut_writes(self) -> None:
        # NBD_CMD_DISC is out: tell the server nothing more will come (it closes once its replies are sent).
        self._disc_shut = True
        if self.sock is not None and not isinstance(self.sock, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def _finish_closing(self) -> None:
        negotiator = self.negotiator
        fatal = negotiator.fatal if negotiator is not None else None
        if fatal is not None:
            raise self.die(fatal)
        self.close_cleanly()

    def _end(self, stage: Stage, error: int) -> None:
        self.stage = stage
        self._closing = False
        negotiator = self.negotiator
        if negotiator is not None and negotiator.call is not None and not negotiator.call.done:
            negotiator._finish(error, "the connection ended", Outcome.PAUSE)
        self.commands.abort()
        self._out, self._out_start = [], 0
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poller.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def close_cleanly(self) -> None:
        self._end(Stage.CLOSED, errno.ENOTCONN)

    def die(self, failure: Failure) -> Failure:
        """The connection failed with ``failure``: the handle is dead; returns the failure to raise."""
        if self.stage is not Stage.DEAD:
            self.failure = failure
            self.debug(f"connection failed: {failure.text}")
            self._end(Stage.DEAD, failure.errnum or errno.ENOTCONN)
        return failure

    def close(self) -> None:
        """The handle is closing: drop the connection and reap a server it started."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.subprocess is not None:
            subprocess, self.subprocess = self.subprocess, None
            subprocess.close()
