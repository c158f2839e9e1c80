"""The parser of every command, and ``main``: which command runs, and how its failures are reported."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import nbdproto

from ._command_args import bracketed
from ._control import add_control_command, control_command
from ._copy import add_copy_command, copy_command
from ._errors import UsageError
from ._fuse import add_fuse_command, fuse_command
from ._mirror import add_mirror_command, mirror_command
from ._query import add_query_commands, info, list_command
from ._serve_options import add_serve_command

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbdproto", description="Network Block Device tools built on nbdproto.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_command(commands)
    add_mirror_command(commands)
    add_query_commands(commands)
    add_copy_command(commands)
    add_fuse_command(commands)
    add_control_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(bracketed(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "serve":
            from ._serve import serve  # the servers' imports are for serve alone (see _serve)

            return serve(args)
        if args.command == "mirror":
            return mirror_command(args)
        if args.command == "info":
            return info(args)
        if args.command == "list":
            return list_command(args)
        if args.command == "copy":
            return copy_command(args)
        if args.command == "fuse":
            return fuse_command(args)
        if args.command == "control":
            return control_command(args)
    except UsageError as exc:
        print(f"nbdproto {args.command}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, NotImplementedError, nbdproto.ProtocolError) as exc:
        # A server that cannot be reached or refuses us, a bad key file, PSK on an old Python: one line.
        print(f"nbdproto {args.command}: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
