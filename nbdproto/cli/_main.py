"""The parser of every command, and ``main``: which command runs, and how its failures are reported."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

import nbdproto

from ._copy import add_copy_command, copy_command
from ._query import add_query_commands, info, list_command

__all__ = ["main", "parse_size"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


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


class UsageError(Exception):
    """A bad argument: reported as one line and exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbdproto", description="Network Block Device tools built on nbdproto.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve a file, block device or in-memory disk over NBD",
        description="Serve FILE (or a sparse in-memory disk) over NBD until Ctrl-C or SIGTERM. With no FILE and "
        "no --memory, serves a 1 GiB in-memory disk on 127.0.0.1:10809.",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="log connections and errors")
    serve.add_argument("file", nargs="?", metavar="FILE", help="a regular file or block device to serve")
    serve.add_argument("--memory", metavar="SIZE", help="serve a sparse in-memory disk of SIZE (e.g. 1G, 512M)")
    serve.add_argument("--name", default="", help="export name (default: the empty default export)")
    serve.add_argument("--description", default="", help="export description shown by nbdinfo")
    serve.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=nbdproto.DEFAULT_PORT, help="TCP port (default 10809; 0: any)")
    serve.add_argument("--socket", metavar="PATH", help="listen on a unix socket instead of TCP")
    serve.add_argument("--backend", choices=("anyio", "threads"), default="anyio", help="server backend")
    serve.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "trio"),
        help="event loop of the anyio backend (default: uvloop if installed, else trio, else asyncio: the fastest "
        "measured with bench/bench_servers.sh, or tied for it)",
    )
    serve.add_argument("--tls", choices=("off", "optional", "require"), default="off", help="TLS mode")
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain) for TLS")
    serve.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    serve.add_argument("--tls-ca", metavar="PEM", help="CA to verify client certificates against")
    serve.add_argument("--tls-verify-client", action="store_true", help="require a client certificate")
    serve.add_argument(
        "--tls-psk",
        metavar="FILE",
        help="pre-shared keys (psktool's IDENTITY:HEXKEY lines) clients authenticate with (Python 3.13+); with "
        "--tls-cert too, clients without a key must present a certificate --tls-ca signed",
    )
    serve.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="serve another export (repeatable); FILE may be memory:SIZE",
    )
    add_query_commands(commands)
    add_copy_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from ._serve import serve  # the servers' imports are for serve alone (see _serve)

            return serve(args)
        if args.command == "info":
            return info(args)
        if args.command == "list":
            return list_command(args)
        if args.command == "copy":
            return copy_command(args)
    except UsageError as exc:
        print(f"nbdproto {args.command}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, NotImplementedError, nbdproto.ProtocolError) as exc:
        # A server that cannot be reached or refuses us, a bad key file, PSK on an old Python: one line.
        print(f"nbdproto {args.command}: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
