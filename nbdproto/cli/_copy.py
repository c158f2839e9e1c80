"""``nbdproto copy SRC DST``: the command over ``nbdproto_threads.copy``, with nbdcopy's options.

Every option a script passes to nbdcopy is taken: ``-C N`` / ``--connections``, ``-R N`` / ``--requests``,
``--request-size``, ``-S N`` / ``--sparse`` (the all-zero blocks searched for; 0: none), ``--no-extents``,
``--queue-size``, ``--synchronous``, ``-T N`` / ``--threads`` (here: threads for local file I/O), ``--allocated``,
``--destination-is-zero``, ``--flush``, ``-p`` / ``--progress[=FD]``, ``-v`` (what each end is, on stderr) and
``-V``. ``--progress=FD`` writes nbdcopy's machine-readable progress to that descriptor: a line ``N/100`` each
time the whole percentage done grows, the last one ``100/100``. ``--progress`` alone (``-p``) draws a bar on
standard error (the default when standard error is a terminal); ``--no-progress`` draws nothing.

A regular file as DST ends up the size of SRC, as with nbdcopy. Standard output closed early (``copy URI - |
head -c 10``) ends the copy silently by SIGPIPE, Ctrl-C by SIGINT, as nbdcopy ends (see ``_errors``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from nbdproto.client import looks_like_uri
from nbdproto_threads import SPARSE_DEFAULT, CopyProgress, copy

from ._command_args import starting_servers
from ._errors import UsageError, count_argument, size_argument, timeout_of
from ._query import add_connection_arguments, client_tls

__all__ = ["add_copy_command", "copy_command"]

_BAR, _AUTO = "bar", "auto"


def add_copy_command(commands: Any) -> None:
    parser = commands.add_parser("copy", help="copy between NBD exports and files, sparse-aware and in parallel")
    parser.add_argument("src", metavar="SRC", nargs="?", help="NBD URI, file, or - (standard input)")
    parser.add_argument("dst", metavar="DST", nargs="?", help="NBD URI, file, - (standard output), or null:")
    parser.add_argument(
        "-C",
        "--connections",
        type=count_argument(1),
        default=4,
        metavar="N",
        help="connections at each NBD end, when the server allows multi-conn (default 4)",
    )
    parser.add_argument(
        "-R",
        "--requests",
        type=count_argument(1),
        default=2,
        metavar="N",
        help="requests in flight per connection (default 2)",
    )
    parser.add_argument(
        "-T",
        "--threads",
        type=count_argument(0),
        default=0,
        metavar="N",
        help="threads for local file I/O (default 0: one for files in memory, four on disks)",
    )
    parser.add_argument(
        "-S",
        "--sparse",
        metavar="N",
        default=str(SPARSE_DEFAULT),
        help=f"write all-zero blocks of N bytes in the data read as holes (a power of two of at "
        f"least 512; 0: never; default {SPARSE_DEFAULT})",
    )
    parser.add_argument(
        "--no-extents",
        dest="extents",
        action="store_false",
        help="do not ask the source which parts are holes: read all of it",
    )
    parser.add_argument("--queue-size", metavar="SIZE", help="at most SIZE bytes of requests in flight")
    parser.add_argument("--synchronous", action="store_true", help="one connection and one request at a time, in order")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what each end is, on stderr")
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
        "-p",
        "--progress",
        nargs="?",
        const=_BAR,
        default=_AUTO,
        metavar="FD",
        help="a progress bar on stderr; --progress=FD: 'N/100' lines on descriptor FD instead",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=None, help="no progress")
    add_connection_arguments(parser)


def _sparse(text: str) -> int:
    """-S N: 0, or a power of two of at least 512 (nbdcopy's rule), in bytes or with a unit (4K)."""
    if text.strip() == "0":
        return 0
    size = size_argument(text, "--sparse")
    if size < 512 or size & (size - 1):
        raise UsageError(f"--sparse {text}: must be 0 or a power of two of at least 512")
    return size


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
    queue_size = size_argument(args.queue_size, "--queue-size") if args.queue_size is not None else None
    sparse = _sparse(args.sparse)
    tls_uri = src if looks_like_uri(src) else dst if looks_like_uri(dst) else None
    tls = client_tls(args, tls_uri) if tls_uri else None
    progress: _ProgressBar | _ProgressLines | None = None
    if args.progress == _BAR or (args.progress == _AUTO and sys.stderr.isatty()):
        progress = _ProgressBar()
    elif args.progress not in (None, _AUTO):
        progress = _ProgressLines(int(args.progress))
    options: dict[str, Any] = {"request_size": request_size} if request_size else {}

    def say(line: str) -> None:
        print(f"nbdproto copy: {line}", file=sys.stderr, flush=True)

    try:
        done = copy(
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
            sparse=sparse,
            extents=args.extents,
            queue_size=queue_size,
            synchronous=args.synchronous,
            threads=args.threads,
            verbose=say if args.verbose else None,
            only_dirty=args.only_dirty,
            **options,
        )
        if args.verbose:
            say(f"copied {done.copied} bytes, {done.data} of them as data")
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
