"""One request to a server's control socket, as ``nbdproto control`` and scripts send it."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import Any

from ._protocol import ControlError

__all__ = ["control_request", "MAX_ANSWER"]

MAX_ANSWER = 64 << 20
"""The longest answer taken (a status of many exports with many views is a few KiB)."""


def control_request(path: str | os.PathLike[str], request: Mapping[str, Any], timeout: float | None = 60.0) -> Any:
    """Send ``request`` (a JSON object: ``{"command": ..., ...}``) to the control socket at ``path`` and return
    the answer's ``result``. ControlError (its code and message) for an error answer, or ``bad-answer`` for a
    reply that is not one; OSError when the socket cannot be reached; TimeoutError when the answer does not
    come within ``timeout`` seconds (a checkpoint may wait up to a minute for writes in flight)."""
    answer = control_exchange(path, request, timeout)
    if answer.get("ok") is True:
        return answer.get("result")
    error = answer.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        raise ControlError(str(error.get("code", "failed")), error["message"])
    raise ControlError("bad-answer", f"the server's answer is not one: {answer!r:.200}")


def control_exchange(path: str | os.PathLike[str], request: Mapping[str, Any], timeout: float | None = 60.0) -> Any:
    """The whole answer object (``ok``, ``result`` or ``error``, ``id``) to ``request``."""
    line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(line)
        received = bytearray()
        while b"\n" not in received:
            data = sock.recv(1 << 16)
            if not data:
                break
            received += data
            if len(received) > MAX_ANSWER:
                raise ControlError("bad-answer", f"the server's answer is longer than {MAX_ANSWER} bytes")
    text = bytes(received).split(b"\n", 1)[0]
    try:
        answer = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        if not text:
            raise ControlError("bad-answer", "the server closed the connection without an answer") from None
        raise ControlError("bad-answer", f"the server's answer is not JSON: {text[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ControlError("bad-answer", f"the server's answer is not a JSON object: {text[:200]!r}")
    return answer
