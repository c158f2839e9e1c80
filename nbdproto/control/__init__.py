"""nbdproto.control: managing a running server through a control socket (bitmaps, checkpoints, status).

The NBD port carries data only; a server is managed through a unix socket of its own (``nbdproto serve
--control PATH``), mode 0600, that takes one JSON request a line and answers each with one JSON line:
``{"command": "checkpoint", "name": "b2", "since": "b1"}`` -> ``{"ok": true, "result": {...}}``. Errors are
answers, never a dropped connection or a crash. docs/howto/backup.md documents every command.

- ``_protocol``: the lines (parsing a request, shaping an answer, the error codes, the limits); no I/O.
- ``_commands``: the commands (``Controller``) over the exports' bitmap filters and the server's
  ``ExportTable``, where checkpoints' views are served as ``EXPORT@NAME``; no I/O.
- ``_listen``: the socket's file, made without following or replacing anything at the path.
- ``_server``: ``ControlServer``, blocking threads that serve the socket (no NBD backend involved).
- ``_client``: ``control_request``, one request from a script or ``nbdproto control``.
"""

from __future__ import annotations

from ._client import MAX_ANSWER, control_exchange, control_request
from ._commands import COMMANDS, ControlledExport, Controller
from ._listen import ControlSocket, listen_control
from ._protocol import (
    ERROR_CODES,
    MAX_LINE,
    PROTOCOL_VERSION,
    Arguments,
    ControlError,
    encode_answer,
    error_answer,
    ok_answer,
    parse_request,
)
from ._server import ControlServer

__all__ = [
    "Controller",
    "ControlledExport",
    "ControlServer",
    "ControlSocket",
    "listen_control",
    "control_request",
    "control_exchange",
    "ControlError",
    "Arguments",
    "parse_request",
    "ok_answer",
    "error_answer",
    "encode_answer",
    "COMMANDS",
    "ERROR_CODES",
    "MAX_LINE",
    "MAX_ANSWER",
    "PROTOCOL_VERSION",
]
