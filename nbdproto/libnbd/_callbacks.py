"""How the binding calls a script's callbacks, and what it makes of their results (libnbd(3) "CALLBACKS").

A callback is called with positional arguments only. Its return value counts when it is an int (a completion
callback returning 1 retires its command; a mid-command callback returning -1 fails it); anything else counts
as 0. An exception raised in a callback cannot travel through the C library: the binding prints it to stderr
and counts the call as -1, except a failed ``assert``, which it treats as fatal (the traceback, then abort:
libnbd's own tests rely on that). Callbacks that may fail a command get ``err``, a ``ctypes.c_int`` holding the
errno seen so far; the value the callback leaves in ``err.value`` is read back afterwards.
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["Callback", "call", "call_with_error", "check_callable"]

Callback = Callable[..., Any]


def check_callable(fn: object, name: str) -> None:
    """TypeError, as the binding raises it, when a required callback is not callable."""
    if not callable(fn):
        raise TypeError(f"callback parameter {name} is not callable")


def call(fn: Callback, *args: object) -> int:
    """Call ``fn(*args)`` by the binding's rules; the int it stands for (see the module docstring)."""
    try:
        result = fn(*args)
    except AssertionError:
        traceback.print_exc()
        sys.stderr.flush()
        os.abort()
    except Exception:
        traceback.print_exc(limit=None, chain=False)
        return -1
    return int(result) if isinstance(result, int) else 0  # True counts as 1, as PyLong_Check allows


def call_with_error(fn: Callback, error: int, *args: object) -> tuple[int, int]:
    """Call ``fn(*args, err)`` with ``err`` a ctypes.c_int holding ``error``; (what it returned, err.value)."""
    cell = ctypes.c_int(error)
    result = call(fn, *args, cell)
    return result, cell.value
