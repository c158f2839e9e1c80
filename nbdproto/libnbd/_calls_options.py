"""Option mode's calls (libnbd(3) "CONTROLLING NEGOTIATION"): after ``set_opt_mode(True)`` a connect call
stops in the negotiating state, and the script sends the options it likes, one at a time. ``opt_go`` enters
transmission; a failed ``opt_go`` leaves the handle negotiating, to try another export; ``opt_abort`` ends the
connection. Each synchronous call is its aio twin and a wait until the option's answer is in; an aio call's
``completion(err)`` callback hears how it went (and is retired whatever it returns)."""

from __future__ import annotations

import errno

from ._api import Allowed, HandleBase, api
from ._callbacks import Callback, check_callable
from ._constants import HANDSHAKE_FLAG_FIXED_NEWSTYLE
from ._errors import Failure
from ._machine import Stage
from ._negotiation import OptionCall

__all__ = ["OptionCalls"]

_NEGOTIATING = Allowed.NEGOTIATING
_CONNECTING = (Stage.CONNECTING, Stage.HANDSHAKE, Stage.TLS)
_WORDS = {
    "go": "opt_go",
    "info": "opt_info",
    "list": "list",
    "list_meta_context": "list meta context",
    "set_meta_context": "set meta context",
}


class OptionCalls(HandleBase):
    """opt_* / aio_opt_* (see the module docstring)."""

    def _start(
        self,
        kind: str,
        visitor: Callback | None = None,
        completion: Callback | None = None,
        queries: tuple[str, ...] | None = None,
    ) -> OptionCall:
        facts = self._m.facts
        fixed = bool((facts.handshake_flags or 0) & HANDSHAKE_FLAG_FIXED_NEWSTYLE)
        if not fixed and kind not in ("go", "abort"):
            raise Failure(errno.ENOTSUP, "server is not using fixed newstyle protocol")
        if kind == "abort" and not fixed:
            raise self._m.die(Failure(errno.ENOTSUP, "handshake: server is not using fixed newstyle"))
        if kind in ("list_meta_context", "set_meta_context") and not facts.structured_replies:
            raise Failure(errno.ENOTSUP, "server lacks structured replies")
        if completion is not None:
            check_callable(completion, "completion")
        call = OptionCall(kind, visitor, completion, queries)
        self._m.start_option(call)
        return call

    def _run(self, kind: str, visitor: Callback | None = None, queries: tuple[str, ...] | None = None) -> OptionCall:
        call = self._start(kind, visitor, None, queries)
        machine = self._m
        machine.wait_until(lambda: machine.stage not in _CONNECTING)
        if call.done and call.error and kind in _WORDS:
            raise Failure(call.error, f"server replied with error to {_WORDS[kind]} request")
        if machine.stage is Stage.DEAD and machine.failure is not None:
            raise machine.failure
        return call

    # --- Synchronous ----------------------------------------------------------------------------------------

    @api(_NEGOTIATING)
    def opt_go(self) -> None:
        """Select the export (set_export_name's) and enter transmission; on refusal, stay negotiating."""
        self._run("go")

    @api(_NEGOTIATING)
    def opt_abort(self) -> None:
        """End the connection without selecting an export."""
        self._run("abort")

    @api(_NEGOTIATING)
    def opt_starttls(self) -> bool:
        """Ask for TLS now; whether the server agreed (libnbd 1.16)."""
        return self._run("starttls").answer

    @api(_NEGOTIATING)
    def opt_extended_headers(self) -> bool:
        """Ask for 64-bit headers; whether the server agreed (libnbd 1.20)."""
        return self._run("extended_headers").answer

    @api(_NEGOTIATING)
    def opt_structured_reply(self) -> bool:
        """Ask for structured replies; whether the server agreed (libnbd 1.16)."""
        return self._run("structured_reply").answer

    @api(_NEGOTIATING)
    def opt_list(self, list: Callback) -> int:  # the binding's parameter name
        """Ask for the server's exports: ``list(name, description)`` for each; returns how many."""
        check_callable(list, "list")
        return self._run("list", list).count

    @api(_NEGOTIATING)
    def opt_info(self) -> None:
        """Ask about the export (set_export_name's) without selecting it: get_size and the rest answer."""
        self._run("info")

    @api(_NEGOTIATING)
    def opt_list_meta_context(self, context: Callback) -> int:
        """Ask which of the added meta contexts (all, when none were added) the export has: ``context(name)``
        for each; returns how many."""
        check_callable(context, "context")
        return self._run("list_meta_context", context).count

    @api(_NEGOTIATING)
    def opt_list_meta_context_queries(self, queries: list[str], context: Callback) -> int:
        """opt_list_meta_context with ``queries`` instead of the added contexts (libnbd 1.16)."""
        check_callable(context, "context")
        return self._run("list_meta_context", context, tuple(_queries(queries))).count

    @api(_NEGOTIATING)
    def opt_set_meta_context(self, context: Callback) -> int:
        """Select the added meta contexts for the export: ``context(name)`` for each the server agreed to;
        returns how many (libnbd 1.16)."""
        check_callable(context, "context")
        return self._run("set_meta_context", context).count

    @api(_NEGOTIATING)
    def opt_set_meta_context_queries(self, queries: list[str], context: Callback) -> int:
        """opt_set_meta_context with ``queries`` instead of the added contexts (libnbd 1.16)."""
        check_callable(context, "context")
        return self._run("set_meta_context", context, tuple(_queries(queries))).count

    # --- Asynchronous ---------------------------------------------------------------------------------------

    @api(_NEGOTIATING)
    def aio_opt_go(self, completion: Callback | None = None) -> None:
        self._start("go", completion=completion)

    @api(_NEGOTIATING)
    def aio_opt_abort(self) -> None:
        self._start("abort")

    @api(_NEGOTIATING)
    def aio_opt_starttls(self, completion: Callback | None = None) -> None:
        self._start("starttls", completion=completion)

    @api(_NEGOTIATING)
    def aio_opt_extended_headers(self, completion: Callback | None = None) -> None:
        self._start("extended_headers", completion=completion)

    @api(_NEGOTIATING)
    def aio_opt_structured_reply(self, completion: Callback | None = None) -> None:
        self._start("structured_reply", completion=completion)

    @api(_NEGOTIATING)
    def aio_opt_list(self, list: Callback, completion: Callback | None = None) -> None:
        check_callable(list, "list")
        self._start("list", list, completion)

    @api(_NEGOTIATING)
    def aio_opt_info(self, completion: Callback | None = None) -> None:
        self._start("info", completion=completion)

    @api(_NEGOTIATING)
    def aio_opt_list_meta_context(self, context: Callback, completion: Callback | None = None) -> int:
        """Returns 0 (libnbd 1.14's binding returns an int here; the count is the synchronous call's)."""
        check_callable(context, "context")
        self._start("list_meta_context", context, completion)
        return 0

    @api(_NEGOTIATING)
    def aio_opt_list_meta_context_queries(
        self, queries: list[str], context: Callback, completion: Callback | None = None
    ) -> None:
        check_callable(context, "context")
        self._start("list_meta_context", context, completion, tuple(_queries(queries)))

    @api(_NEGOTIATING)
    def aio_opt_set_meta_context(self, context: Callback, completion: Callback | None = None) -> None:
        check_callable(context, "context")
        self._start("set_meta_context", context, completion)

    @api(_NEGOTIATING)
    def aio_opt_set_meta_context_queries(
        self, queries: list[str], context: Callback, completion: Callback | None = None
    ) -> None:
        check_callable(context, "context")
        self._start("set_meta_context", context, completion, tuple(_queries(queries)))


def _queries(queries: object) -> list[str]:
    if not isinstance(queries, list):
        raise TypeError("expecting a list parameter")
    return [str(query) for query in queries]
