"""A full and an incremental backup the way virtnbdbackup makes them (its libvirtnbdbackup/nbdcli/client.py and
extenthandler read for the sequence of binding calls; the code here is ours), run with libnbd's binding and with
nbdproto.libnbd against qemu-nbd serving a qcow2 image with a dirty bitmap, as libvirt does during a backup.

The call sequence: a handle with a debug callback; base:allocation added (twice for a full backup: the tool
adds its primary context too, which is base:allocation then), or base:allocation and
``qemu:dirty-bitmap:backup-sda``; the export name; connect_uri to the unix socket, retried with a new handle
while the server is not there yet; get_block_size(SIZE_MAXIMUM) as the read size; the meta contexts listed
with get_nr_meta_contexts / get_meta_context; get_block_size(SIZE_MINIMUM), get_size, block_status over the
disk with a 4-argument callback gathering the flat entries by context; pread of every data extent (for the
incremental, of the dirty extents that are also allocated) in pieces of at most the read size; shutdown.
Both sides must make the same calls with the same results, and both backups must equal the image.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.libnbd_diff import Differ, Params, Workers, libnbd_workers, require_binding  # noqa: F401
from tests.remotes import serving_on_socket

pytestmark = pytest.mark.peers

SIZE = 8 << 20
BITMAP = "backup-sda"

BACKUP = """
log = []
def connect(contexts):
    handle = nbd.NBD()
    for attempt_number, socket in enumerate([PARAMS["socket"] + ".not-yet", PARAMS["socket"]]):
        handle.set_debug_callback(lambda func, args: log.append(func))
        try:
            for context in contexts:
                handle.add_meta_context(context)
            handle.set_export_name("sda")
            handle.connect_uri("nbd+unix:///sda?socket=" + socket)
        except nbd.Error as e:
            rec("connect failed", attempt_number, e.errno)
            handle = nbd.NBD()
            continue
        return handle
    raise RuntimeError("no connection")

def extents(handle, primary):
    by_context = {}
    for index in range(handle.get_nr_meta_contexts()):
        by_context[handle.get_meta_context(index)] = []
    rec("contexts", sorted(by_context))
    align = handle.get_block_size(nbd.SIZE_MINIMUM) or 512
    longest = 4294967295 - align + 1
    size = handle.get_size()
    state = {"offset": 0}
    def callback(metacontext, offset, entries, status):
        rec("extent callback", metacontext, offset, len(entries), status)
        before = len(by_context[primary])
        by_context[metacontext].extend(entries)
        state["offset"] += sum(by_context[primary][before::2])
    while state["offset"] < size:
        handle.block_status(min(size - state["offset"], longest), state["offset"], callback)
    ranges = {}
    for context, entries in by_context.items():
        position, found = 0, []
        for length, flags in zip(entries[0::2], entries[1::2]):
            found.append((position, length, flags))
            position += length
        ranges[context] = found
    return ranges

def copy(handle, pieces, target, max_request):
    with open(target, "r+b") as out:
        for start, length in pieces:
            offset = start
            while offset < start + length:
                count = min(start + length - offset, max_request)
                out.seek(offset)
                out.write(handle.pread(count, offset))
                offset += count

def data_of(base):
    # base:allocation: 0 data, 2 data reading as zero (both copied, as the tool does), 1 and 3 holes
    return [(start, length) for start, length, flags in base if flags in (0, 2)]

def overlap(base, dirty):
    out = []
    for start, length, flags in dirty:
        if flags != 1:
            continue
        for b_start, b_length in data_of(base):
            low, high = max(start, b_start), min(start + length, b_start + b_length)
            if low < high:
                out.append((low, high - low))
    return out

level = PARAMS["level"]
primary = nbd.CONTEXT_BASE_ALLOCATION if level == "full" else "qemu:dirty-bitmap:" + PARAMS["bitmap"]
handle = connect([nbd.CONTEXT_BASE_ALLOCATION, primary])
max_request = handle.get_block_size(nbd.SIZE_MAXIMUM) or 33554432
rec("max request", max_request, "size", handle.get_size())
ranges = extents(handle, primary)
base = ranges[nbd.CONTEXT_BASE_ALLOCATION]
pieces = data_of(base) if level == "full" else overlap(base, ranges[primary])
rec("pieces", pieces)
copy(handle, pieces, PARAMS["target"], max_request)
handle.shutdown()
rec("debug messages without set_debug", bool(log))
"""


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


@pytest.fixture
def image(tmp_path: os.PathLike[str]) -> str:
    """A qcow2 disk with data, a zeroed range and holes; the bitmap backup-sda starts recording after them."""
    require_binding("qemu-img", "qemu-io", "qemu-nbd")
    path = os.path.join(tmp_path, "sda.qcow2")
    _run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -z 2M 64k", "-c", "write -P 0x22 3M 4k",
         path)  # fmt: skip
    _run("qemu-img", "bitmap", "--add", path, BITMAP)
    return path


def _server(image: str, directory: str) -> contextlib.AbstractContextManager[Params]:
    @contextlib.contextmanager
    def start() -> Iterator[Params]:
        sock = os.path.join(directory, "qemu-nbd.sock")
        command = ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-x", "sda", "-B", BITMAP, "-k", sock, image]
        with serving_on_socket(command, sock, "qemu-nbd"):
            yield {"socket": sock}

    return start()


def _raw(image: str, directory: str) -> bytes:
    raw = os.path.join(directory, "expected.raw")
    _run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image, raw)
    with open(raw, "rb") as f:
        return f.read()


def test_full_then_incremental_backup(libnbd_workers: Workers, image: str, tmp_path: os.PathLike[str]) -> None:  # noqa: F811
    differ = Differ(libnbd_workers)
    directory = str(tmp_path)
    targets = {side: os.path.join(directory, f"{side}.raw") for side in ("real", "ours")}
    for target in targets.values():
        with open(target, "wb") as f:
            f.truncate(SIZE)

    def side_target() -> Iterator[str]:
        yield targets["real"]
        yield targets["ours"]

    # Full backup: both sides read the same image, each into its own copy.
    full = _differential(differ, image, directory, "full", side_target())
    assert ["contexts", ["base:allocation"]] in full
    expected = _raw(image, directory)
    for target in targets.values():
        with open(target, "rb") as f:
            assert f.read() == expected

    # The guest writes on: the bitmap records it. The incremental backup reads what changed, into each copy.
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 512k 64k", "-c", "write -P 0x44 5M 128k",
         "-c", "write -z 3M 4k", image)  # fmt: skip
    incremental = _differential(differ, image, directory, "inc", side_target())
    assert ["contexts", ["base:allocation", "qemu:dirty-bitmap:" + BITMAP]] in incremental
    pieces = next(entry[1] for entry in incremental if entry[0] == "pieces")
    assert [512 * 1024, 65536] in pieces and [5 << 20, 131072] in pieces
    expected = _raw(image, directory)
    for target in targets.values():
        with open(target, "rb") as f:
            assert f.read() == expected


def _differential(differ: Differ, image: str, directory: str, level: str, targets: Iterator[str]) -> list[object]:
    """The backup script on both sides, each writing into the next of ``targets``; the common trace."""

    @contextlib.contextmanager
    def server() -> Iterator[Params]:
        with _server(image, directory) as params:
            yield {**params, "target": next(targets)}

    trace = differ.same(BACKUP, server, level=level, bitmap=BITMAP)
    assert trace[0] == ["connect failed", 0, "ENOENT"]
    return trace
