"""``nbdproto mirror`` on real pairs: a file mirrored to an nbdkit memory export and to a file while qemu-io and
nbdcopy write to the served primary during the copy; checksums compared once it says "mirror synchronised".
The copy is rate-limited (``--copy-rate``) so that the writes land while it runs, whatever the machine's load.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from typing import Any

import pytest

from tests.remotes import cli, nbdkit
from tests.test_interop_server import run

MIB = 1 << 20
SIZE = 64 * MIB
pytestmark = pytest.mark.timeout(180)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def make_primary(path: str) -> int:
    """A sparse 64 MiB image with 17 MiB of data in three runs; returns the data bytes."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length in ((0, 8 * MIB), (20 * MIB, 8 * MIB), (40 * MIB, MIB)):
            f.seek(offset)
            f.write(os.urandom(length))
    return 17 * MIB


def percent(line: str) -> int | None:
    parts = line.split()
    if len(parts) == 3 and parts[0] == "mirror" and parts[2] == "complete" and parts[1].endswith("%"):
        return int(parts[1][:-1])
    return None


def write_during_the_copy(uri: str, tmp_path: Any) -> None:
    """qemu-io and nbdcopy write to the served primary: ahead of the copy, behind it, zeroes and discards."""
    io = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0x77 30M 2M",   # a hole not yet copied becomes data
        "-c", "write -P 0x66 1M 1M",    # data already copied is overwritten
        "-c", "write -z 21M 1M",        # zeroes inside data
        "-c", "discard 6M 1M",          # a trim inside data
        "-c", "write -P 0x55 63M 64K",  # the very end
        uri,
    )  # fmt: skip
    assert "error" not in io.stdout.lower() + io.stderr.lower(), io.stdout + io.stderr
    small = str(tmp_path / "small.img")
    with open(small, "wb") as f:
        f.write(os.urandom(3 * MIB))
    run("nbdcopy", small, uri)  # the first 3 MiB, over several connections


def mirror_while_writing(secondary: str, tmp_path: Any, *extra: str) -> tuple[str, list[str]]:
    """Run ``nbdproto mirror`` of a fresh primary to ``secondary`` with writers during the copy; returns the
    primary's path and the mirror's stderr once it stopped."""
    primary = str(tmp_path / "primary.img")
    make_primary(primary)
    with cli("mirror", primary, secondary, "--port", "0", "--copy-rate", "4M", *extra) as mirror:
        uri = mirror.uri()
        first = mirror.wait_for("err", lambda line: (percent(line) or 0) >= 1, 60)
        assert percent(first) is not None and percent(first) < 100  # type: ignore[operator]
        write_during_the_copy(uri, tmp_path)
        assert not any("synchronised" in line for line in mirror.err), "the writes did not land during the copy"
        mirror.wait_for("err", lambda line: line == "mirror synchronised", 90)
        # Synchronous from now on: a write after the copy reaches both sides too.
        run("qemu-io", "-f", "raw", "-c", "write -P 0x44 50M 1M", uri)
        assert mirror.stop() == 0
        assert "stopped" in mirror.out
        err = mirror.err
    percents = [p for p in map(percent, err) if p is not None]
    assert percents == sorted(set(percents)) and percents[0] == 0 and percents[-1] == 100
    return primary, err


def test_mirror_file_to_nbdkit_memory_while_qemu_io_and_nbdcopy_write(peers: Any, tmp_path: Any) -> None:
    peers("nbdkit", "qemu-io", "nbdcopy", "nbdinfo")
    garbage = str(tmp_path / "garbage.img")
    with open(garbage, "wb") as f:
        f.write(b"\xee" * SIZE)
    with nbdkit("memory", f"size={SIZE}") as (secondary, _):
        run("nbdcopy", garbage, secondary)  # every hole of the primary must be zeroed on it
        primary, _ = mirror_while_writing(secondary, tmp_path)
        copied = str(tmp_path / "secondary.img")
        run("nbdcopy", secondary, copied)
        totals = json.loads(run("nbdinfo", "--json", "--map", "--totals", secondary).stdout)
    assert sha256(copied) == sha256(primary)
    data = sum(t["size"] for t in totals if t["type"] == 0)
    allocated = os.stat(primary).st_blocks * 512
    assert data <= allocated + 2 * MIB, f"the primary's holes reached nbdkit as data ({data} > {allocated})"


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "existing-file"])
def test_mirror_file_to_file_while_qemu_io_and_nbdcopy_write(existing: bool, peers: Any, tmp_path: Any) -> None:
    peers("qemu-io", "nbdcopy")
    secondary = str(tmp_path / "secondary.img")
    if existing:
        with open(secondary, "wb") as f:
            f.write(b"\xee" * SIZE)
    primary, _ = mirror_while_writing(secondary, tmp_path)
    assert sha256(secondary) == sha256(primary)
    assert os.stat(secondary).st_blocks * 512 <= os.stat(primary).st_blocks * 512 + 2 * MIB, "holes stay holes"


