"""Our dirty bitmaps side by side with qemu's: the same writes, zeroes and trims (qemu-io) into a qcow2 image
with qemu's bitmaps (``qemu-img bitmap --add``) served by ``qemu-nbd -B``, and into a raw image served by
``nbdproto serve --bitmap`` (both backends); ``nbdinfo --map=qemu:dirty-bitmap:NAME`` prints the same, block
status answers the same extents (ranges inside and across granules, REQ_ONE), and NBD_OPT_LIST_META_CONTEXT
answers the same queries."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

import nbdproto_threads as nt
from tests.conftest import PEER_ENV
from tests.remotes import CLI, serving_on_socket

pytestmark = pytest.mark.timeout(180)
KIB, MIB = 1 << 10, 1 << 20
SIZE = 64 * MIB
BITMAPS = (("b1", 64 * KIB), ("fine", 4 * KIB))
TOOLS = ("nbdinfo", "qemu-nbd", "qemu-img", "qemu-io")

Operation = tuple[str, int, int]  # ("write" | "zero" | "trim", offset, length)

FIXED: list[Operation] = [
    ("write", 100 * KIB, 10),  # inside one granule
    ("write", MIB, 64 * KIB),  # exactly one 64K granule
    ("zero", 3 * MIB, 200 * KIB),  # across granules, unaligned end
    ("trim", 5 * MIB, 1 * KIB),  # a trim marks too
    ("write", SIZE - 512, 512),  # the last granule
    ("write", 7 * MIB - 1, 2),  # straddles a granule boundary
]


def random_operations(count: int) -> list[Operation]:
    rng = random.Random(30)
    out: list[Operation] = []
    for _ in range(count):
        offset = rng.randrange(SIZE - 1)
        length = min(rng.choice((1, 512, 4096, 5000, 65536, 300_000)), SIZE - offset)
        out.append((rng.choice(("write", "write", "zero", "trim")), offset, length))
    return out


def qemu_io_commands(operations: Sequence[Operation]) -> list[str]:
    verbs = {"write": "write -P 0x5a", "zero": "write -z", "trim": "discard"}
    return [arg for kind, offset, length in operations for arg in ("-c", f"{verbs[kind]} {offset} {length}")]


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60, env=PEER_ENV)


@contextlib.contextmanager
def qemu_side(operations: Sequence[Operation]) -> Iterator[str]:
    """qemu-nbd -B serving a qcow2 image whose qemu bitmaps saw ``operations``."""
    with tempfile.TemporaryDirectory(prefix="nbdproto-qemu-bitmap-") as tmp:
        image, sock = os.path.join(tmp, "disk.qcow2"), os.path.join(tmp, "nbd.sock")
        run("qemu-img", "create", "-f", "qcow2", image, str(SIZE))
        for name, granularity in BITMAPS:
            run("qemu-img", "bitmap", "--add", "-g", str(granularity), image, name)
        # -d unmap: without it qemu drops discards before they reach the image (and its bitmaps).
        run("qemu-io", "-d", "unmap", "-f", "qcow2", *qemu_io_commands(operations), image)
        bitmaps = [arg for name, _ in BITMAPS for arg in ("-B", name)]
        with serving_on_socket(["qemu-nbd", "-t", "-r", "-f", "qcow2", *bitmaps, "-k", sock, image], sock, "qemu-nbd"):
            yield f"nbd+unix:///?socket={sock}"


@contextlib.contextmanager
def our_side(operations: Sequence[Operation], backend: str) -> Iterator[str]:
    """nbdproto serve --bitmap serving a raw image, after qemu-io made ``operations`` through it."""
    with tempfile.TemporaryDirectory(prefix="nbdproto-our-bitmap-") as tmp:
        image, sock = os.path.join(tmp, "disk.img"), os.path.join(tmp, "nbd.sock")
        with open(image, "wb") as f:
            f.truncate(SIZE)
        bitmaps = [arg for name, granularity in BITMAPS for arg in ("--bitmap", f"{name}:{granularity}")]
        command = [*CLI, "serve", image, "--socket", sock, "--backend", backend, *bitmaps]
        with serving_on_socket(command, sock, "nbdproto serve"):
            uri = f"nbd+unix:///?socket={sock}"
            run("qemu-io", "-d", "unmap", "-f", "raw", *qemu_io_commands(operations), uri)
            yield uri


def nbdinfo(*args: str) -> str:
    done = subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60, env=PEER_ENV)
    assert done.returncode == 0, done.stderr
    return done.stdout


RANGES = [
    (0, SIZE),
    (100, 200),  # inside a clean granule
    (100 * KIB + 3, 17),  # inside a dirty one
    (MIB - 10, 20),  # across a boundary, clean into dirty
    (3 * MIB + 1000, MIB),  # from inside a dirty run past its end
    (SIZE - 70000, 70000),  # to the end
    (SIZE - 1, 1),
    (7 * MIB - 5000, 10000),
]


def extents_of(uri: str, context: str) -> list[Any]:
    """Block status for each of RANGES, whole and with REQ_ONE, as (length, flags) lists."""
    answers: list[Any] = []
    with nt.connect(uri, meta_contexts=[context]) as client:
        for offset, length in RANGES:
            for req_one in (False, True):
                runs = client.block_status(length, offset, context=context, req_one=req_one)
                answers.append([(offset, length, req_one), [(e.length, e.status) for e in runs]])
    return answers


@pytest.mark.parametrize("backend", ["threads", "anyio"])
@pytest.mark.parametrize("operations", ["fixed", "random"])
def test_the_same_writes_give_the_same_map_as_qemu_nbd(backend: str, operations: str, peers: Any) -> None:
    peers(*TOOLS)
    ops = FIXED if operations == "fixed" else random_operations(60)
    with qemu_side(ops) as theirs, our_side(ops, backend) as ours:
        for name, _ in BITMAPS:
            option = f"--map=qemu:dirty-bitmap:{name}"
            assert nbdinfo(option, ours) == nbdinfo(option, theirs)
            assert json.loads(nbdinfo(option, "--json", ours)) == json.loads(nbdinfo(option, "--json", theirs))
            assert nbdinfo(option, "--totals", ours) == nbdinfo(option, "--totals", theirs)
            assert extents_of(ours, f"qemu:dirty-bitmap:{name}") == extents_of(theirs, f"qemu:dirty-bitmap:{name}")
        dirty = json.loads(nbdinfo("--map=qemu:dirty-bitmap:b1", "--json", ours))
    if operations == "fixed":
        assert [(e["offset"], e["length"]) for e in dirty if e["type"] == 1] == [
            (64 * KIB, 64 * KIB), (MIB, 64 * KIB), (3 * MIB, 256 * KIB), (5 * MIB, 64 * KIB),
            (7 * MIB - 64 * KIB, 128 * KIB), (SIZE - 64 * KIB, 64 * KIB),
        ]  # fmt: skip


QUERIES: list[list[str]] = [
    [],
    ["qemu:"],
    ["qemu:dirty-bitmap:"],
    ["qemu:dirty-bitmap:b1"],
    ["qemu:dirty-bitmap:fine", "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b1"],
    ["qemu:dirty-bitmap:nope"],
    ["qemu:dirty-bitmap"],
    ["qemu:dirty-bitmap:b"],
    ["qemu:dirty-bitmap:b1:"],
    ["base:"],
    ["qemu:", "base:"],
    ["qemu:allocation-depth"],
    ["x-other:"],
]


@pytest.mark.parametrize("backend", ["threads", "anyio"])
def test_meta_context_listing_answers_as_qemu_nbd_does(backend: str, peers: Any) -> None:
    peers(*TOOLS)
    with qemu_side([]) as theirs, our_side([], backend) as ours:
        for queries in QUERIES:
            # qemu lists its -B bitmaps last first; the names, not their order, are what a client reads.
            assert sorted(nt.list_meta_contexts(ours, queries)) == sorted(nt.list_meta_contexts(theirs, queries))
        listed = [json.loads(nbdinfo("--list", "--json", uri))["exports"][0]["contexts"] for uri in (ours, theirs)]
        assert sorted(listed[0]) == sorted(listed[1])
        assert listed[0] == ["base:allocation", "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:fine"]
