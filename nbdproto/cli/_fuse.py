"""``nbdproto fuse``: an export as one regular file in a FUSE mount, until Ctrl-C or SIGTERM (or until the
connection is lost), over ``nbdproto_threads.mount_export``. Needs ``pip install 'nbdproto[fuse]'`` (mfusepy)
and libfuse 3 with fusermount3 (Debian: fuse3).

Both argument orders work, nbdfuse's and ours, since a URI (or ``[ CMD ]``) is unmistakable:

    nbdproto fuse MOUNTPOINT[/FILENAME] URI       nbdfuse's: the file is MOUNTPOINT/FILENAME, by default
    nbdproto fuse URI MOUNTPOINT                    MOUNTPOINT/nbd as in nbdfuse (or --name FILENAME)

In nbdfuse's order, a MOUNTPOINT that is not a directory is MOUNTPOINT/FILENAME, as nbdfuse reads it; in ours
MOUNTPOINT must be a directory.
    nbdproto fuse MOUNTPOINT -- [ CMD ARGS ... ]    a server started for the mount (socket activation)
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from nbdproto.client import looks_like_uri

from ._command_args import command_of, starting_servers
from ._errors import UsageError, count_argument, timeout_of
from ._query import add_connection_arguments, client_tls

__all__ = ["add_fuse_command", "fuse_command", "DEFAULT_NAME"]

DEFAULT_NAME = "nbd"
"""The file's name in the mount when none is given, as nbdfuse names it."""


def add_fuse_command(commands: Any) -> None:
    parser = commands.add_parser(
        "fuse",
        help="show an NBD export as a file in a FUSE mount (like nbdfuse)",
        description="Mount the export at URI as the file MOUNTPOINT/FILENAME (default MOUNTPOINT/nbd) until "
        "Ctrl-C or SIGTERM. The two may come in either order: nbdfuse's (MOUNTPOINT[/FILENAME] URI) or URI "
        "MOUNTPOINT.",
    )
    parser.add_argument("first", metavar="MOUNTPOINT[/FILENAME]", help="an empty directory, or the URI")
    parser.add_argument(
        "second", metavar="URI", help="nbd://host[:port]/export, nbd+unix:///?socket=..., or -- [ CMD ]"
    )
    parser.add_argument("--name", help=f"the file's name in MOUNTPOINT (default: {DEFAULT_NAME})")
    parser.add_argument("-r", "--read-only", action="store_true", help="no writes through the file")
    parser.add_argument("-C", "--connections", type=count_argument(1), default=4, metavar="N",
                        help="connections, when the server allows multi-conn (default 4)")  # fmt: skip
    parser.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPTION",
                        help="a libfuse mount option (allow_other, ...); may be repeated; allow_other and "
                             "allow_root bring default_permissions: the file's mode holds for other users")  # fmt: skip
    add_connection_arguments(parser)


def _names_an_export(text: str) -> bool:
    return command_of(text) is not None or looks_like_uri(text)


def _arguments(args: argparse.Namespace) -> None:
    """Sets ``args.uri``, ``args.mountpoint`` and ``args.name`` from the two positionals, in either order."""
    if _names_an_export(args.first) and not _names_an_export(args.second):
        args.uri, mountpoint, nbdfuse_order = args.first, args.second, False
    elif _names_an_export(args.second):
        args.uri, mountpoint, nbdfuse_order = args.second, args.first, True
    else:
        raise UsageError(f"neither {args.first!r} nor {args.second!r} is an NBD URI (nbd://..., nbd+unix:///...) "
                         "or -- [ CMD ]: give MOUNTPOINT[/FILENAME] URI")  # fmt: skip
    if os.path.isdir(mountpoint):
        args.mountpoint, name = mountpoint, args.name or DEFAULT_NAME
    elif not nbdfuse_order:  # URI MOUNTPOINT: the directory, never its parent (a typo must not mount there)
        raise UsageError(f"{mountpoint}: not a directory (MOUNTPOINT must be an existing, empty directory)")
    else:
        parent, filename = os.path.split(mountpoint.rstrip("/") if mountpoint != "/" else mountpoint)
        if not filename or not os.path.isdir(parent or "."):
            raise UsageError(f"{mountpoint}: not a directory (MOUNTPOINT must be an existing, empty directory)")
        if args.name is not None:
            raise UsageError(f"{mountpoint} names the file already (MOUNTPOINT/FILENAME): --name {args.name} too")
        args.mountpoint, name = parent or ".", filename
    if "/" in name or name in ("", ".", ".."):
        raise UsageError(f"the file name {name!r} must be a plain file name")
    args.name = name


def fuse_command(args: argparse.Namespace) -> int:
    _arguments(args)
    return _mount(args)


@starting_servers("uri")
def _mount(args: argparse.Namespace) -> int:
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
            connections=args.connections,
            fuse_options=_fuse_options(args.fuse_options),
            tls=client_tls(args, args.uri),
            timeout=timeout_of(args),  # a request that takes longer: the file answers EIO
        )
    except ImportError as exc:
        raise UsageError(
            f"FUSE needs mfusepy and libfuse 3: pip install 'nbdproto[fuse]'; apt install fuse3 ({exc})"
        ) from None
    return 0


def _fuse_options(given: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for text in given:
        for option in filter(None, text.split(",")):
            key, equals, value = option.partition("=")
            options[key] = value if equals else True
    return options
