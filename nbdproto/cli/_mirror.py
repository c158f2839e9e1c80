"""``nbdproto mirror PRIMARY SECONDARY``: serve PRIMARY over NBD while mirroring it to SECONDARY.

PRIMARY is a file (or block device) or ``memory:SIZE``; SECONDARY is a file (created at PRIMARY's size when it
does not exist) or an NBD URI. Clients use PRIMARY as with ``nbdproto serve``; every write they make reaches
both sides, while a background copy brings the rest of PRIMARY over (``MirrorDevice``). Progress goes to
stderr: a bar on a terminal, otherwise one line per percent (``mirror 42% complete``), then
``mirror synchronised``; serving goes on until Ctrl-C or SIGTERM, which flush both sides. A secondary that
fails, or stalls for ``--remote-timeout`` seconds, fails the mirror (``mirror failed: ...``; writes get EIO
from then on, reads go on). Bad arguments and
sides that cannot be mirrored (sizes that differ, a read-only secondary) are one-line errors, exit status 1,
before anything is served.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import threading
from typing import Any

from nbdproto import BlockDevice
from nbdproto.files import DATA_MODE, RULE, new_file, refusal_of_existing

from ._errors import UsageError, count_argument, size_argument
from ._serve_options import add_serve_arguments
from ._sources import Source, check_remote_timeout, open_source, parse_source

__all__ = ["add_mirror_command", "mirror_command"]


def add_mirror_command(commands: Any) -> None:
    parser = commands.add_parser(
        "mirror",
        help="serve a file or memory disk while mirroring it to a file or another NBD export",
        description="Serve PRIMARY over NBD (as serve does) while copying it to SECONDARY in the background; every "
        "write reaches both. Once the copy is complete the two stay in step until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("primary", metavar="PRIMARY", help="a file or block device, or memory:SIZE")
    parser.add_argument(
        "secondary",
        metavar="SECONDARY",
        help="a file (created at PRIMARY's size if missing) or an NBD URI (nbd://, nbds://, nbd+unix://, ...)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal; otherwise one line per percent)",
    )
    parser.add_argument(
        "--copy-requests",
        type=count_argument(1),
        default=4,
        metavar="N",
        help="pieces the background copy has in flight (4)",
    )
    parser.add_argument(
        "--copy-rate",
        metavar="RATE",
        help="copy at most RATE bytes of data per second (e.g. 100M), leaving the disks to the clients",
    )
    add_serve_arguments(parser, exports=False)


def _sides(args: argparse.Namespace) -> tuple[Source, Source | None]:
    """PRIMARY and SECONDARY as sources; None for a SECONDARY file that does not exist yet."""
    primary = parse_source(args.primary)
    if primary.kind not in ("file", "memory"):
        raise UsageError(f"PRIMARY {args.primary}: must be a file or memory:SIZE")
    if args.secondary.startswith("memory:"):
        raise UsageError(f"SECONDARY {args.secondary}: must be a file or an NBD URI")
    if "://" not in args.secondary and not os.path.exists(args.secondary):
        parent = os.path.dirname(os.path.abspath(args.secondary))
        if not os.path.isdir(parent):
            raise UsageError(f"SECONDARY {args.secondary}: no such directory {parent}")
        return primary, None
    secondary = parse_source(args.secondary)
    if secondary.kind == "file":
        _check_written_file(secondary.target)
    if primary.kind == "file" and secondary.kind == "file" and os.path.samefile(primary.target, secondary.target):
        raise UsageError("PRIMARY and SECONDARY are the same file")
    return primary, secondary


def _check_written_file(path: str) -> None:
    """An existing SECONDARY file is written over: not through a symlink another user planted, nor into a
    regular file another user owns or can write (nbdproto.files' rule); a block device is the administrator's."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) and info.st_uid != os.geteuid():
        raise UsageError(f"SECONDARY {path}: a symbolic link of another user (uid {info.st_uid}) is not followed")
    info = os.stat(path)
    reason = refusal_of_existing(info) if stat.S_ISREG(info.st_mode) else None
    if reason is not None:
        raise UsageError(f"SECONDARY {path}: {reason}; {RULE}")


def mirror_command(args: argparse.Namespace) -> int:
    """Run ``nbdproto mirror`` until SIGINT or SIGTERM; UsageError for a bad argument."""
    from nbdproto.devices import FileDevice, MirrorDevice, MirrorState

    from ._serve import serve_opened  # the servers' imports are for serving commands alone

    primary_source, secondary_source = _sides(args)
    remote_timeout = check_remote_timeout(args.remote_timeout)
    rate = size_argument(args.copy_rate, "--copy-rate") if args.copy_rate is not None else None
    show_bar = args.progress if args.progress is not None else sys.stderr.isatty()
    reporter = _Reporter(show_bar)
    made: list[MirrorDevice] = []

    def open_exports(source_read_only: bool) -> list[tuple[str, BlockDevice]]:
        primary = open_source(primary_source, read_only=args.read_only)
        created = None
        try:
            if secondary_source is None:
                fd = new_file(args.secondary, DATA_MODE, read=True)  # exclusive, no symlink followed
                created = args.secondary
                try:
                    os.ftruncate(fd, primary.size)  # sparse: it reads as zero, so the copy skips the holes
                except BaseException:
                    os.close(fd)
                    raise
                secondary: BlockDevice = FileDevice.from_descriptor(fd, created)
            else:
                secondary = open_source(secondary_source, read_only=False, remote_timeout=remote_timeout)
        except BaseException:
            primary.close()
            if created is not None and os.path.exists(created):
                os.unlink(created)
            raise
        try:
            mirror = MirrorDevice(
                primary,
                secondary,
                reporter.report,
                requests=args.copy_requests,
                max_rate=rate,
                secondary_is_zero=created is not None,
                start=False,
            )
        except ValueError as exc:
            primary.close()
            secondary.close()
            if created is not None:
                os.unlink(created)
            raise UsageError(f"cannot mirror {args.primary} to {args.secondary}: {exc}") from None
        reporter.mirror = mirror
        made.append(mirror)
        return [(args.name, mirror)]

    status = serve_opened(args, open_exports, 1, on_serving=lambda: made[0].start())
    reporter.close()
    if made:
        state = made[0].status()
        if state.state is MirrorState.COPYING:
            print(f"mirror stopped at {state.percent}%: the secondary is incomplete", file=sys.stderr, flush=True)
        elif state.state is MirrorState.FAILED:
            return 1
    return status


class _Reporter:
    """The mirror's progress on stderr: a tqdm bar, or one line per percent (called from the copy's threads)."""

    def __init__(self, show_bar: bool) -> None:
        self.show_bar = show_bar
        self.mirror: Any = None
        self._bar: Any = None
        self._lock = threading.Lock()

    def report(self, value: int | str) -> None:
        with self._lock:
            if isinstance(value, int):
                if self.show_bar:
                    self._update_bar()
                else:
                    print(f"mirror {value}% complete", file=sys.stderr, flush=True)
                return
            self._close_bar()
            print("mirror synchronised" if value == "complete" else f"mirror {value}", file=sys.stderr, flush=True)

    def _update_bar(self) -> None:
        if self.mirror is None:
            return
        status = self.mirror.status()
        if self._bar is None:
            from tqdm import tqdm  # only when shown: it costs start-up time

            self._bar = tqdm(total=status.total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
        self._bar.update(status.copied - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._update_bar()
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        with self._lock:
            self._close_bar()
