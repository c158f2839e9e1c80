"""``nbdproto copy`` with nbdcopy's options: --destination-is-zero (counted at the target by the stats filter),
--allocated, --request-size, --flush, --progress=FD, and ``-`` for standard input and output."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice, StatsFilter
from tests.conftest import PEER_ENV
from tests.serving import Export, serve_exports

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20
CLI = [sys.executable, "-m", "nbdproto", "copy"]
DATA = [(0, 3 * MIB), (8 * MIB, 64 * 1024), (20 * MIB - 4096, 4096)]  # (offset, length) written; holes elsewhere


def make_image(path: Path, size: int = 20 * MIB) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in DATA:
            f.seek(offset)
            f.write(os.urandom(length))
    return path.read_bytes()


@contextlib.contextmanager
def counted_target(size: int = 20 * MIB) -> Iterator[tuple[str, StatsFilter, MemoryDevice]]:
    """Our server with a stats filter over a fresh memory disk (it reads as zeros): yields URI, stats, disk."""
    memory = MemoryDevice(size)
    stats = StatsFilter(memory)
    with serve_exports("threads", {"disk": Export(stats)}) as base:
        yield base.format("disk"), stats, memory


def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=60, env=PEER_ENV, **kwargs)


def contents(memory: MemoryDevice, size: int) -> bytes:
    buffer = bytearray(size)
    memory.pread_into(memoryview(buffer), 0)
    return bytes(buffer)


def test_destination_is_zero_writes_no_zeros(tmp_path: Path) -> None:
    image = make_image(tmp_path / "src.img")
    data_bytes = sum(length for _, length in DATA)
    for flag in ("--destination-is-zero", "--target-is-zero"):
        with counted_target() as (uri, stats, memory):
            done = run(flag, str(tmp_path / "src.img"), uri)
            assert done.returncode == 0, done.stderr
            counts = stats.snapshot()
            assert contents(memory, len(image)) == image
        # Only the data went to the target: no WRITE_ZEROES, no trim, and no write of zero bytes.
        assert counts["write"].bytes == data_bytes and counts["zero"].count == counts["trim"].count == 0
    with counted_target() as (uri, stats, memory):
        assert run(str(tmp_path / "src.img"), uri).returncode == 0
        assert stats.snapshot()["zero"].count > 0  # without it, the holes are zeroed


def test_allocated_writes_zeros_as_data_and_request_size_bounds_requests(tmp_path: Path) -> None:
    image = make_image(tmp_path / "src.img")
    with counted_target() as (uri, stats, memory):
        done = run("--allocated", "--request-size", "256K", "--flush", str(tmp_path / "src.img"), uri)
        assert done.returncode == 0, done.stderr
        counts = stats.snapshot()
        assert contents(memory, len(image)) == image
    assert counts["zero"].count == 0 and counts["write"].bytes == len(image)
    assert counts["write"].count >= len(image) // (256 * 1024)  # no request over 256 KiB
    with counted_target() as (uri, stats, memory):
        assert run("--allocated", str(tmp_path / "src.img"), uri).returncode == 0
        unflushed = stats.snapshot()["flush"].count  # the server's own flushes as each connection ends
    assert counts["flush"].count == unflushed + 1  # --flush: one NBD_CMD_FLUSH
    bad = run("--allocated", "--destination-is-zero", str(tmp_path / "src.img"), "null:")
    assert bad.returncode == 1 and b"contradict" in bad.stderr


def test_stdin_to_nbd_and_nbd_to_stdout_keep_the_checksum(tmp_path: Path) -> None:
    image = make_image(tmp_path / "src.img")
    digest = hashlib.sha256(image).hexdigest()
    with counted_target() as (uri, stats, memory):
        piped = subprocess.run(f"cat {tmp_path / 'src.img'} | {' '.join(CLI)} - {uri}", shell=True,
                               capture_output=True, timeout=60, env=PEER_ENV)  # fmt: skip
        assert piped.returncode == 0, piped.stderr
        assert contents(memory, len(image)) == image
        # The stream's zero chunks went as zero requests, not as data.
        assert stats.snapshot()["write"].bytes < len(image)
        out = subprocess.run(f"{' '.join(CLI)} {uri} - | sha256sum", shell=True, capture_output=True, timeout=60,
                             env=PEER_ENV)  # fmt: skip
        assert out.returncode == 0 and out.stdout.split()[0].decode() == digest
    # And files at either end of a stream.
    back = tmp_path / "back.img"
    with open(tmp_path / "src.img", "rb") as stdin:
        assert run("-", str(back), stdin=stdin).returncode == 0
    assert back.read_bytes() == image and os.stat(back).st_blocks * 512 < len(image)  # its holes kept
    assert hashlib.sha256(run(str(tmp_path / "src.img"), "-").stdout).hexdigest() == digest


def test_stdin_larger_than_the_destination_is_an_error(tmp_path: Path) -> None:
    make_image(tmp_path / "src.img")
    with counted_target(4 * MIB) as (uri, _, _), open(tmp_path / "src.img", "rb") as stdin:
        done = run("-", uri, stdin=stdin)
    assert done.returncode == 1 and b"more than the 4194304 bytes" in done.stderr


def test_progress_lines_on_a_descriptor_parse_and_end_at_100(tmp_path: Path) -> None:
    make_image(tmp_path / "src.img")
    read_end, write_end = os.pipe()
    with counted_target() as (uri, _, _):
        proc = subprocess.Popen([*CLI, "--request-size", "256K", f"--progress={write_end}", str(tmp_path / "src.img"),
                                 uri], pass_fds=(write_end,), env=PEER_ENV, stderr=subprocess.PIPE)  # fmt: skip
        os.close(write_end)
        with os.fdopen(read_end, "rb") as lines:
            text = lines.read().decode()
        assert proc.wait(60) == 0
    percents = []
    for line in text.splitlines():
        numerator, denominator = line.split("/")
        assert denominator == "100"
        percents.append(int(numerator))
    assert percents == sorted(set(percents)) and percents[-1] == 100 and len(percents) > 2
    # --progress SRC DST: the optional FD is not taken from SRC.
    assert run("--progress", str(tmp_path / "src.img"), "null:").returncode == 0
    assert run("--progress=99", str(tmp_path / "src.img"), "null:").returncode == 1


def test_copy_api_options(tmp_path: Path) -> None:
    image = make_image(tmp_path / "src.img")
    with counted_target() as (uri, stats, memory):
        progress = nt.copy(str(tmp_path / "src.img"), uri, destination_is_zero=True, request_size=128 * 1024)
        assert progress.copied == progress.total == len(image) and progress.data == sum(n for _, n in DATA)
        assert contents(memory, len(image)) == image
        assert stats.snapshot()["zero"].count == 0
        with pytest.raises(ValueError, match="request size 0"):
            nt.copy(str(tmp_path / "src.img"), uri, request_size=0)
