"""Every nbdcopy option a script passes, given to ``nbdproto copy`` and to nbdcopy on the same files: the same
exit status, the same bytes, the same size and the same sparseness (blocks allocated) in what they write.

The source has every kind of run: data, zeros written as data (nbdcopy's -S turns them into holes), and holes
(which extents report, unless --no-extents). It is copied from a file and from an nbdkit export of that file,
to a new file and onto an existing bigger file of other data (cut to the source's size by both).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PEER_ENV
from tests.remotes import serving_on_socket
from tests.sparsefiles import data_bytes

pytestmark = pytest.mark.timeout(300)
MIB = 1 << 20
NBDPROTO = os.path.join(os.path.dirname(sys.executable), "nbdproto")

OPTIONS = [
    [],
    ["-C", "2"],
    ["--connections=1"],
    ["-p"],
    ["-R", "4"],
    ["--requests=1"],
    ["-S", "0"],
    ["-S", "65536"],
    ["--sparse=512"],
    ["-T", "2"],
    ["--threads=1"],
    ["--no-extents"],
    ["--no-extents", "-S", "0"],
    ["--queue-size=1048576"],
    ["--synchronous"],
    ["-v"],
    ["--allocated"],
    ["--flush"],
    ["--request-size=65536"],
]
"""Each option nbdcopy takes (issue 29 names -C, -p, -R, -S, -T, --no-extents, --queue-size, --synchronous, -v),
and those scripts already passed (--allocated, --flush, --request-size)."""

BAD = [["-C", "0"], ["-R", "0"], ["-S", "100"], ["-S", "3000"], ["-C", "x"], ["--sparse=x"]]
"""Values nbdcopy refuses, each a usage error of both (exit 1, before anything is copied)."""

ALIASES = {"-C": "--connections", "-R": "--requests", "-S": "--sparse", "--sparse": "--sparse"}

DIFFERENT_BY_NATURE = {
    ("--allocated",): "nbdcopy 1.14 leaves the holes of a regular file it has truncated unwritten (its manual says "
    "--allocated makes the output fully allocated; strace shows no write or fallocate for them): ours writes them",
    ("--synchronous",): "nbdcopy 1.14's synchronous loop does not search the data for zeros (-S), so the zeros "
    "written as data stay allocated: ours makes them holes in every mode, as -S says",
}
"""Where nbdcopy's result on these files is not what its manual says, and ours is: the bytes and size still
match, the sparseness is checked against the manual instead."""


def make_source(path: Path) -> None:
    """16 MiB: data, 4 MiB of zeros written as data, a 6 MiB hole, data, a hole to the end."""
    with open(path, "wb") as f:
        f.write(os.urandom(2 * MIB))
        f.write(bytes(4 * MIB))
        f.seek(12 * MIB)
        f.write(os.urandom(MIB))
        f.truncate(16 * MIB)


def allocated(path: Path) -> int:
    """The data in the file, holes left out (see tests.sparsefiles for why not st_blocks)."""
    return data_bytes(path)


@contextlib.contextmanager
def nbdkit_of(image: Path) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="nbdproto-copyopts-") as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        with serving_on_socket(["nbdkit", "-f", "-r", "-U", sock, "file", str(image)], sock, "nbdkit"):
            yield f"nbd+unix:///?socket={sock}"


def copy_with(tool: str, options: list[str], source: str, target: Path) -> subprocess.CompletedProcess[bytes]:
    command = ["nbdcopy"] if tool == "nbdcopy" else [NBDPROTO, "copy"]
    return subprocess.run([*command, *options, source, str(target)], capture_output=True, timeout=120, env=PEER_ENV)


def existing(path: Path) -> None:
    """A bigger file of other data, which the copy must overwrite and cut to 16 MiB."""
    with open(path, "wb") as f:
        f.write(os.urandom(MIB) * 3)
        f.truncate(24 * MIB)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: " ".join(o) or "defaults")
@pytest.mark.parametrize("via", ["file", "nbdkit"])
def test_each_option_does_what_nbdcopys_does(options: list[str], via: str, tmp_path: Path, peers: Any) -> None:
    peers("nbdcopy", "nbdkit")
    image = tmp_path / "source.img"
    make_source(image)
    with contextlib.ExitStack() as stack:
        source = str(image) if via == "file" else stack.enter_context(nbdkit_of(image))
        for start in ("new", "existing"):
            results = {}
            for tool in ("nbdcopy", "nbdproto"):
                target = tmp_path / f"{tool}-{start}.img"
                if start == "existing":
                    existing(target)
                done = copy_with(tool, options, source, target)
                results[tool] = (done, target)
            (theirs, their_file), (mine, my_file) = results["nbdcopy"], results["nbdproto"]
            where = f"{via} to a {start} file with {options}"
            assert mine.returncode == theirs.returncode == 0, (where, theirs.stderr, mine.stderr)
            assert my_file.read_bytes() == their_file.read_bytes() == image.read_bytes(), where
            assert my_file.stat().st_size == their_file.stat().st_size == 16 * MIB, where
            why = DIFFERENT_BY_NATURE.get(tuple(options))
            if why is None:
                assert allocated(my_file) == allocated(their_file), (where, allocated(my_file), allocated(their_file))
            elif options == ["--allocated"]:
                assert allocated(my_file) == 16 * MIB >= allocated(their_file), (where, why)  # fully allocated
            else:
                assert allocated(my_file) == 3 * MIB < allocated(their_file), (where, why)  # the data alone


@pytest.mark.parametrize("options", BAD, ids=lambda o: " ".join(o))
def test_values_nbdcopy_refuses_are_refused(options: list[str], tmp_path: Path, peers: Any) -> None:
    peers("nbdcopy")
    image = tmp_path / "source.img"
    make_source(image)
    for tool in ("nbdcopy", "nbdproto"):
        done = copy_with(tool, options, str(image), tmp_path / f"{tool}.img")
        assert done.returncode == 1, (tool, done.stderr)
        assert not (tmp_path / f"{tool}.img").exists(), tool
        if tool == "nbdproto":
            (line,) = done.stderr.decode().splitlines()
            name = options[0].split("=")[0]
            assert line.startswith("nbdproto copy: ") and (name in line or ALIASES[name] in line), line


def test_version(peers: Any) -> None:
    peers("nbdcopy")
    for tool in (["nbdcopy"], [NBDPROTO, "copy"]):
        for flag in ("-V", "--version"):
            done = subprocess.run([*tool, flag], capture_output=True, text=True, timeout=30, env=PEER_ENV)
            assert done.returncode == 0 and done.stdout.split()[1][0].isdigit(), (tool, flag, done.stdout)
