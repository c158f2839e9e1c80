"""What every call of the binding does around its own work, as libnbd's generated wrappers do: refuse a closed
handle, take the handle's lock, check the call is allowed in the handle's state, log ``enter:`` and ``leave:``
debug messages, and turn an internal ``Failure`` into ``Error`` named after the call (``nbd_pread: ...``).

The states are libnbd's public ones (libnbd(3) "HANDLES", the ``aio_is_*`` calls): created, connecting (the
handshake included), negotiating (option mode), connected (ready or processing), closed, dead. A call made in
a state it does not allow fails with ENOTCONN from a handle never connected, else EINVAL, and a message naming
the state and the states it needs, as libnbd words it.
"""

from __future__ import annotations

import enum
import errno
import functools
import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ._callbacks import call
from ._errors import ClosedHandle, Error, Failure, error_text
from ._machine import Machine, Stage
from ._settings import Settings

__all__ = ["Allowed", "Internals", "HandleBase", "api", "PUBLIC_STATE"]

F = TypeVar("F", bound=Callable[..., Any])


class Allowed(enum.Flag):
    """The public states a call may be made in."""

    CREATED = enum.auto()
    CONNECTING = enum.auto()
    NEGOTIATING = enum.auto()
    CONNECTED = enum.auto()
    CLOSED = enum.auto()
    DEAD = enum.auto()


PUBLIC_STATE = {
    Stage.CREATED: Allowed.CREATED,
    Stage.CONNECTING: Allowed.CONNECTING,
    Stage.HANDSHAKE: Allowed.CONNECTING,
    Stage.TLS: Allowed.CONNECTING,
    Stage.NEGOTIATING: Allowed.NEGOTIATING,
    Stage.READY: Allowed.CONNECTED,
    Stage.CLOSED: Allowed.CLOSED,
    Stage.DEAD: Allowed.DEAD,
}
_WORDS = {
    Allowed.CREATED: "newly created",
    Allowed.CONNECTING: "connecting",
    Allowed.NEGOTIATING: "negotiating",
    Allowed.CONNECTED: "connected with the server",
    Allowed.CLOSED: "shut down",
    Allowed.DEAD: "dead",
}


class Internals:
    """A handle's insides: its settings, its connection, its lock, and where its debug messages go."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.settings = Settings()
        self.context = "nbd_create"
        """The call being made (libnbd's error context): debug messages name it."""
        self.machine = Machine(self.settings, self.debug)

    def debug(self, message: str) -> None:
        """A debug message from inside the current call (dropped unless debugging is on)."""
        if self.settings.debug:
            self.emit(self.context, message)

    def emit(self, context: str, message: str) -> None:
        callback = self.settings.debug_callback
        if callback is not None:
            call(callback, context, message)
        else:
            print(f"libnbd: debug: {self.settings.handle_name}: {context}: {message}", file=sys.stderr)


class HandleBase:
    """What the call families (the ``_calls_*`` mixins) share: the handle's insides."""

    _h: Internals | None

    @property
    def _m(self) -> Machine:
        assert self._h is not None
        return self._h.machine

    @property
    def _s(self) -> Settings:
        assert self._h is not None
        return self._h.settings


def api(*allowed: Allowed, name: str | None = None) -> Callable[[F], F]:
    """Wrap a call of the binding (see the module docstring); ``allowed`` empty: any state."""

    def wrap(fn: F) -> F:
        context = "nbd_" + (name or fn.__name__)
        mask = functools.reduce(lambda a, b: a | b, allowed) if allowed else None
        needed = ", or ".join(words for state, words in _WORDS.items() if mask is not None and state & mask)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(self: HandleBase, *args: Any, **kwargs: Any) -> Any:
            inside = self._h
            if inside is None:
                raise ClosedHandle("libnbd: method called on closed handle")
            with inside.lock:
                outer, inside.context = inside.context, context
                debug = inside.settings.debug
                if debug:
                    inside.emit(context, "enter: " + _arguments(signature, self, args, kwargs))
                try:
                    if mask is not None:
                        machine = inside.machine
                        state = PUBLIC_STATE[machine.stage]
                        if not state & mask:
                            raise Failure(
                                errno.ENOTCONN if state is Allowed.CREATED else errno.EINVAL,
                                f"invalid state: {machine.state_name()}: the handle must be {needed}",
                            )
                    result = fn(self, *args, **kwargs)
                except Failure as failure:
                    message = error_text(context, failure.errnum, failure.text)
                    if inside.settings.debug:
                        inside.emit(context, f'leave: error="{message}"')
                    raise Error(message, failure.errnum) from None
                finally:
                    inside.context = outer
                if inside.settings.debug:  # on at the end of the call: set_debug(True) logs its own leave
                    inside.emit(context, f"leave: ret={_shown(result)}")
                return result

        return cast(F, wrapper)

    return wrap


def _arguments(signature: inspect.Signature, handle: object, args: Any, kwargs: Any) -> str:
    try:
        bound = signature.bind(handle, *args, **kwargs)
    except TypeError:
        return "<bad arguments>"
    bound.apply_defaults()
    shown = []
    for key, value in list(bound.arguments.items())[1:]:
        if key == "flags" or key == "mask":
            text = f"{value:#x}" if isinstance(value, int) else repr(value)
        elif callable(value):
            text = "<fun>"
        elif value is None:
            text = "NULL"
        else:
            text = _shown(value)
        shown.append(f"{key}={text}")
    return " ".join(shown)


def _shown(value: object) -> str:
    if value is None or isinstance(value, bytearray):  # what the C call returned: 0 (pread's data is in buf)
        return "0"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (bytes, bytearray, memoryview)) or hasattr(value, "to_buffer"):
        return "<buf>"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(item) for item in value) + "]"
    return repr(value)
