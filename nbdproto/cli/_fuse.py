"""``nbdproto fuse URI MOUNTPOINT``: an export as one regular file, MOUNTPOINT/disk, until Ctrl-C or SIGTERM
(or until the connection is lost), over ``nbdproto_threads.mount_export``. Needs ``pip install
'nbdproto[fuse]'`` (mfusepy) and libfuse 3 with fusermount3 (Debian: fuse3)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ._errors import UsageError, timeout_of
from ._query import add_connection_arguments, client_tls

__all__ = ["add_fuse_command", "fuse_command"]


def add_fuse_command(commands: Any) -> None:
    parser = commands.add_parser("fuse", help="show an NBD export as a file in a FUSE mount (like nbdfuse)")
    parser.add_argument("uri", metavar="URI", help="the export: nbd://host[:port]/export, nbd+unix:///?socket=...")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory; the file appears in it")
    parser.add_argument("--name", default="disk", help="the file's name in MOUNTPOINT (default: disk)")
    parser.add_argument("-r", "--read-only", action="store_true", help="no writes through the file")
    parser.add_argument("--connections", type=int, default=4, help="connections, when the server allows multi-conn")
    parser.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPTION",
                        help="a libfuse mount option (allow_other, ...); may be repeated; allow_other and "
                             "allow_root bring default_permissions: the file's mode holds for other users")  # fmt: skip
    add_connection_arguments(parser)


def _fuse_options(given: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for text in given:
        for option in filter(None, text.split(",")):
            key, equals, value = option.partition("=")
            options[key] = value if equals else True
    return options


def fuse_command(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.mountpoint):
        raise UsageError(f"{args.mountpoint}: not a directory")
    if "/" in args.name or args.name in ("", ".", ".."):
        raise UsageError(f"--name {args.name!r} must be a plain file name")
    try:
        from nbdproto_threads import mount_export
    except ImportError as exc:  # pragma: no cover - the extra is part of the test environment
        raise UsageError(f"FUSE needs the fuse extra: pip install 'nbdproto[fuse]' ({exc})") from None
    try:
        mount_export(
            args.uri,
            args.mountpoint,
            name=args.name,
            read_only=args.read_only,
            connections=max(1, args.connections),
            fuse_options=_fuse_options(args.fuse_options),
            tls=client_tls(args, args.uri),
            timeout=timeout_of(args),  # a request that takes longer: the file answers EIO
        )
    except ImportError as exc:
        raise UsageError(
            f"FUSE needs mfusepy and libfuse 3: pip install 'nbdproto[fuse]'; apt install fuse3 ({exc})"
        ) from None
    return 0
