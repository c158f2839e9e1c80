"""How the command line reports a bad argument, and the argument parsers every command shares."""

from __future__ import annotations

import re

__all__ = ["UsageError", "parse_size", "size_argument"]

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
