"""The control socket's lines: one JSON request in, one JSON answer out, and every way a request can be wrong.

A request is one line (UTF-8, ended by ``\\n``, at most MAX_LINE bytes) holding a JSON object::

    {"command": "checkpoint", "name": "b2", "since": "b1", "id": 7}

``command`` names what to do; the other members are its arguments (``_commands`` lists them), and ``id``, if
given (any JSON value), comes back in the answer, so that a client can match answers to requests. The answer
is one line too::

    {"ok": true, "result": {...}, "id": 7}
    {"ok": false, "error": {"code": "not-found", "message": "no bitmap named 'b1' on export 'disk'"}, "id": 7}

Errors are answers: a line that is not JSON, not an object, names no command or an unknown one, or gives a bad
argument gets an error answer and the connection goes on (only a line longer than MAX_LINE, a client too slow
to finish one, or one too many clients end a connection, after an answer that says so). ``ERROR_CODES`` lists
the codes. Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_LINE",
    "ERROR_CODES",
    "ControlError",
    "Arguments",
    "parse_request",
    "ok_answer",
    "error_answer",
    "encode_answer",
]

PROTOCOL_VERSION = 1
"""Said by ``status``; raised only when an answer changes in a way an old client would misread."""

MAX_LINE = 64 << 10
"""The longest request line taken (bytes, the newline aside): the longest real request is a few hundred."""

ERROR_CODES = {
    "bad-json": "the line is not UTF-8 JSON",
    "bad-request": "the JSON is not an object with a string 'command'",
    "unknown-command": "no such command",
    "bad-argument": "an argument is missing, unknown, of the wrong type, or not a valid value",
    "not-found": "no such export, bitmap or checkpoint view",
    "exists": "the name is taken",
    "refused": "the command cannot be done as asked (e.g. a read-only export keeps no bitmaps)",
    "timeout": "writes in flight did not finish in time for the instant the command needs; try again",
    "failed": "the server could not do it (a store or a scratch file failed: the message says which)",
    "too-long": "the line is longer than MAX_LINE bytes: the connection is closed",
    "too-slow": "the rest of the line did not arrive in time: the connection is closed",
    "busy": "too many control clients at once: the connection is closed",
    "internal": "a bug in the server (it is logged); the server goes on",
}
"""Every error code an answer may carry, and what it means."""


class ControlError(Exception):
    """A request that gets an error answer: ``code`` (one of ERROR_CODES) and a one-line ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_request(line: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The request object on ``line`` (its newline already taken off). ControlError ``bad-json`` or
    ``bad-request`` when it is not one, ``too-long`` past MAX_LINE."""
    if len(line) > MAX_LINE:
        raise ControlError("too-long", f"a request line holds at most {MAX_LINE} bytes, not {len(line)}")
    try:
        text = bytes(line).decode("utf-8")
        request = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError("bad-json", f"the request is not JSON: {exc}") from None
    except RecursionError:
        raise ControlError("bad-json", "the request is not JSON: nested too deeply") from None
    if not isinstance(request, dict):
        raise ControlError("bad-request", f"a request is a JSON object, not {type(request).__name__}")
    command = request.get("command")
    if not isinstance(command, str):
        raise ControlError("bad-request", "a request needs 'command', a string")
    return request


class Arguments:
    """A request's arguments as a command reads them: each taken once, checked for its type, and whatever is
    left at the end an error (a misspelt argument is never silently ignored)."""

    def __init__(self, request: Mapping[str, Any]) -> None:
        self._left = {key: value for key, value in request.items() if key not in ("command", "id")}
        self.command = str(request.get("command"))

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self._left.pop(name, None)
        if value is None:
            if required:
                raise ControlError("bad-argument", f"{self.command} needs {name!r}")
            return None
        if not isinstance(value, str):
            raise ControlError("bad-argument", f"{self.command}: {name!r} is a string, not {_kind(value)}")
        return value

    def name(self, name: str = "name") -> str:
        value = self.string(name, required=True)
        assert value is not None
        return value

    def integer(self, name: str) -> int | None:
        value = self._left.pop(name, None)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ControlError("bad-argument", f"{self.command}: {name!r} is a number of bytes, not {value!r}")
        return value

    def has(self, name: str) -> bool:
        """Whether the request gives ``name`` (and it has not been taken yet)."""
        return name in self._left

    def done(self) -> None:
        if self._left:
            unknown = sorted(self._left)
            raise ControlError("bad-argument", f"{self.command} takes no argument {unknown[0]!r}")


def _kind(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "an object", list: "a list", bool: "a boolean"}.get(type(value), type(value).__name__)
    )


def ok_answer(result: Any, request_id: Any = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": True, "result": result}
    if request_id is not None:
        answer["id"] = request_id
    return answer


def error_answer(code: str, message: str, request_id: Any = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": False, "error": {"code": code, "message": message}}
    if request_id is not None:
        answer["id"] = request_id
    return answer


def encode_answer(answer: Mapping[str, Any] | Sequence[Any]) -> bytes:
    """One answer as its line (ASCII JSON and a newline)."""
    return json.dumps(answer, separators=(",", ":")).encode("ascii") + b"\n"
