"""``nbdproto control PATH COMMAND [ARGS]``, and the control socket of ``nbdproto serve --control PATH``.

The client sends one request to a running server's control socket (``nbdproto.control``) and prints the
answer's result as JSON on standard output: exit status 0. An error answer (or a socket that cannot be
reached) is one line on standard error, exit status 1, as a bad command line is (every command's rule:
``nbdproto.cli._errors``).

On the serving side, ``start_control`` puts the exports in an ``ExportTable`` (so that checkpoints' views can
be served as ``EXPORT@NAME``) and serves their bitmap filters on the socket until the server stops.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._errors import UsageError, parse_size

if TYPE_CHECKING:
    from nbdproto import BlockDevice
    from nbdproto.control import ControlServer
    from nbdproto.serving import ExportTable

__all__ = ["add_control_command", "control_command", "add_control_arguments", "start_control"]

DEFAULT_CONTROL_TIMEOUT = 90.0
"""Seconds the client waits for an answer: a checkpoint may wait up to a minute for writes in flight."""


def add_control_command(commands: Any) -> None:
    parser = commands.add_parser(
        "control",
        help="manage a running server through its control socket: bitmaps, checkpoints, status",
        description="Send one request to the control socket of a server started with --control PATH and print "
        "its answer as JSON. Exit status 0 on success, 1 with the error (or a bad command line) on stderr. "
        "See docs/howto/backup.md.",
    )
    parser.add_argument("path", metavar="PATH", help="the server's control socket (serve --control PATH)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--export", metavar="NAME", help="the export (needed when the server has several)")
    common.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CONTROL_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the answer (default {DEFAULT_CONTROL_TIMEOUT:g}; 0: forever)",
    )
    which = parser.add_subparsers(dest="control_command", metavar="COMMAND", required=True)
    add = which.add_parser("bitmap-add", parents=[common], help="start a bitmap, every granule clean")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--granularity", metavar="SIZE", help="bytes per bit: a power of two from 4K (default 64K)")
    for command, text in (
        ("bitmap-remove", "stop and forget a bitmap"),
        ("bitmap-clear", "make every granule of a bitmap clean again"),
        ("release", "end a checkpoint's view and free what it kept; its bitmap goes on"),
    ):
        which.add_parser(command, parents=[common], help=text).add_argument("name", metavar="NAME")
    which.add_parser("bitmap-list", parents=[common], help="every bitmap: name, granularity, dirty bytes")
    checkpoint = which.add_parser(
        "checkpoint",
        parents=[common],
        help="at one instant: start bitmap NAME, freeze OLD and a view of the export served as EXPORT@NAME",
    )
    checkpoint.add_argument("name", metavar="NAME")
    checkpoint.add_argument("--since", metavar="OLD", help="offer bitmap OLD, frozen, on the view")
    checkpoint.add_argument("--granularity", metavar="SIZE", help="bitmap NAME's (default: OLD's, else 64K)")
    checkpoint.add_argument("--limit", metavar="SIZE", help="the most the view keeps aside before it breaks")
    which.add_parser("status", parents=[common], help="the exports, their bitmaps and views")


def _request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"command": args.control_command}
    if getattr(args, "name", None) is not None:
        request["name"] = args.name
    if args.export is not None:
        request["export"] = args.export
    for option in ("granularity", "limit"):
        text = getattr(args, option, None)
        if text is not None:
            try:
                request[option] = parse_size(text)
            except ValueError as exc:
                raise UsageError(f"--{option}: {exc}") from None
    if getattr(args, "since", None) is not None:
        request["since"] = args.since
    return request


def control_command(args: argparse.Namespace) -> int:
    from nbdproto.control import ControlError, control_request

    if args.timeout < 0:
        raise UsageError(f"--timeout {args.timeout:g} must not be negative")
    request = _request(args)
    try:
        result = control_request(args.path, request, timeout=args.timeout or None)
    except ControlError as exc:
        print(f"nbdproto control: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"nbdproto control: no answer from {args.path} within {args.timeout:g} s", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nbdproto control: cannot reach {args.path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


# --- The serving side --------------------------------------------------------------------------------------


def add_control_arguments(group: Any) -> None:
    """``--control``, ``--checkpoint-limit`` and ``--scratch-dir``, in the bitmaps' group of serve and mirror."""
    group.add_argument(
        "--control",
        metavar="PATH",
        help="serve a control socket at PATH (a unix socket, mode 0600; nothing at PATH is followed or replaced) "
        "for 'nbdproto control PATH ...': bitmaps, checkpoints and their views (EXPORT@NAME), status. Every "
        "writable export then keeps bitmaps (none at first)",
    )
    group.add_argument(
        "--checkpoint-limit",
        metavar="SIZE",
        help="the most a checkpoint's view keeps aside (copy-before-write) before it breaks (default: the "
        "export's size, all of it)",
    )
    group.add_argument(
        "--scratch-dir",
        metavar="DIR",
        help="where views of exports over 64M keep their copies, in a scratch file (default: beside an image "
        "file, else the temporary directory; S3 images keep them as objects)",
    )


def start_control(
    args: argparse.Namespace,
    exports: Sequence[tuple[str, BlockDevice]],
    table: ExportTable,
    uri_for: Callable[[str], str],
) -> ControlServer | None:
    """The control socket ``--control`` asks for, serving ``exports`` (their bitmap filters) and adding views
    to ``table``; None without ``--control``. UsageError when the socket cannot be made."""
    path = getattr(args, "control", None)
    if path is None:
        return None
    from nbdproto.control import ControlledExport, Controller, ControlServer, listen_control
    from nbdproto.devices.bitmaps import DirtyBitmapFilter

    limit = _checkpoint_limit(args)
    controlled = [
        ControlledExport(name, device if isinstance(device, DirtyBitmapFilter) else None, device.size)
        for name, device in exports
    ]
    try:
        listening = listen_control(path)
    except OSError as exc:
        raise UsageError(f"--control {path}: {exc.strerror or exc}") from None
    server = ControlServer(listening, Controller(controlled, table, uri_for=uri_for, default_limit=limit))
    server.start()
    return server


def _checkpoint_limit(args: argparse.Namespace) -> int | None:
    text = getattr(args, "checkpoint_limit", None)
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"--checkpoint-limit: {exc}") from None
