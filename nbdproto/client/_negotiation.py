"""The usual client handshake, as an I/O-free plan both client backends follow.

ClientConnection sends whatever option it is given; this decides which, the way a well-behaved client does
(spec: "Client-side requirements", "Maximum interoperability"):

1. STARTTLS first when TLS is wanted (a client that insists on TLS gives up if it is refused);
2. EXTENDED_HEADERS, else STRUCTURED_REPLY when the server refuses it;
3. SET_META_CONTEXT for the contexts wanted, once replies can carry them;
4. GO with NAME, DESCRIPTION and BLOCK_SIZE; EXPORT_NAME for servers that answer GO with UNSUP (and for
   non-fixed newstyle servers); oldstyle servers need nothing at all.
Or, to list exports: LIST, then ABORT.

Or, in "opt mode" (``go=False``: ask, never enter transmission, like libnbd's opt mode): LIST when the exports
are to be listed; the reply format (so that the answers say what a connection would get); then for the export,
or for every listed export, NBD_OPT_INFO (``info``) and NBD_OPT_LIST_META_CONTEXT (``list_meta_contexts``: the
queries; empty asks for every context); then ABORT. A refusal of one export's INFO or LIST_META_CONTEXT is
recorded in its ``ExportDetails`` and the plan goes on with the next; the result is an ``Inquiry``. With
``go=True`` a ``list_meta_contexts`` query is asked before SET_META_CONTEXT, and its answer kept in
``available_meta_contexts``: discovery on the connection that is then used.

A driver calls ``step(event)`` with every event the connection produces during the handshake (after calling
``tls_established()`` itself on StartTLS) and sends what it returns, until ``done`` is set: then ``result``
is the HandshakeComplete (or the ExportList). Failures raise ``NegotiationError``. A refusal the plan cannot
get past ends the session the way the spec wants a client to end it ("Termination of the session during
option haggling"): with NBD_OPT_ABORT, a soft disconnect; the error is raised once the server answered it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from nbdproto.engine import (
    ClientAborted,
    Event,
    Export,
    ExportInfo,
    ExportList,
    HandshakeComplete,
    MetaContexts,
    OptionAbort,
    OptionAck,
    OptionError,
    OptionExportName,
    OptionExtendedHeaders,
    OptionGo,
    OptionInfo,
    OptionList,
    OptionListMetaContext,
    OptionSetMetaContext,
    OptionStartTLS,
    OptionStructuredReply,
    ServerGreeting,
    StartTLS,
)
from nbdproto.wire import BASE_ALLOCATION, DEFAULT_PORT, InfoType, Option, OptionReplyType, ProtocolError

from ._uri import NbdUri, parse_uri

__all__ = ["ClientNegotiation", "NegotiationError", "ExportDetails", "Inquiry", "plan_connection"]

_REP = OptionReplyType


class NegotiationError(ProtocolError):
    """The handshake could not reach what was asked: ``reply_type`` is the server's NBD_REP_ERR_* answer (0
    when the refusal was ours, e.g. TLS required but not offered)."""

    def __init__(self, message: str, reply_type: int = 0) -> None:
        super().__init__(message)
        self.reply_type = reply_type


@dataclass(frozen=True)
class ExportDetails:
    """What opt mode learned of one export without selecting it: ``export`` is NBD_OPT_INFO's answer (size,
    flags, block sizes, canonical name, description), ``meta_contexts`` NBD_OPT_LIST_META_CONTEXT's, each None
    where it was not asked or the server refused (``errors`` then holds the refusal, as a NegotiationError).
    ``name`` is the name asked about; ``listed_description`` what NBD_OPT_LIST said of it ("" when not listed)."""

    name: str
    export: Export | None = None
    meta_contexts: tuple[str, ...] | None = None
    listed_description: str = ""
    errors: tuple[NegotiationError, ...] = ()

    def checked(self) -> ExportDetails:
        """Itself, or the first refusal raised."""
        if self.errors:
            raise self.errors[0]
        return self


@dataclass(frozen=True)
class Inquiry:
    """How an opt-mode handshake ended: every export asked about (in the server's listing order when listed),
    whether the exports were listed, and what a connection would have had (``tls``, ``structured_replies``,
    ``extended_headers``)."""

    exports: tuple[ExportDetails, ...]
    listed: bool
    tls: bool
    structured_replies: bool
    extended_headers: bool


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
        go: bool = True,
        info: bool = False,
        list_meta_contexts: Sequence[str] | None = None,
    ) -> None:
        """``block_sizes``: ask for NBD_INFO_BLOCK_SIZE with GO, which binds the client to the constraints the
        server sends (spec: "Size constraints"); without it a server that has constraints may refuse the
        export (NBD_REP_ERR_BLOCK_SIZE_REQD) or must fail unaligned requests cleanly. ``go=False`` (implied by
        ``list_exports``) is opt mode; ``info`` and ``list_meta_contexts`` say what it asks (module docstring).
        A listing alone ends in the ExportList, anything else asked in opt mode in an Inquiry."""
        self.export_name = export_name
        self.tls = tls or require_tls
        self.require_tls = require_tls
        self.structured = structured_replies
        self.extended = extended_headers and structured_replies
        self.meta_contexts = tuple(meta_contexts)
        self.list_exports = list_exports
        self.block_sizes = block_sizes
        self.go = go and not list_exports
        self.info = info
        self.list_meta_contexts = None if list_meta_contexts is None else tuple(list_meta_contexts)
        self.done = False
        self.result: HandshakeComplete | ExportList | Inquiry | None = None
        self.available_meta_contexts: tuple[str, ...] | None = None
        """GO mode: the answer to the ``list_meta_contexts`` query, None when not asked or refused."""
        self.tls_active = False
        self._fixed = True
        self._replies = False  # structured replies or extended headers agreed
        self._extended_agreed = False
        self._listing: ExportList | None = None
        self._failure: NegotiationError | None = None  # why the plan sent NBD_OPT_ABORT, raised once it is answered
        # Opt mode: the names still to ask about, and what was learned of each so far.
        self._asking: list[tuple[str, str]] = []
        self._details: list[ExportDetails] = []

    @property
    def _inquiring(self) -> bool:
        return not self.go and (self.info or self.list_meta_contexts is not None)

    def step(self, event: Event) -> Event | None:
        """The next option to send after ``event``, or None (nothing to send: wait for more, or done)."""
        if isinstance(event, ServerGreeting):
            if event.oldstyle:
                return None  # HandshakeComplete follows without any option
            self._fixed = bool(event.handshake_flags & 1)
            if not self._fixed:
                if self.require_tls:
                    raise NegotiationError("TLS is required, but the server does not speak fixed newstyle")
                if not self.go:
                    raise NegotiationError("this old server can only be connected to, not asked about its exports")
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
            if event.option == Option.LIST_META_CONTEXT:
                return self._listed_contexts(tuple(event.contexts.values()), None)
            return self._go()
        if isinstance(event, ExportInfo):
            self._learned(export=event.export)
            return self._list_contexts_of(self._asking[0][0])
        if isinstance(event, ExportList):
            self._listing = event
            if not self._inquiring:
                return OptionAbort()
            self._asking = [(e.name, e.description) for e in event.exports]
            return self._reply_format()
        if isinstance(event, ClientAborted):
            if self._failure is not None:
                raise self._failure
            self.done = True
            if self._inquiring:
                self.result = Inquiry(tuple(self._details), self.list_exports, self.tls_active, self._replies,
                                      self._extended_agreed)  # fmt: skip
            else:
                self.result = self._listing
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
        if not self.go:
            self._asking = [(self.export_name, "")]
        return self._reply_format()

    def _reply_format(self) -> Event:
        if self.extended:
            return OptionExtendedHeaders()
        if self.structured:
            return OptionStructuredReply()
        return self._after_reply_format()

    def _after_reply_format(self) -> Event:
        if not self.go:
            return self._next_inquiry()
        if self.list_meta_contexts is not None:
            return OptionListMetaContext(self.export_name, self.list_meta_contexts)
        return self._select_contexts()

    def _select_contexts(self) -> Event:
        if self.meta_contexts and self._replies:
            return OptionSetMetaContext(self.export_name, self.meta_contexts)
        return self._go()

    # --- Opt mode: one export after another ---------------------------------------------------------------

    def _next_inquiry(self) -> Event:
        if not self._asking:
            return OptionAbort()
        name, description = self._asking[0]
        self._details.append(ExportDetails(name, listed_description=description))
        if self.info:
            return OptionInfo(name, (InfoType.NAME, InfoType.DESCRIPTION, InfoType.BLOCK_SIZE))
        return self._list_contexts_of(name)

    def _list_contexts_of(self, name: str) -> Event:
        if self.list_meta_contexts is not None:
            return OptionListMetaContext(name, self.list_meta_contexts)
        return self._done_with_export()

    def _done_with_export(self) -> Event:
        del self._asking[0]
        return self._next_inquiry()

    def _learned(self, **facts: Any) -> None:
        current = self._details[-1]
        self._details[-1] = replace(current, **facts)

    def _listed_contexts(self, names: tuple[str, ...] | None, refusal: NegotiationError | None) -> Event:
        if self.go:
            self.available_meta_contexts = names
            return self._select_contexts()
        if refusal is not None:
            self._learned(errors=(*self._details[-1].errors, refusal))
        else:
            self._learned(meta_contexts=names)
        return self._done_with_export()

    def _asked(self) -> str:
        return self._asking[0][0] if self._asking else self.export_name

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
        # One export's answers may be refused (unknown, TLS only, ...) while the others' are not.
        if option == Option.LIST_META_CONTEXT:
            refusal = NegotiationError(f"meta contexts of {self._asked()!r} not listed{detail}", reply)
            return self._listed_contexts(None, refusal)
        if option == Option.INFO and not self.go:
            self._learned(errors=(NegotiationError(f"export {self._asked()!r} refused{detail}", reply),))
            return self._list_contexts_of(self._asking[0][0])
        if reply == _REP.ERR_TLS_REQD:
            return self._give_up(NegotiationError(f"the server requires TLS{detail}", reply))
        if option == Option.EXTENDED_HEADERS:
            return OptionStructuredReply() if self.structured else self._after_reply_format()
        if option == Option.STRUCTURED_REPLY:
            return self._after_reply_format()
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
    uri: str | None,
    options: Mapping[str, Any],
    *,
    list_exports: bool = False,
    go: bool = True,
    info: bool = False,
    list_meta_contexts: Sequence[str] | None = None,
) -> tuple[NbdUri, ClientNegotiation]:
    """Where a client connects and the handshake it follows, from a URI or from the ``host`` / ``port`` /
    ``socket_path`` / ``export_name`` of ``options`` (nbdproto.ConnectOptions): the part of connecting both
    client backends share (``list_exports``, ``go``, ``info``, ``list_meta_contexts``: as ClientNegotiation
    takes them). TLS is used when ``options["tls"]`` holds a context or the URI is nbds, and required
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
        tls=options.get("tls") is not None or options.get("tls_psk") is not None,
        require_tls=(target.tls or options.get("tls_psk") is not None) if require_tls is None else require_tls,
        structured_replies=options.get("structured_replies", True),
        extended_headers=options.get("extended_headers", True),
        meta_contexts=options.get("meta_contexts", (BASE_ALLOCATION,)),
        list_exports=list_exports,
        block_sizes=options.get("block_sizes", True),
        go=go,
        info=info,
        list_meta_contexts=() if go and options.get("discover_meta_contexts") else list_meta_contexts,
    )
    return target, plan
