"""What ``nbdproto serve SOURCE`` (and ``--export NAME=SOURCE``) can serve, and how each kind is opened.

A SOURCE is read in two steps: ``parse_source`` checks the text and says what it names, before anything is
served or listened on (a bad SOURCE is a one-line usage error); ``open_source`` then makes the device. Each
kind of source is one entry in ``_KINDS``: its prefix test and its opener, the device modules imported only by
the opener that needs them. An NBD URI (``NBD_SCHEMES``) re-exports another server's export (``NbdDevice``).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from nbdproto import BlockDevice, ProtocolError, parse_uri

from ._errors import UsageError, size_argument
from ._serve_options import DEFAULT_REMOTE_TIMEOUT

__all__ = ["Source", "parse_source", "open_source", "apply_s3_options", "check_remote_timeout", "NBD_SCHEMES"]

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE: its ``kind`` ("file", "memory", ...), the text that names it (a path or URI), and a
    size where the text gives one (memory:SIZE) or an option does (--size for s3://); for s3:// also the
    --object-size, --s3-endpoint, --s3-write-back and --s3-lease options."""

    kind: str
    target: str
    size: int = 0
    object_size: int = 0
    endpoint: str | None = None
    write_back: int = 0
    lease: float | None = None


def parse_source(text: str) -> Source:
    """What ``text`` names, or a UsageError saying why it names nothing we can serve."""
    if text.startswith("memory:"):
        return Source("memory", text, size_argument(text[len("memory:") :], "memory size"))
    url = _URL.match(text)
    if url and url.group(1).lower() == "s3":
        bucket, _, key = text[len("s3://") :].partition("/")
        if not bucket or not key or key.startswith("/") or key.endswith("/") or "//" in key:
            raise UsageError(f"{text}: expected s3://BUCKET/KEY (KEY without leading, trailing or double '/')")
        return Source("s3", text)
    if url:
        scheme = url.group(1)
        if scheme.lower() in NBD_SCHEMES:
            try:
                parse_uri(text)
            except ValueError as exc:
                raise UsageError(f"{text}: {exc}") from None
            return Source("nbd", text)
        raise UsageError(f"{text}: cannot serve a {scheme}:// source (use a file, memory:SIZE, s3:// or an NBD URI)")
    if not os.path.exists(text):
        raise UsageError(f"{text}: no such file")
    return Source("file", text)


def open_source(source: Source, *, read_only: bool, remote_timeout: float = DEFAULT_REMOTE_TIMEOUT) -> BlockDevice:
    """The device that serves ``source`` (OSError naming it when it cannot be opened); ``remote_timeout`` bounds
    each request to a remote one (an NBD server, an object store)."""
    try:
        return _KINDS[source.kind](source, read_only, remote_timeout)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), source.target) from None
        raise


def check_remote_timeout(seconds: float) -> float:
    """--remote-timeout, or a UsageError: every wait on a remote has a limit, so 0 is not one."""
    if not seconds > 0:
        raise UsageError(f"--remote-timeout {seconds:g} must be positive")
    return seconds


def _open_memory(source: Source, read_only: bool, remote_timeout: float) -> BlockDevice:
    from nbdproto.devices import MemoryDevice

    return MemoryDevice(source.size)


def _open_file(source: Source, read_only: bool, remote_timeout: float) -> BlockDevice:
    from nbdproto.devices import FileDevice

    return FileDevice(source.target, read_only=read_only)


def apply_s3_options(sources: list[Source], args: argparse.Namespace) -> list[Source]:
    """The sources with serve's S3 options (--size, --object-size, --s3-endpoint, --s3-write-back, --s3-lease)
    applied to the s3:// ones; a UsageError for options that make no sense (they name no s3:// source, an
    object size without --size, a size that is not a multiple of the object size, a lease that is not
    positive or is asked of a single object)."""
    options = ("size", "object_size", "s3_endpoint", "s3_write_back", "s3_lease")
    given = [o for o in options if getattr(args, o, None) is not None]
    if not given:
        return sources
    if not any(s.kind == "s3" for s in sources):
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} is for s3:// sources only")
    size = size_argument(args.size, "--size") if args.size else 0
    object_size = size_argument(args.object_size, "--object-size") if args.object_size else 0
    if object_size and not size:
        raise UsageError("--object-size needs --size (without --size, s3://BUCKET/KEY is one read-only object)")
    if size:
        from nbdproto.devices import S3Device

        object_size = object_size or S3Device.DEFAULT_OBJECT_SIZE
        if object_size & (object_size - 1) or object_size > 64 << 20:
            raise UsageError(f"--object-size {args.object_size} must be a power of two of at most 64M")
        if size % object_size:
            raise UsageError(f"--size {args.size} must be a multiple of the object size ({object_size} bytes)")
    write_back = size_argument(args.s3_write_back, "--s3-write-back") if args.s3_write_back else 0
    if write_back and not size:
        raise UsageError("--s3-write-back needs --size (a single object is read-only)")
    lease = getattr(args, "s3_lease", None)
    if lease is not None and not size:
        raise UsageError("--s3-lease needs --size (a single object is read-only, and read-only images need none)")
    if lease is not None and not lease > 0:
        raise UsageError(f"--s3-lease {lease:g} must be positive")
    return [
        replace(s, size=size, object_size=object_size, endpoint=args.s3_endpoint, write_back=write_back, lease=lease)
        if s.kind == "s3"
        else s
        for s in sources
    ]


def _open_s3(source: Source, read_only: bool, remote_timeout: float) -> BlockDevice:
    from nbdproto.devices import S3Device, S3Settings

    bucket, _, key = source.target[len("s3://") :].partition("/")
    try:
        return S3Device(
            bucket,
            key,
            size=source.size or None,
            object_size=source.object_size or S3Device.DEFAULT_OBJECT_SIZE,
            read_only=read_only,
            write_back=source.write_back,
            settings=S3Settings.within(remote_timeout, endpoint=source.endpoint),
            lease=source.lease,
        )
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, source.target) from None
    except ValueError as exc:
        raise OSError(errno.EINVAL, str(exc), source.target) from None


def _open_nbd(source: Source, read_only: bool, remote_timeout: float) -> BlockDevice:
    from nbdproto.devices import NbdDevice

    try:
        return NbdDevice(source.target, timeout=remote_timeout)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), source.target) from None
    except ProtocolError as exc:  # the server refused the export, or broke the handshake
        raise OSError(errno.EINVAL, str(exc), source.target) from None


_KINDS: dict[str, Callable[[Source, bool, float], BlockDevice]] = {
    "memory": _open_memory,
    "file": _open_file,
    "s3": _open_s3,
    "nbd": _open_nbd,
}
