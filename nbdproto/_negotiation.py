"""The usual client handshake, as an I/O-free plan both client backends follow.

ClientConnection sends whatever option it is given; this decides which, the way a well-behaved client does
(spec: "Client-side requirements", "Maximum interoperability"):

1. STARTTLS first when TLS is wanted (a client that insists on TLS gives up if it is refused);
2. EXTENDED_HEADERS, else STRUCTURED_REPLY when the server refuses it;
3. SET_META_CONTEXT for the contexts wanted, once replies can carry them;
4. GO with NAME, DESCRIPTION and BLOCK_SIZE; EXPORT_NAME for servers that answer GO with UNSUP (and for
   non-fixed newstyle servers); oldstyle servers need nothing at all.
Or, to list exports: LIST, then ABORT.

A driver calls ``step(event)`` with every event the connection produces during the handshake (after calling
``tls_established()`` itself on StartTLS) and sends what it returns, until ``done`` is set: then ``result``
is the HandshakeComplete (or the ExportList). Failures raise ``NegotiationError``. A refusal the plan cannot
get past ends the session the way the spec wants a client to end it ("Termination of the session during
option haggling"): with NBD_OPT_ABORT, a soft disconnect; the error is raised once the server answered it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._constants import BASE_ALLOCATION, DEFAULT_PORT, InfoType, Option, OptionReplyType
from ._errors import ProtocolError
from ._events import (
    ClientAborted,
    Event,
    ExportList,
    HandshakeComplete,
    MetaContexts,
    OptionAbort,
    OptionAck,
    OptionError,
    OptionExportName,
    OptionExtendedHeaders,
    OptionGo,
    OptionList,
    OptionSetMetaContext,
    OptionStartTLS,
    OptionStructuredReply,
    ServerGreeting,
    StartTLS,
)
from ._uri import NbdUri, parse_uri

__all__ = ["ClientNegotiation", "NegotiationError", "plan_connection"]

_REP = OptionReplyType


class NegotiationError(ProtocolError):
    """The handshake could not reach what was asked: ``reply_type`` is the server's NBD_REP_ERR_* answer (0
    when the refusal was ours, e.g. TLS required but not offered)."""

    def __init__(self, message: str, reply_type: int = 0) -> None:
        super().__init__(message)
        self.reply_type = reply_type


class ClientNegotiation:
    """One client handshake plan; see the module docstring."""

    def __init__(
        self,
        export_name: str = "",
        *,
        tls: bool = False,
        require_tls: bool = False,
        structured_replies: bool = True,
        extended_headers: bool = True,
        meta_contexts: Sequence[str] = ("base:allocation",),
        list_exports: bool = False,
        block_sizes: bool = True,
    ) -> None:
        """``block_sizes``: ask for NBD_INFO_BLOCK_SIZE with GO, which binds the client to the constraints the
        server sends (spec: "Size constraints"); without it a server that has constraints may refuse the
        export (NBD_REP_ERR_BLOCK_SIZE_REQD) or must fail unaligned requests cleanly."""
        self.export_name = export_name
        self.tls = tls or require_tls
        self.require_tls = require_tls
        self.structured = structured_replies
        self.extended = extended_headers and structured_replies
        self.meta_contexts = tuple(meta_contexts)
        self.list_exports = list_exports
        self.block_sizes = block_sizes
        self.done = False
        self.result: HandshakeComplete | ExportList | None = None
        self.tls_active = False
        self._fixed = True
        self._replies = False  # structured replies or extended headers agreed
        self._extended_agreed = False
        self._listing: ExportList | None = None
        self._failure: NegotiationError | None = None  # why the plan sent NBD_OPT_ABORT, raised once it is answered

    def step(self, event: Event) -> Event | None:
        """The next option to send after ``event``, or None (nothing to send: wait for more, or done)."""
        if isinstance(event, ServerGreeting):
            if event.oldstyle:
                return None  # HandshakeComplete follows without any option
            self._fixed = bool(event.handshake_flags & 1)
            if not self._fixed:
                if self.require_tls:
                    raise NegotiationError("TLS is required, but the server does not speak fixed newstyle")
                if self.list_exports:
                    raise NegotiationError("this old server cannot list its exports")
                return OptionExportName(self.export_name)
            return OptionStartTLS() if self.tls else self._after_tls()
        if isinstance(event, StartTLS):
            self.tls_active = True
            return None  # the driver upgrades, calls tls_established(), then tls_done()
        if isinstance(event, OptionError):
            return self._refused(event)
        if isinstance(event, OptionAck):
            if event.option == Option.EXTENDED_HEADERS or event.option == Option.STRUCTURED_REPLY:
                self._replies = True
                self._extended_agreed = event.option == Option.EXTENDED_HEADERS
                return self._after_reply_format()
            return None
        if isinstance(event, MetaContexts):
            return self._go()
        if isinstance(event, ExportList):
            self._listing = event
            return OptionAbort()
        if isinstance(event, ClientAborted):
            if self._failure is not None:
                raise self._failure
            self.done, self.result = True, self._listing
            return None
        if isinstance(event, HandshakeComplete):
            self.done, self.result = True, event
            return None
        return None

    def tls_done(self) -> Event:
        """The option to send once the driver has finished the TLS upgrade."""
        return self._after_tls()

    def _after_tls(self) -> Event:
        if self.list_exports:
            return OptionList()
        if self.extended:
            return OptionExtendedHeaders()
        if self.structured:
            return OptionStructuredReply()
        return self._go()

    def _after_reply_format(self) -> Event:
        if self.meta_contexts and self._replies:
            return OptionSetMetaContext(self.export_name, self.meta_contexts)
        return self._go()

    def _go(self) -> Event:
        if not self.block_sizes:
            return OptionGo(self.export_name, (InfoType.NAME, InfoType.DESCRIPTION))
        return OptionGo(self.export_name, (InfoType.NAME, InfoType.DESCRIPTION, InfoType.BLOCK_SIZE))

    def _give_up(self, failure: NegotiationError) -> Event:
        self._failure = failure
        return OptionAbort()

    def _refused(self, event: OptionError) -> Event | None:
        option, reply = event.option, event.reply_type
        detail = f": {event.message}" if event.message else ""
        if reply == _REP.ERR_SHUTDOWN:
            # spec: a client told NBD_REP_ERR_SHUTDOWN MUST initiate a soft disconnect.
            return self._give_up(NegotiationError(f"the server is shutting down{detail}", reply))
        if option == Option.STARTTLS:
            if self.require_tls:
                return self._give_up(NegotiationError(f"the server refused TLS{detail}", reply))
            return self._after_tls()
        if reply == _REP.ERR_TLS_REQD:
            return self._give_up(NegotiationError(f"the server requires TLS{detail}", reply))
        if option == Option.EXTENDED_HEADERS:
            return OptionStructuredReply() if self.structured else self._go()
        if option == Option.STRUCTURED_REPLY:
            return self._go()
        if option == Option.SET_META_CONTEXT:
            return self._go()  # block status will be unavailable; the rest works
        if option == Option.LIST:
            return self._give_up(NegotiationError(f"the server does not list its exports{detail}", reply))
        if option == Option.GO:
            # spec: fall back to EXPORT_NAME for old servers, never after extended headers were agreed.
            if reply == _REP.ERR_UNSUP and not self._extended_agreed:
                return OptionExportName(self.export_name)
            return self._give_up(NegotiationError(f"export {self.export_name!r} refused{detail}", reply))
        return self._give_up(NegotiationError(f"option {option} refused{detail}", reply))


def plan_connection(
    uri: str | None, options: Mapping[str, Any], *, list_exports: bool = False
) -> tuple[NbdUri, ClientNegotiation]:
    """Where a client connects and the handshake it follows, from a URI or from the ``host`` / ``port`` /
    ``socket_path`` / ``export_name`` of ``options`` (nbdproto.ConnectOptions): the part of connecting both
    client backends share. TLS is used when ``options["tls"]`` holds a context or the URI is nbds, and required
    when ``require_tls`` says so, or by default for an nbds URI; a backend makes a default context when the
    plan's ``tls`` is set and the caller gave none. With a ``command`` (a server to start with socket
    activation) the target is a unix socket whose path the backend fills in once the server is started
    (nbdproto.sockets.ActivatedServer). Raises ValueError for a bad URI, or a URI and a command both."""
    command = options.get("command")
    if command is not None:
        if uri:
            raise ValueError("connect to a URI or start a server command, not both")
        if isinstance(command, str) or not command:
            raise ValueError(f"command must be a non-empty list of arguments, not {command!r}")
        target = NbdUri(options.get("export_name", ""), False, True)
    elif uri:
        target = parse_uri(uri)
    else:
        socket_path = options.get("socket_path")
        host, port = options.get("host", "localhost"), options.get("port", DEFAULT_PORT)
        target = NbdUri(options.get("export_name", ""), False, socket_path is not None, host, port, socket_path or "")
    require_tls = options.get("require_tls")
    plan = ClientNegotiation(
        target.export_name,
        tls=options.get("tls") is not None,
        require_tls=target.tls if require_tls is None else require_tls,
        structured_replies=options.get("structured_replies", True),
        extended_headers=options.get("extended_headers", True),
        meta_contexts=options.get("meta_contexts", (BASE_ALLOCATION,)),
        list_exports=list_exports,
        block_sizes=options.get("block_sizes", True),
    )
    return target, plan
