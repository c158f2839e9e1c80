"""What ``nbdproto serve SOURCE`` (and ``--export NAME=SOURCE``) can serve, and how each kind is opened.

A SOURCE is read in two steps: ``parse_source`` checks the text and says what it names, before anything is
served or listened on (a bad SOURCE is a one-line usage error); ``open_source`` then makes the device. Each
kind of source is one entry in ``_KINDS``: its prefix test and its opener, the device modules imported only by
the opener that needs them. An NBD URI (``NBD_SCHEMES``) re-exports another server's export (``NbdDevice``).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from nbdproto import BlockDevice, ProtocolError, parse_uri

from ._errors import UsageError, size_argument

__all__ = ["Source", "parse_source", "open_source", "NBD_SCHEMES"]

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE: its ``kind`` ("file", "memory", ...), the text that names it (a path or URI), and a
    size where the text gives one (memory:SIZE)."""

    kind: str
    target: str
    size: int = 0


def parse_source(text: str) -> Source:
    """What ``text`` names, or a UsageError saying why it names nothing we can serve."""
    if text.startswith("memory:"):
        return Source("memory", text, size_argument(text[len("memory:") :], "memory size"))
    url = _URL.match(text)
    if url:
        scheme = url.group(1)
        if scheme.lower() in NBD_SCHEMES:
            try:
                parse_uri(text)
            except ValueError as exc:
                raise UsageError(f"{text}: {exc}") from None
            return Source("nbd", text)
        raise UsageError(f"{text}: cannot serve a {scheme}:// source (use a file, memory:SIZE or an NBD URI)")
    if not os.path.exists(text):
        raise UsageError(f"{text}: no such file")
    return Source("file", text)


def open_source(source: Source, *, read_only: bool) -> BlockDevice:
    """The device that serves ``source`` (OSError when it cannot be opened)."""
    return _KINDS[source.kind](source, read_only)


def _open_memory(source: Source, read_only: bool) -> BlockDevice:
    from nbdproto.devices import MemoryDevice

    return MemoryDevice(source.size)


def _open_file(source: Source, read_only: bool) -> BlockDevice:
    from nbdproto.devices import FileDevice

    return FileDevice(source.target, read_only=read_only)


def _open_nbd(source: Source, read_only: bool) -> BlockDevice:
    from nbdproto.devices import NbdDevice

    try:
        return NbdDevice(source.target)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), source.target) from None
    except ProtocolError as exc:  # the server refused the export, or broke the handshake
        raise OSError(errno.EINVAL, str(exc), source.target) from None


_KINDS: dict[str, Callable[[Source, bool], BlockDevice]] = {
    "memory": _open_memory,
    "file": _open_file,
    "nbd": _open_nbd,
}
