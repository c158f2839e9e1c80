"""``--bitmap NAME[:GRANULARITY]`` and ``--bitmap-dir DIR`` of ``nbdproto serve``: dirty bitmaps from the start.

Each ``--bitmap`` makes every export track changes in bitmap NAME (``nbdproto.devices.bitmaps``), offered as the
meta context ``qemu:dirty-bitmap:NAME``: started if the export has no such bitmap yet, else the stored one goes
on (a GRANULARITY given must then be the stored one's). Bitmaps are kept where the export's data is: beside an
image file in ``IMAGE.bitmaps/``, under an S3 image's key, in memory for memory; ``--bitmap-dir DIR`` keeps
them in DIR instead (a block device needs it; with several exports, each in DIR/EXPORTNAME).

An image file whose ``IMAGE.bitmaps/`` exists has its bitmaps tracked whether or not ``--bitmap`` names them:
serving it without would leave them to under-report every write made meanwhile.

The bitmap filter sits outermost, above the ``--filter`` chain: it records the writes as clients send them.
Bitmaps live in one process, so they need ``--workers 1``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from nbdproto import BlockDevice

from ._errors import UsageError, parse_size

__all__ = ["add_bitmap_arguments", "Bitmaps"]


def add_bitmap_arguments(serve: Any) -> None:
    group = serve.add_argument_group(
        "dirty bitmaps (incremental backup)",
        "Each bitmap NAME records the regions written, zeroed or trimmed since it started, offered as the meta "
        "context qemu:dirty-bitmap:NAME (as qemu-nbd -B NAME offers it). Bitmaps of an image file are kept in "
        "IMAGE.bitmaps/ beside it, of an S3 image under its key, of memory in memory; they survive a restart and "
        "never under-report after a crash. An image with an IMAGE.bitmaps/ directory always has its bitmaps "
        "tracked. See docs/howto/backup.md.",
    )
    group.add_argument(
        "--bitmap",
        action="append",
        default=[],
        metavar="NAME[:GRANULARITY]",
        help="track changes in bitmap NAME (repeatable): started if missing, with GRANULARITY bytes per bit (a "
        "power of two from 4K; default 64K), else the stored one goes on",
    )
    group.add_argument(
        "--bitmap-dir",
        metavar="DIR",
        help="keep the bitmaps in DIR (created if missing) instead of beside the image; needed for a block "
        "device; with several exports, each export's in DIR/EXPORTNAME",
    )
    from ._control import add_control_arguments

    add_control_arguments(group)


def _parse(text: str) -> tuple[str, int | None]:
    from nbdproto.devices.bitmaps import BitmapError, check_granularity, check_name

    name, sep, rest = text.partition(":")
    try:
        check_name(name)
        if not sep:
            return name, None
        try:
            granularity = parse_size(rest)
        except ValueError as exc:
            raise BitmapError(str(exc)) from None
        return name, check_granularity(granularity)
    except BitmapError as exc:
        raise UsageError(f"--bitmap {text!r}: {exc}") from None


class Bitmaps:
    """The bitmaps the command line asks for, checked before anything is served; ``wrap`` puts each export's
    device in its bitmap filter."""

    def __init__(self, args: argparse.Namespace, exports: int) -> None:
        self.wanted = [_parse(text) for text in getattr(args, "bitmap", [])]
        names = [name for name, _ in self.wanted]
        if len(set(names)) != len(names):
            raise UsageError(f"--bitmap names must differ: {names}")
        self.directory: str | None = getattr(args, "bitmap_dir", None)
        self.controlled = getattr(args, "control", None) is not None and not getattr(args, "read_only", False)
        self.scratch_dir: str | None = getattr(args, "scratch_dir", None)
        if self.scratch_dir is not None and not os.path.isdir(self.scratch_dir):
            raise UsageError(f"--scratch-dir {self.scratch_dir}: not a directory")
        self._several = exports > 1
        if self.directory is not None and os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise UsageError(f"--bitmap-dir {self.directory}: not a directory")

    def needed_for(self, sources: Sequence[tuple[str, str]]) -> bool:
        """Whether any export of ``sources`` ((kind, target) pairs) gets bitmaps: asked for, or kept beside an
        image file by an earlier run."""
        from nbdproto.devices.bitmaps import sidecar_of

        if self.wanted or self.directory is not None:
            return True
        return any(kind == "file" and os.path.isdir(sidecar_of(target)) for kind, target in sources)

    def _directory_for(self, export: str) -> str | None:
        if self.directory is None or not self._several:
            return self.directory
        from nbdproto.devices.bitmaps import BitmapError, check_name

        try:
            check_name(export)
        except BitmapError:
            raise UsageError(
                f"export {export!r}: with --bitmap-dir and several exports, each export's bitmaps are kept in "
                "DIR/EXPORTNAME, which needs a name of letters, digits, '_', '.', '+' and '-'"
            ) from None
        try:
            os.makedirs(self.directory, 0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--bitmap-dir {self.directory}: {exc.strerror}") from None
        return os.path.join(self.directory, export)

    def wrap(self, device: BlockDevice, export: str) -> BlockDevice:
        """``device`` in a DirtyBitmapFilter with every ``--bitmap`` (``device`` itself when no bitmap is asked
        for or kept, and no ``--control`` socket may add one to a writable export). UsageError for a
        granularity that differs from a stored bitmap's, a store another server holds, or a directory a device
        cannot use; OSError when the store cannot be read or written."""
        from nbdproto.devices import bitmaps

        directory = self._directory_for(export)
        if not self.wanted and not self.controlled and directory is None and bitmaps.stored_beside(device) is None:
            return device
        try:
            store = bitmaps.bitmap_store_for(device, directory)
        except ValueError as exc:
            raise UsageError(f"--bitmap: {exc}") from None
        except OSError as exc:
            if exc.filename is not None:
                raise UsageError(f"--bitmap: cannot use {exc.filename}: {exc.strerror}") from None
            raise
        try:
            tracked = bitmaps.DirtyBitmapFilter(device, store, scratch_dir=self.scratch_dir)
        except BaseException:
            store.close()
            raise
        try:
            have = {info.name: info for info in tracked.bitmap_list()}
            for name, granularity in self.wanted:
                if name not in have:
                    tracked.bitmap_add(name, granularity or bitmaps.DEFAULT_GRANULARITY)
                elif granularity is not None and have[name].granularity != granularity:
                    raise UsageError(
                        f"--bitmap {name}:{granularity}: bitmap {name!r} in {store.where} has granularity "
                        f"{have[name].granularity}"
                    )
        except bitmaps.BitmapError as exc:
            store.close()
            raise UsageError(f"--bitmap: {exc}") from None
        except BaseException:
            store.close()
            raise
        import logging  # here: the parser of every command loads this module, and logging only serving needs

        for info in tracked.bitmap_list():
            logging.getLogger("nbdproto.cli").info(
                "export %r: bitmap %s (granularity %d, %d bytes dirty) in %s",
                export, info.name, info.granularity, info.dirty_bytes, store.where,
            )  # fmt: skip
        return tracked
