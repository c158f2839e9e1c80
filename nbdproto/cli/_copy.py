"""``nbdproto copy SRC DST``: the command over ``nbdproto_threads.copy``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import nbdproto
from nbdproto_threads import CopyFailed, CopyProgress, copy

from ._command_args import starting_servers
from ._query import add_tls_arguments, client_tls

__all__ = ["add_copy_command", "copy_command"]


def add_copy_command(commands: Any) -> None:
    parser = commands.add_parser("copy", help="copy between NBD exports and files, sparse-aware and in parallel")
    parser.add_argument("src", metavar="SRC", help="NBD URI or file")
    parser.add_argument("dst", metavar="DST", help="NBD URI, file, or null: (discard)")
    parser.add_argument("--connections", type=int, default=4, help="connections at each NBD end (default 4)")
    parser.add_argument("--requests", type=int, default=2, help="requests in flight per connection (default 2)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    add_tls_arguments(parser)


def _is_uri(text: str) -> bool:
    return "://" in text


@starting_servers("src", "dst")
def copy_command(args: argparse.Namespace) -> int:
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    tls_uri = args.src if _is_uri(args.src) else args.dst if _is_uri(args.dst) else None
    tls = client_tls(args, tls_uri) if tls_uri else None
    bar = _ProgressBar() if show else None
    try:
        copy(
            args.src,
            args.dst,
            connections=args.connections,
            requests=args.requests,
            tls=tls,
            progress=bar.update if bar is not None else None,
        )
    except (CopyFailed, nbdproto.NBDError, OSError, ValueError, NotImplementedError, nbdproto.ProtocolError) as exc:
        print(f"nbdproto copy: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    return 0


class _ProgressBar:
    """A tqdm bar on stderr fed by the copy's progress (tqdm is imported only when shown: it costs a
    noticeable share of a short copy's start-up)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._shown = 0

    def update(self, progress: CopyProgress) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=progress.total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
        self._bar.update(progress.copied - self._shown)
        self._shown = progress.copied

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
