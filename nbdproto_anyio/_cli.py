"""The ``nbdproto`` command line. Its commands (serve, info, list, copy) land with the CLI issue."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbdproto", description="Network Block Device tools built on nbdproto.")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0
