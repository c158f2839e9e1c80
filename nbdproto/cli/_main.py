"""The parser of every command, and ``main``: which command runs; ``_errors.exit_status`` says how it ended."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import nbdproto

from ._command_args import bracketed
from ._control import add_control_command, control_command
from ._copy import add_copy_command, copy_command
from ._errors import CommandParser, UsageError, exit_status
from ._fuse import add_fuse_command, fuse_command
from ._mirror import add_mirror_command, mirror_command
from ._query import add_query_commands, info, list_command
from ._serve_options import add_serve_command

__all__ = ["main", "build_parser", "add_version_argument", "COMMANDS"]

COMMANDS = ("serve", "mirror", "info", "list", "copy", "fuse", "control")


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """``-V`` / ``--version``: the package's version, as every libnbd and nbdkit tool has it."""
    parser.add_argument("-V", "--version", action="version", version=f"nbdproto {nbdproto.__version__}")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="nbdproto", description="Network Block Device tools built on nbdproto.")
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_command(commands)
    add_mirror_command(commands)
    add_query_commands(commands)
    add_copy_command(commands)
    add_fuse_command(commands)
    add_control_command(commands)
    for command in commands.choices.values():
        add_version_argument(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status (see ``_errors`` for failures)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in arguments if not word.startswith("-")), None)
    prog = f"nbdproto {command}" if command in COMMANDS else "nbdproto"
    try:
        args = build_parser().parse_args(bracketed(arguments))
        status = _run(args)
        sys.stdout.flush()  # here, where a closed pipe is still ours to report, not at the interpreter's exit
        return status
    except SystemExit:
        raise
    except BaseException as exc:
        if isinstance(exc, UsageError) and exc.prog == "nbdproto":
            exc.prog = None  # argparse's top level speaks of the command's own arguments ("unrecognized ...")
        return exit_status(exc, prog)


def _run(args: argparse.Namespace) -> int:
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
    raise UsageError(f"unknown command {args.command}")