def test_memory_primary_with_a_progress_bar(peers: Any, tmp_path: Any) -> None:
    peers("qemu-io", "nbdcopy")
    secondary, served = str(tmp_path / "secondary.img"), str(tmp_path / "served.img")
    with cli("mirror", "memory:16M", secondary, "--port", "0", "--progress", "--copy-rate", "4M") as mirror:
        uri = mirror.uri()
        run("qemu-io", "-f", "raw", "-c", "write -P 0x12 3M 5M", uri)
        mirror.wait_for("err", lambda line: "mirror synchronised" in line, 90)
        run("nbdcopy", uri, served)
        assert mirror.stop(signal.SIGINT) == 0
    assert sha256(secondary) == sha256(served)
    assert any("%|" in line for line in mirror.err), "a tqdm bar was drawn"


def test_stop_during_the_copy_flushes_and_says_how_far_it_got(tmp_path: Any) -> None:
    primary, secondary = str(tmp_path / "p.img"), str(tmp_path / "s.img")
    make_primary(primary)
    with cli("mirror", primary, secondary, "--port", "0", "--copy-rate", "1M", "--copy-requests", "1") as mirror:
        mirror.uri()
        mirror.wait_for("err", lambda line: (percent(line) or 0) >= 1, 60)
        assert mirror.stop(signal.SIGINT) == 0
    stopped = [line for line in mirror.err if line.startswith("mirror stopped at ")]
    assert stopped and "the secondary is incomplete" in stopped[0], mirror.err
    with open(primary, "rb") as p, open(secondary, "rb") as s:
        assert p.read(MIB) == s.read(MIB), "what was copied before the stop is on the secondary"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp, nbd: (tmp / "short.img", b"x" * MIB),
            "the primary holds 67108864 bytes but the secondary 1048576",
        ),
        (lambda tmp, nbd: nbd["small"], "the primary holds 67108864 bytes but the secondary 1048576"),
        (lambda tmp, nbd: nbd["read-only"], "the secondary is read-only"),
        (lambda tmp, nbd: "memory:64M", "must be a file or an NBD URI"),
        (lambda tmp, nbd: "/no/such/dir/s.img", "no such directory"),
    ],
    ids=["file-size", "nbd-size", "nbd-read-only", "memory-secondary", "no-directory"],
)
def test_bad_mirrors_are_one_line_errors_before_serving(make: Any, message: str, peers: Any, tmp_path: Any) -> None:
    peers("nbdkit")
    primary = str(tmp_path / "p.img")
    make_primary(primary)
    with (
        nbdkit("memory", "size=1M") as (small, _),
        nbdkit("-r", "memory", f"size={SIZE}") as (read_only, _),
    ):
        target = make(tmp_path, {"small": small, "read-only": read_only})
        if isinstance(target, tuple):
            target[0].write_bytes(target[1])
            target = str(target[0])
        with cli("mirror", primary, target, "--port", "0") as mirror:
            status = mirror.proc.wait(30)
            mirror.wait_for("err", lambda line: message in line, 30)
    assert status == 1 and not mirror.out and len(mirror.err) == 1, (mirror.out, mirror.err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nbd://127.0.0.1:1/", "s.img"], "PRIMARY nbd://127.0.0.1:1/: must be a file or memory:SIZE"),
        (["memory:1M", "s.img", "--memory", "1M"], "unrecognized arguments: --memory 1M"),  # not in --help either
        (["memory:1M", "s.img", "--copy-rate", "0"], "--copy-rate '0' must be positive"),
        (["memory:1M", "s.img", "--copy-requests", "0"], "--copy-requests: '0' must be at least 1"),
        (["p.img", "p.img"], "PRIMARY and SECONDARY are the same file"),
    ],
)
def test_bad_arguments(args: list[str], message: str, tmp_path: Any) -> None:
    (tmp_path / "p.img").write_bytes(bytes(MIB))
    with cli("mirror", *[str(tmp_path / a) if a.endswith(".img") else a for a in args], "--port", "0") as mirror:
        status = mirror.proc.wait(30)
        mirror.wait_for("err", lambda line: message in line, 30)
    assert status == 1 and not mirror.out and len(mirror.err) == 1, mirror.err
    assert not (tmp_path / "s.img").exists(), "nothing is created for a mirror that does not start"
