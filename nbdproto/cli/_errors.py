"""How the command line reports a bad argument, and the argument parsers every command shares."""

from __future__ import annotations

import argparse
import re

__all__ = ["UsageError", "parse_size", "size_argument", "add_timeout_argument", "timeout_of", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 30.0
"""Seconds a client command waits for a server that stopped answering (the connect, the handshake, a reply)."""

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


class UsageError(Exception):
    """A bad argument: reported as one line and exit status 2, before anything is served or copied."""


def parse_size(text: str) -> int:
    """Sizes as qemu and nbdkit write them: 512, 64K, 1M, 1G, 1.5T (binary units); ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 512, 64K, 1M, 1.5G, 2T)")
    number, unit = match.groups()
    size = float(number) * _UNITS[unit.upper()]
    if size != int(size):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(size)


def size_argument(text: str, what: str = "size") -> int:
    """A positive size from the command line, or a UsageError naming ``what``."""
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    if size <= 0:
        raise UsageError(f"{what} {text!r} must be positive")
    return size


def add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """``--timeout SECONDS``, for the commands that talk to a server."""
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on a server that makes no progress for this long: the connect, the handshake, a reply "
        f"(default {DEFAULT_TIMEOUT:g}; 0: wait forever)",
    )


def timeout_of(args: argparse.Namespace) -> float | None:
    """The --timeout as a client library takes it (None: no limit)."""
    seconds: float = args.timeout
    if seconds < 0:
        raise UsageError(f"--timeout {seconds:g} must not be negative")
    return seconds or None
