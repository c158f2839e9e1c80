"""Option haggling as libnbd does it: which option follows which, and what each answer means to the handle.

A connection runs one ``OptionCall`` at a time: ``connect`` (the automatic part of the handshake after the
greeting) or one of option mode's calls (``go``, ``info``, ``list``, ...). A call is a list of steps, each of
which sends one option or is skipped when it does not apply; the engine's answer to the option decides the
next step. The order is libnbd's (libnbd(3) "CONTROLLING NEGOTIATION", generator/states-newstyle*.c):

    connect:  STARTTLS (set_tls) -> EXTENDED_HEADERS -> STRUCTURED_REPLY (unless extended headers were agreed)
              -> then, in option mode, pause; else SET_META_CONTEXT (with contexts to ask for) -> GO
    go, info: SET_META_CONTEXT (when structured replies are in use and contexts were added) -> GO / INFO
    non-fixed-newstyle servers: EXPORT_NAME only; a server that answers GO with UNSUP gets EXPORT_NAME too.

A refusal the automatic handshake cannot get past ends the connection the way libnbd ends it: NBD_OPT_ABORT,
then the handle is dead with the error (``fatal``). In option mode the call's error goes to its completion
callback and the handle is back to negotiating. The errors and their errnos are libnbd's.
"""

from __future__ import annotations

import enum
import errno
from collections import deque

import nbdproto.engine
from nbdproto.wire import InfoType, Option, OptionReplyType

from ._callbacks import Callback, call_with_error
from ._callbacks import call as invoke
from ._constants import HANDSHAKE_FLAG_FIXED_NEWSTYLE, TLS_DISABLE, TLS_REQUIRE
from ._errors import Failure
from ._settings import Facts, Settings

__all__ = ["Outcome", "OptionCall", "Negotiator"]

_REP = OptionReplyType
_GO_REFUSALS: dict[int, tuple[int, str]] = {
    _REP.ERR_POLICY: (0, "handshake: server policy prevents NBD_OPT_GO"),
    _REP.ERR_PLATFORM: (0, "handshake: server policy prevents NBD_OPT_GO"),
    _REP.ERR_INVALID: (errno.EINVAL, "handshake: server rejected NBD_OPT_GO as invalid"),
    _REP.ERR_TOO_BIG: (errno.EINVAL, "handshake: server rejected NBD_OPT_GO as invalid"),
    _REP.ERR_TLS_REQD: (errno.ENOTSUP, "handshake: server requires TLS encryption first"),
    _REP.ERR_SHUTDOWN: (errno.ESHUTDOWN, "handshake: server is shutting down"),
    _REP.ERR_BLOCK_SIZE_REQD: (errno.EINVAL, "handshake: server requires specific block sizes"),
}


class Outcome(enum.Enum):
    """What the connection must do after an answer was handled."""

    WAIT = "an option is out: wait for its answer"
    PAUSE = "option mode: wait for the script's next option call"
    READY = "transmission"
    TLS = "run the TLS handshake, then call tls_done()"
    CLOSE = "send what is queued, then close (NBD_OPT_ABORT went out)"


class OptionCall:
    """One run of option haggling: ``kind`` names the call, ``visitor`` is its per-answer callback (opt_list's
    ``list``, the context callbacks), ``completion`` the aio completion callback. Once ``done``, ``error``
    (an errno, 0 for success) and ``text`` say how it went; ``count`` is the number of answers the visitor saw
    and ``answer`` the yes/no of opt_starttls / opt_structured_reply / opt_extended_headers."""

    __slots__ = ("kind", "visitor", "completion", "queries", "steps", "done", "error", "text", "count", "answer")

    def __init__(
        self,
        kind: str,
        visitor: Callback | None = None,
        completion: Callback | None = None,
        queries: tuple[str, ...] | None = None,
    ) -> None:
        self.kind = kind
        self.visitor = visitor
        self.completion = completion
        self.queries = queries
        self.steps: deque[str] = deque()
        self.done = False
        self.error = 0
        self.text = ""
        self.count = 0
        self.answer = False


