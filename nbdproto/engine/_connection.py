"""What both roles of a connection keep and do alike: the receive buffer, the bytes queued to send, the phase
and its transitions (``_state``), TLS, and the driver's interface around them.

``ServerConnection`` and ``ClientConnection`` build on ``Connection``: each says which role it plays (the
transition table it follows), how it reads each phase's messages (``_next_in_greeting``,
``_next_in_options``, ``_next_in_transmission``) and where received bytes go (``_take``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import ClassVar, NoReturn

from nbdproto.wire import LocalProtocolError, ReceiveBuffer, RemoteProtocolError

from ._events import ConnectionClosed, Event
from ._payloads import Payload
from ._state import NEED_DATA, PAUSED, Phase, Role, Trigger, next_phase

__all__ = ["Connection"]


class Connection:
    """The state and the driver's interface both roles share (see the module docstring)."""

    role: ClassVar[Role]
    _peer: ClassVar[str]  # how messages name the other side

    def __init__(self) -> None:
        self._buf = ReceiveBuffer()
        self._out: list[Payload] = []
        self._events: deque[Event] = deque()
        self._phase = Phase.GREETING
        self._eof = False  # the peer closed its end (b"" received)
        self._fixed = False  # both sides speak fixed newstyle
        self._no_zeroes = False  # both agreed to drop EXPORT_NAME's 124 zero bytes
        self._tls_active = False
        self._into: memoryview | None = None
        """The unfilled rest of a payload's own buffer, where the next bytes from the peer belong (a client's
        read into the caller's buffer, a server's write into its own or the device's); None when no payload is
        arriving into one."""
        self._reset_negotiation()

    def _reset_negotiation(self) -> None:
        # Everything the spec says a successful STARTTLS makes both sides forget.
        self.structured_replies = False
        self.extended_headers = False
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}

    # --- The driver's interface --------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """Where the connection is (``nbdproto.engine.Phase``; the transitions are in its module)."""
        return self._phase

    @property
    def tls_active(self) -> bool:
        """True once the driver reported the TLS upgrade done."""
        return self._tls_active

    @property
    def meta_contexts(self) -> Mapping[int, str]:
        """The meta contexts agreed for transmission: id -> name."""
        return self._meta_contexts

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the peer; ``b""`` means the peer closed its end."""
        phase = self._phase
        if phase is Phase.ERROR:
            raise LocalProtocolError("the connection already failed; it takes no more data")
        if not data:
            self._eof = True
            return
        if phase is Phase.CLOSED:
            return  # nothing more is read
        if phase is Phase.TLS_UPGRADE:
            self._fail(f"the {self._peer} sent plaintext after NBD_OPT_STARTTLS was acknowledged, before TLS")
        self._take(data)

    def next_event(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        """The next event the peer's bytes caused, NEED_DATA if more bytes are needed, or PAUSED while the
        connection waits on its driver (an export to look up, a TLS upgrade, replies still owed, an option to
        send). Once the connection is over it returns ``ConnectionClosed``. Raises RemoteProtocolError when the
        peer broke a rule that ends the connection."""
        if self._events:
            return self._events.popleft()
        phase = self._phase
        try:
            if phase is Phase.TRANSMISSION:
                return self._next_in_transmission()
            if phase is Phase.OPTIONS:
                return self._next_in_options()
            if phase is Phase.GREETING:
                return self._next_in_greeting()
        except RemoteProtocolError:
            self._break()
            raise
        if phase is Phase.CLOSED:
            return ConnectionClosed()
        if phase is Phase.ERROR:
            raise LocalProtocolError("the connection already failed")
        return PAUSED

    def received_into(self, count: int) -> None:
        """``count`` bytes were written at the start of the payload buffer the engine gave out (a client's
        ``read_buffer()``, a server's ``write_buffer()``); 0 means the peer closed."""
        rest = self._into
        if count == 0:
            self._eof = True
            return
        if rest is None or not 0 < count <= len(rest):
            raise LocalProtocolError(f"received_into({count}) does not fit the payload buffer")
        self._into = rest[count:] if count < len(rest) else None

    def data_to_send(self) -> list[Payload]:
        """Take the pieces queued for the peer, in order (payloads are separate pieces, for sendmsg)."""
        out = self._out
        self._out = []
        return out

    def tls_established(self) -> None:
        """The driver finished the TLS handshake after a StartTLS event; options go on under TLS."""
        self._move(Trigger.TLS_ESTABLISHED)
        self._tls_active = True
        self._reset_negotiation()

    # --- For the roles -------------------------------------------------------------------------------------

    def _take(self, data: bytes | bytearray | memoryview) -> None:
        """Keep received bytes where the role reads them from (the receive buffer, or a payload's place)."""
        raise NotImplementedError

    def _fill_into(self, data: bytes | bytearray | memoryview) -> memoryview:
        """``receive_data``'s way into the payload buffer (``_into``): what is left over for the receive buffer."""
        rest = self._into
        assert rest is not None
        count = min(len(rest), len(data))
        rest[:count] = memoryview(data)[:count]
        self._into = rest[count:] if count < len(rest) else None
        return memoryview(data)[count:]

    def _next_in_greeting(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        raise NotImplementedError

    def _next_in_options(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        raise NotImplementedError

    def _next_in_transmission(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        raise NotImplementedError

    def _move(self, trigger: Trigger) -> None:
        """Take the transition ``trigger`` leads to from the current phase (LocalProtocolError if none)."""
        self._phase = next_phase(self.role, self._phase, trigger)

    def _break(self) -> None:
        """A rule was broken: the connection is over (ERROR), whatever phase it was in."""
        if self._phase is not Phase.ERROR:
            self._move(Trigger.BROKEN)

    def _fail(self, message: str) -> NoReturn:
        """The peer broke a rule: end the connection with a RemoteProtocolError saying which."""
        self._break()
        raise RemoteProtocolError(message)
