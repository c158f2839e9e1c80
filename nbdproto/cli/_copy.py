"""``nbdproto copy SRC DST``: the command over ``nbdproto_threads.copy``, with nbdcopy's options.

``--progress=FD`` writes nbdcopy's machine-readable progress to that descriptor: a line ``N/100`` each time the
whole percentage done grows, the last one ``100/100``. ``--progress`` alone draws a bar on standard error
(the default when standard error is a terminal); ``--no-progress`` draws nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import nbdproto
from nbdproto_threads import CopyFailed, CopyProgress, copy

from ._command_args import starting_servers
from ._errors import UsageError, size_argument, timeout_of
from ._query import add_connection_arguments, client_tls

__all__ = ["add_copy_command", "copy_command"]

_BAR, _AUTO = "bar", "auto"


def add_copy_command(commands: Any) -> None:
    parser = commands.add_parser("copy", help="copy between NBD exports and files, sparse-aware and in parallel")
    parser.add_argument("src", metavar="SRC", nargs="?", help="NBD URI, file, or - (standard input)")
    parser.add_argument("dst", metavar="DST", nargs="?", help="NBD URI, file, - (standard output), or null:")
    parser.add_argument("--connections", type=int, default=4, help="connections at each NBD end (default 4)")
    parser.add_argument("--requests", type=int, default=2, help="requests in flight per connection (default 2)")
    parser.add_argument("--request-size", metavar="SIZE", help="bytes per request (default 1M; e.g. 256K, 4M)")
    parser.add_argument(
        "--destination-is-zero",
        "--target-is-zero",
        action="store_true",
        help="the destination already reads as zeros: zero runs are not written at all",
    )
    parser.add_argument(
        "--allocated", action="store_true", help="write zero runs as data, so the destination is fully allocated"
    )
    parser.add_argument("--flush", action="store_true", help="make the destination durable before exiting")
    parser.add_argument(
        "--only-dirty",
        metavar="NAME",
        help="copy only the regions SRC (an NBD export) reports dirty in qemu:dirty-bitmap:NAME onto DST, the "
        "previous backup (an existing image): an incremental backup (docs/howto/backup.md)",
    )
    parser.add_argument(
        "--progress",
        nargs="?",
        const=_BAR,
        default=_AUTO,
        metavar="FD",
        help="a progress bar on stderr; --progress=FD: 'N/100' lines on descriptor FD instead",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=None, help="no progress")
    add_connection_arguments(parser)


def _is_uri(text: str) -> bool:
    return "://" in text


def _ends(args: argparse.Namespace) -> tuple[str, str]:
    """SRC and DST. ``--progress`` takes an optional FD, so ``--progress SRC DST`` gives SRC to it: taken
    back (an FD is spelt ``--progress=FD``, as nbdcopy has it)."""
    if args.progress not in (None, _BAR, _AUTO) and not args.progress.isdigit():
        args.src, args.dst, args.progress = args.progress, args.src, _BAR
    if args.src is None or args.dst is None:
        raise UsageError("SRC and DST are needed")
    if args.allocated and args.destination_is_zero:
        raise UsageError("--allocated and --destination-is-zero contradict each other")
    if args.only_dirty is not None and args.destination_is_zero:
        raise UsageError("--only-dirty copies onto the last backup, which --destination-is-zero says is all zeros")
    return args.src, args.dst


@starting_servers("src", "dst", "progress")  # "--progress SRC DST" is taken back by _ends
def copy_command(args: argparse.Namespace) -> int:
    src, dst = _ends(args)
    request_size = size_argument(args.request_size, "--request-size") if args.request_size else None
    tls_uri = src if _is_uri(src) else dst if _is_uri(dst) else None
    tls = client_tls(args, tls_uri) if tls_uri else None
    progress: _ProgressBar | _ProgressLines | None = None
    if args.progress == _BAR or (args.progress == _AUTO and sys.stderr.isatty()):
        progress = _ProgressBar()
    elif args.progress not in (None, _AUTO):
        progress = _ProgressLines(int(args.progress))
    options: dict[str, Any] = {"request_size": request_size} if request_size else {}
    try:
        copy(
            src,
            dst,
            connections=args.connections,
            requests=args.requests,
            tls=tls,
            progress=progress.update if progress is not None else None,
            destination_is_zero=args.destination_is_zero,
            allocated=args.allocated,
            flush=args.flush,
            timeout=timeout_of(args),
            only_dirty=args.only_dirty,
            **options,
        )
    except (CopyFailed, nbdproto.NBDError, OSError, ValueError, NotImplementedError, nbdproto.ProtocolError) as exc:
        print(f"nbdproto copy: {exc}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
    if isinstance(progress, _ProgressLines):
        progress.done()
    return 0


class _ProgressLines:
    """nbdcopy's ``--progress=FD``: ``N/100`` on its own line each time the whole percentage grows."""

    def __init__(self, fd: int) -> None:
        try:
            os.fstat(fd)
        except OSError:
            raise UsageError(f"--progress={fd}: descriptor {fd} is not open") from None
        self._fd = fd
        self._shown = -1

    def update(self, progress: CopyProgress) -> None:
        if progress.total:
            self._show(min(100, progress.copied * 100 // progress.total))

    def _show(self, percent: int) -> None:
        if percent > self._shown:
            self._shown = percent
            os.write(self._fd, f"{percent}/100\n".encode())

    def done(self) -> None:
        self._show(100)

    def close(self) -> None:
        pass


class _ProgressBar:
    """A tqdm bar on stderr fed by the copy's progress (tqdm is imported only when shown: it costs a
    noticeable share of a short copy's start-up)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._shown = 0

    def update(self, progress: CopyProgress) -> None:
        if self._bar is None:
            from tqdm import tqdm

            total = progress.total or None
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
        self._bar.update(progress.copied - self._shown)
        self._shown = progress.copied

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