class Negotiator:
    """Chooses the options of one connection and records what their answers say in ``facts``."""

    def __init__(self, settings: Settings, facts: Facts, engine: nbdproto.engine.ClientConnection) -> None:
        self.settings = settings
        self.facts = facts
        self.engine = engine
        self.call: OptionCall | None = None
        self.fatal: Failure | None = None
        """Why the handshake is being abandoned (NBD_OPT_ABORT is out): the handle dies with it."""
        self._step = ""

    @property
    def fixed(self) -> bool:
        return bool((self.facts.handshake_flags or 0) & HANDSHAKE_FLAG_FIXED_NEWSTYLE)

    # --- Starting calls --------------------------------------------------------------------------------------

    def greeting(self, event: nbdproto.engine.ServerGreeting) -> Outcome:
        """The server's greeting: start the automatic part of the handshake."""
        facts, settings = self.facts, self.settings
        if event.oldstyle:
            facts.protocol, facts.handshake_flags = "oldstyle", 0
            return Outcome.WAIT  # HandshakeComplete follows at once
        facts.handshake_flags = event.handshake_flags & settings.handshake_flags
        facts.protocol = "newstyle-fixed" if self.fixed else "newstyle"
        call = OptionCall("connect")
        if not self.fixed:
            if settings.tls == TLS_REQUIRE:
                raise Failure(errno.ENOTSUP, "handshake: server is not using fixed newstyle, but handle TLS "
                                             "setting is 'require' (2)")  # fmt: skip
            call.steps.extend(["pause"] if settings.opt_mode else ["export_name"])
        else:
            call.steps.extend(["starttls", "extended_headers", "structured_reply"])
            call.steps.extend(["pause"] if settings.opt_mode else ["set_meta_context", "go"])
        return self.start(call)

    def start(self, call: OptionCall) -> Outcome:
        """Run ``call`` (its steps filled in here for option mode's calls)."""
        if not call.steps:
            call.steps.extend(_STEPS[call.kind] if self.fixed or call.kind != "go" else ("export_name",))
        self.call = call
        return self._advance()

    def tls_done(self) -> Outcome:
        """The TLS handshake the last answer asked for is complete."""
        self.facts.tls_negotiated = True
        assert self.call is not None
        self.call.answer = True
        return self._advance()

    # --- Steps ------------------------------------------------------------------------------------------------

    def _advance(self) -> Outcome:
        call = self.call
        assert call is not None
        while call.steps:
            step = call.steps.popleft()
            if step == "pause":
                return self._finish(0, "", Outcome.PAUSE)
            option = self._option_for(step, call)
            if option is not None:
                self._step = step
                self.engine.send(option)
                return Outcome.CLOSE if step == "abort" else Outcome.WAIT  # libnbd does not wait for ABORT's ACK
        return self._finish(call.error, call.text, Outcome.PAUSE)

    def _option_for(self, step: str, call: OptionCall) -> nbdproto.engine.Event | None:
        settings, facts = self.settings, self.facts
        if step == "starttls":
            if facts.tls_negotiated or (call.kind == "connect" and settings.tls == TLS_DISABLE):
                return None
            return nbdproto.engine.OptionStartTLS()
        if step == "extended_headers":
            wanted = call.kind != "connect" or (settings.request_extended_headers and not facts.extended_headers)
            return nbdproto.engine.OptionExtendedHeaders() if wanted else None
        if step == "structured_reply":
            wanted = call.kind != "connect" or (settings.request_structured_replies and not facts.structured_replies)
            return nbdproto.engine.OptionStructuredReply() if wanted else None
        if step == "set_meta_context":
            facts.forget_export()
            asked = facts.structured_replies and settings.request_meta_context and bool(settings.meta_contexts)
            if call.kind != "set_meta_context" and not asked:  # automatic: only where it can work and was asked
                return None
            queries = call.queries if call.queries is not None else tuple(settings.meta_contexts)
            return nbdproto.engine.OptionSetMetaContext(settings.export_name, queries)
        if step == "list_meta_context":
            queries = call.queries if call.queries is not None else tuple(settings.meta_contexts)
            return nbdproto.engine.OptionListMetaContext(settings.export_name, queries)
        if step in ("go", "info"):
            requests: list[InfoType] = [InfoType.BLOCK_SIZE] if settings.request_block_size else []
            if settings.full_info:
                requests += [InfoType.NAME, InfoType.DESCRIPTION]
            kind = nbdproto.engine.OptionGo if step == "go" else nbdproto.engine.OptionInfo
            return kind(settings.export_name, tuple(requests))
        if step == "export_name":
            return nbdproto.engine.OptionExportName(settings.export_name)
        if step == "list":
            return nbdproto.engine.OptionList()
        if step == "abort":
            return nbdproto.engine.OptionAbort()
        raise AssertionError(f"unknown handshake step {step!r}")

    def _finish(self, error: int, text: str, outcome: Outcome) -> Outcome:
        call = self.call
        assert call is not None
        call.done, call.error, call.text = True, error, text
        self.call = None
        if call.completion is not None:
            call_with_error(call.completion, error)
        return outcome

    def _give_up(self, failure: Failure) -> Outcome:
        """The automatic handshake cannot go on: NBD_OPT_ABORT, then the handle dies with ``failure``."""
        self.fatal = failure
        self.engine.send(nbdproto.engine.OptionAbort())
        self._step = "abort"
        return Outcome.CLOSE

    # --- Answers ----------------------------------------------------------------------------------------------

    def handle(self, event: nbdproto.engine.Event) -> Outcome:
        """One event of the handshake; what the connection must do next."""
        kind = type(event)
        if kind is nbdproto.engine.ServerGreeting:
            return self.greeting(event)  # type: ignore[arg-type]
        if kind is nbdproto.engine.HandshakeComplete:
            return self._selected(event)  # type: ignore[arg-type]
        call = self.call
        if call is None:
            raise Failure(0, f"handshake: unexpected {kind.__name__} while no option is pending")
        if kind is nbdproto.engine.StartTLS:
            return Outcome.TLS
        if kind is nbdproto.engine.OptionError:
            return self._refused(call, event)  # type: ignore[arg-type]
        if kind is nbdproto.engine.OptionAck:
            if self._step == "extended_headers":
                self.facts.extended_headers = self.facts.structured_replies = True
            elif self._step == "structured_reply":
                self.facts.structured_replies = True
            call.answer = True
        elif kind is nbdproto.engine.MetaContexts:
            self._contexts(call, event)  # type: ignore[arg-type]
        elif kind is nbdproto.engine.ExportInfo:
            self._learned(event.export)  # type: ignore[attr-defined]
        elif kind is nbdproto.engine.ExportList:
            for listing in event.exports:  # type: ignore[attr-defined]
                call.count += 1
                if call.visitor is not None:
                    invoke(call.visitor, listing.name, listing.description)
        elif kind is nbdproto.engine.ClientAborted:
            return Outcome.CLOSE
        return self._advance()

    def _contexts(self, call: OptionCall, event: nbdproto.engine.MetaContexts) -> None:
        if event.option == Option.SET_META_CONTEXT:
            self.facts.meta_contexts = dict(event.contexts)
            self.facts.meta_contexts_set = True
        for name in event.contexts.values():
            call.count += 1
            if call.visitor is not None:
                invoke(call.visitor, name)

    def _learned(self, export: nbdproto.engine.Export) -> None:
        facts = self.facts
        facts.export = export
        facts.canonical_name = export.name if self._named(export) else None
        facts.description = export.description or None

    def _named(self, export: nbdproto.engine.Export) -> bool:
        # The engine gives the requested name unless NBD_INFO_NAME came: a different name proves one came.
        return self.settings.full_info or export.name != self.settings.export_name

    def _selected(self, event: nbdproto.engine.HandshakeComplete) -> Outcome:
        facts = self.facts
        self._learned(event.export)
        facts.structured_replies = event.structured_replies or facts.structured_replies
        facts.extended_headers = event.extended_headers
        facts.meta_contexts = dict(event.meta_contexts)
        if self.call is None:  # oldstyle: no option was ever sent
            return Outcome.READY
        self._finish(0, "", Outcome.READY)
        return Outcome.READY

    def _refused(self, call: OptionCall, event: nbdproto.engine.OptionError) -> Outcome:
        step, reply = self._step, event.reply_type
        settings = self.settings
        if step == "starttls":
            if call.kind == "connect" and settings.tls == TLS_REQUIRE:
                return self._give_up(Failure(errno.ENOTSUP, "handshake: server refused TLS, but handle TLS setting "
                                                            "is 'require' (2)"))  # fmt: skip
            call.answer = False
        elif step in ("extended_headers", "structured_reply"):
            call.answer = False
        elif step == "set_meta_context":
            if call.kind == "set_meta_context":
                return self._finish(errno.ENOTSUP, "unexpected response, possibly the server does not support "
                                                   "setting contexts", Outcome.PAUSE)  # fmt: skip
        elif step == "list":
            return self._finish(errno.ENOTSUP, "unexpected response, possibly the server does not support listing "
                                               "exports", Outcome.PAUSE)  # fmt: skip
        elif step == "list_meta_context":
            return self._finish(errno.ENOTSUP, "unexpected response, possibly the server does not support listing "
                                               "contexts", Outcome.PAUSE)  # fmt: skip
        elif step in ("go", "info"):
            if step == "go" and reply == _REP.ERR_UNSUP:
                call.steps.appendleft("export_name")  # an old server that knows only NBD_OPT_EXPORT_NAME
                return self._advance()
            self.facts.forget_export()
            error, text = self._go_refusal(step, reply)
            if call.kind == "connect":
                return self._give_up(Failure(error, text))
            return self._finish(error or errno.ENOTSUP, text, Outcome.PAUSE)
        return self._advance()

    def _go_refusal(self, step: str, reply: int) -> tuple[int, str]:
        if reply == _REP.ERR_UNSUP and step == "info":
            return errno.ENOTSUP, "handshake: server lacks NBD_OPT_INFO support"
        if reply == _REP.ERR_UNKNOWN:
            return errno.ENOENT, f"handshake: server has no export named '{self.settings.export_name}'"
        return _GO_REFUSALS.get(reply, (0, f"handshake: unknown reply from NBD_OPT_GO: {reply:#x}"))


_STEPS: dict[str, tuple[str, ...]] = {
    "go": ("set_meta_context", "go"),
    "info": ("set_meta_context", "info"),
    "list": ("list",),
    "list_meta_context": ("list_meta_context",),
    "set_meta_context": ("set_meta_context",),
    "starttls": ("starttls",),
    "structured_reply": ("structured_reply",),
    "extended_headers": ("extended_headers",),
    "abort": ("abort",),
}
