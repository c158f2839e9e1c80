"""What every call of the binding does around its own work, as libnbd's generated wrappers do: refuse a closed
handle, take the handle's lock, check the call is allowed in the handle's state, log ``enter:`` and ``leave:``
debug messages, and turn an internal ``Failure`` into ``Error`` named after the call (``nbd_pread: ...``).

The states are libnbd's public ones (libnbd(3) "HANDLES", the ``aio_is_*`` calls): created, connecting (the
handshake included), negotiating (option mode), connected (ready or processing), closed, dead. A call made in
a state it does not allow fails with ENOTCONN from a handle never connected, else EINVAL, and a message naming
the state and the states it needs, as libnbd words it.
"""

from __future__ import annotations

import errno
import functools
import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ._callbacks import call
from ._errors import ClosedHandle, Error, Failure, error_text
from ._machine import Machine, Public
from ._settings import Settings

__all__ = ["Allowed", "Internals", "HandleBase", "api"]

F = TypeVar("F", bound=Callable[..., Any])


Allowed = Public
"""The public states a call may be made in (``api(Allowed.CREATED, ...)``)."""

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
    """What the call families (the ``_calls_*`` mixins) share: the handle's insides (``_h``, None once
    closed), and its connection and settings (``_m``, ``_s``: read by every call, so plain attributes)."""

    _h: Internals | None
    _m: Machine
    _s: Settings


def api(*allowed: int, name: str | None = None) -> Callable[[F], F]:
    """Wrap a call of the binding (see the module docstring); ``allowed`` (Allowed bits) empty: any state."""

    def wrap(fn: F) -> F:
        context = "nbd_" + (name or fn.__name__)
        mask = functools.reduce(lambda a, b: a | b, allowed) if allowed else 0
        needed = ", or ".join(words for state, words in _WORDS.items() if state & mask)
        signature = inspect.signature(fn)

        def refused(machine: Machine) -> Failure:
            created = machine.stage.public == Allowed.CREATED
            return Failure(
                errno.ENOTCONN if created else errno.EINVAL,
                f"invalid state: {machine.state_name()}: the handle must be {needed}",
            )

        @functools.wraps(fn)
        def wrapper(self: HandleBase, *args: Any, **kwargs: Any) -> Any:
            inside = self._h
            if inside is None:
                raise ClosedHandle("libnbd: method called on closed handle")
            with inside.lock:
                if inside.settings.debug:
                    return _logged(inside, context, signature, fn, self, args, kwargs, mask, refused)
                try:
                    if mask and not inside.machine.stage.public & mask:
                        raise refused(inside.machine)
                    return fn(self, *args, **kwargs)
                except Failure as failure:
                    raise Error(error_text(context, failure.errnum, failure.text), failure.errnum) from None

        return cast(F, wrapper)

    return wrap


def _logged(
    inside: Internals,
    context: str,
    signature: inspect.Signature,
    fn: Callable[..., Any],
    handle: HandleBase,
    args: Any,
    kwargs: Any,
    mask: int,
    refused: Callable[[Machine], Failure],
) -> Any:
    """A call made with debugging on: ``enter:`` and ``leave:`` messages around it, and its name given to the
    messages from inside (libnbd's error context)."""
    outer, inside.context = inside.context, context
    inside.emit(context, "enter: " + _arguments(signature, handle, args, kwargs))
    try:
        if mask and not inside.machine.stage.public & mask:
            raise refused(inside.machine)
        result = fn(handle, *args, **kwargs)
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
