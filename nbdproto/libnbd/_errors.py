"""``nbd.Error``, the one exception the binding's calls raise, and how a call's failure becomes one.

libnbd reports a failed call with a message and an errno; its Python binding raises ``Error(message, errno)``
where the message is the name of the C call, what went wrong, and the errno's text: ``nbd_pread: request out of
bounds: Invalid argument``. Scripts read ``e.string`` (the message), ``e.errno`` (the errno's name, ``"EINVAL"``,
or None) and ``e.errnum`` (the number, 0 when there is none). Inside the package a failure is raised as
``Failure(errnum, text)`` without the call's name; the API layer (``_api``) adds it, as libnbd's per-call error
context does, so the name is the call the script made even when the failure happened deep in a loop it runs.
"""

from __future__ import annotations

import errno as _errno_names
import os

__all__ = ["Error", "ClosedHandle", "Failure", "error_text"]


class Error(Exception):
    """A libnbd call failed: ``string`` says what happened, ``errnum`` is the errno (0 if there is none) and
    ``errno`` its symbolic name (``"ENOENT"``), or None when it has none. ``str()`` gives both."""

    @property
    def string(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def errnum(self) -> int:
        return int(self.args[1]) if len(self.args) > 1 else 0

    @property
    def errno(self) -> str | None:  # the binding's name: a string, not an int
        return _errno_names.errorcode.get(self.errnum)

    def __str__(self) -> str:
        name = self.errno
        return f"{self.string} ({name})" if name else self.string


class ClosedHandle(ValueError):
    """A method was called on a handle after its ``close()`` (newer bindings raise this too)."""


class Failure(Exception):
    """Raised inside the package: a call fails with ``errnum`` (0: none) and ``text``; the API layer turns it
    into Error with the call's name."""

    def __init__(self, errnum: int, text: str) -> None:
        super().__init__(text)
        self.errnum = errnum
        self.text = text


def error_text(context: str, errnum: int, text: str) -> str:
    """libnbd's message layout: ``context: text``, then ``: strerror`` when there is an errno."""
    message = f"{context}: {text}"
    return f"{message}: {os.strerror(errnum)}" if errnum else message
