"""The real tools against ``nbdproto serve s3://...`` on a real object store (SeaweedFS), and images shared
both ways with nbdkit's S3 plugin (Debian's nbdkit-plugin-python with python3-boto3)."""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import nbdproto_threads as nt
from tests.conftest import PEER_ENV, REQUIRE_PEERS
from tests.s3server import SeaweedFS
from tests.sparsefiles import data_ranges
from tests.test_s3 import new_key, serve_s3

KIB, MIB = 1 << 10, 1 << 20
pytestmark = [pytest.mark.timeout(120), pytest.mark.peers]


@contextmanager
def served(store: SeaweedFS, key: str, *args: str) -> Iterator[str]:
    proc, uri = serve_s3(store, key, *args)
    try:
        yield uri
    finally:
        proc.terminate()
        proc.wait(15)


def run(args: list[str], store: SeaweedFS, timeout: float = 90) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**PEER_ENV, **store.env})
    assert done.returncode == 0, f"{args[0]} failed: {done.stderr}"
    return done.stdout


def same_contents(a: str, b: str) -> bool:
    """Byte for byte, reading only where either file has data (holes read as zeros): two mostly sparse 1 GiB
    files are compared without reading their gigabyte of holes."""
    with open(a, "rb") as one, open(b, "rb") as other:
        if os.fstat(one.fileno()).st_size != os.fstat(other.fileno()).st_size:
            return False
        for offset, length in data_ranges(one.fileno()) + data_ranges(other.fileno()):
            if os.pread(one.fileno(), length, offset) != os.pread(other.fileno(), length, offset):
                return False
    return True


def test_nbdinfo_shows_what_the_s3_export_can_do(s3_store: SeaweedFS, peers: Any) -> None:
    peers("nbdinfo")
    with served(s3_store, new_key(), "--size", "8M", "--object-size", "64K") as uri:
        info = json.loads(run(["nbdinfo", "--json", uri], s3_store))
    export = info["exports"][0]
    assert export["export-size"] == 8 * MIB
    assert (export["block_size_minimum"], export["block_size_preferred"]) == (1, 64 * KIB)
    assert export["block_size_maximum"] == 32 * MIB
    for feature in ("can_multi_conn", "can_trim", "can_zero", "can_fast_zero", "can_flush", "can_fua"):
        assert export[feature] is True, feature
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]


def test_nbdcopy_a_1_gib_file_with_10_mib_of_data_in_and_out(s3_store: SeaweedFS, tmp_path: Any, peers: Any) -> None:
    """Sparse: only the objects holding data are stored, block status (nbdinfo --map) shows the rest as holes,
    the copy back is the same, and trimming the data deletes its objects."""
    peers("nbdcopy", "nbdinfo", "nbdsh")
    source, back = str(tmp_path / "source.img"), str(tmp_path / "back.img")
    rng = random.Random(10)
    starts = sorted(rng.sample(range(1024), 10))
    with open(source, "wb") as file:
        file.truncate(1 << 30)
        for start in starts:
            file.seek(start * MIB)
            file.write(rng.randbytes(MIB))
    key = new_key()
    with served(s3_store, key, "--size", "1G", "--object-size", "1M") as uri:
        run(["nbdcopy", source, uri], s3_store)
        # Beside the image's objects, while a writer serves it: its lease.
        assert sorted(s3_store.keys(key + "/")) == [f"{key}/{i:016x}" for i in starts] + [f"{key}/lease"]
        extents = json.loads(run(["nbdinfo", "--map", "--json", uri], s3_store))
        data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
        assert sum(length for _, length in data) == 10 * MIB
        assert sum(e["length"] for e in extents if e["type"] == 3) == (1 << 30) - 10 * MIB
        run(["nbdcopy", uri, back], s3_store)
        assert same_contents(back, source)
        run(["nbdsh", "-u", uri, "-c", "h.trim(h.get_size(), 0)"], s3_store)
        assert list(s3_store.keys(key + "/")) == [f"{key}/lease"]
        assert json.loads(run(["nbdinfo", "--map", "--json", uri], s3_store)) == [
            {"offset": 0, "length": 1 << 30, "type": 3, "description": "hole,zero"}
        ]


def test_a_single_object_served_read_only_copies_out_whole(s3_store: SeaweedFS, tmp_path: Any, peers: Any) -> None:
    peers("nbdcopy", "nbdinfo")
    key, back = new_key(), str(tmp_path / "back.img")
    body = random.Random(2).randbytes(5 * MIB + 4321)
    s3_store.client().put_object(Bucket=s3_store.bucket, Key=key, Body=body)
    with served(s3_store, key) as uri:
        export = json.loads(run(["nbdinfo", "--json", uri], s3_store))["exports"][0]
        assert export["export-size"] == len(body) and export["is_read_only"] is True
        run(["nbdcopy", uri, back], s3_store)
    with open(back, "rb") as file:
        assert file.read() == body


def test_qemu_img_convert_into_and_out_of_the_export(s3_store: SeaweedFS, tmp_path: Any, peers: Any) -> None:
    peers("qemu-img")
    source, back = str(tmp_path / "source.img"), str(tmp_path / "back.img")
    rng = random.Random(3)
    with open(source, "wb") as file:
        file.truncate(6 * MIB)
        for _ in range(12):
            file.seek(rng.randrange(6 * MIB - 100 * KIB))
            file.write(rng.randbytes(rng.randrange(1, 100 * KIB)))
    with served(s3_store, new_key(), "--size", "6M", "--object-size", "256K") as uri:
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, uri], s3_store)
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back], s3_store)
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, uri], s3_store)
    assert same_contents(back, source)


def test_qemu_io_random_writes_of_odd_sizes_and_offsets_read_back(s3_store: SeaweedFS, peers: Any) -> None:
    """Writes of odd lengths at odd offsets (inside objects, across their edges), each with its own pattern,
    then every one read back and checked by qemu-io itself; and a fresh server reads the same."""
    peers("qemu-io")
    rng = random.Random(7)
    size, used = 4 * MIB, 0
    writes = []
    while len(writes) < 40:  # non-overlapping, so each pattern can be checked
        length = rng.randrange(1, 40 * KIB) | 1
        offset = used + rng.randrange(1, 60 * KIB) | 1
        if offset + length > size:
            break
        writes.append((offset, length, rng.randrange(1, 255)))
        used = offset + length
    commands = [c for o, n, p in writes for c in ("-c", f"write -P {p} {o} {n}")]
    checks = [c for o, n, p in writes for c in ("-c", f"read -P {p} {o} {n}")]
    key = new_key()
    with served(s3_store, key, "--size", "4M", "--object-size", "64K") as uri:
        out = run(["qemu-io", "-f", "raw", *commands, *checks, uri], s3_store)
    assert "failed" not in out.lower() and "error" not in out.lower(), out
    with served(s3_store, key, "--size", "4M", "--object-size", "64K") as uri:
        out = run(["qemu-io", "-f", "raw", "-r", *checks, uri], s3_store)
    assert out.count("read ") == len(writes) and "failed" not in out.lower(), out


@functools.cache
def _nbdkit_s3_missing() -> str | None:
    probe = subprocess.run(["nbdkit", "S3", "--version"], capture_output=True, text=True, timeout=30, env=PEER_ENV)
    if probe.returncode != 0:
        return f"nbdkit's S3 plugin is not usable (nbdkit-plugin-python, python3-boto3): {probe.stderr.strip()}"
    return None


def nbdkit_s3(store: SeaweedFS, key: str, size: str, object_size: str, run_command: str) -> None:
    """Run nbdkit's S3 plugin on the image, with ``run_command`` as its captive client ($uri)."""
    why = _nbdkit_s3_missing()
    if why:
        if REQUIRE_PEERS:
            pytest.fail(f"NBDPROTO_REQUIRE_PEERS=1 but {why}")
        pytest.skip(why)
    run(["nbdkit", "-U", "-", "--exit-with-parent", "S3", f"endpoint-url={store.endpoint}", f"bucket={store.bucket}",
         f"key={key}", f"size={size}", f"object-size={object_size}", "--run", run_command], store)  # fmt: skip


def test_an_image_written_by_nbdkits_s3_plugin_reads_the_same_through_ours(
    s3_store: SeaweedFS, tmp_path: Any, peers: Any
) -> None:
    peers("nbdkit", "nbdcopy")
    source, back = str(tmp_path / "source.img"), str(tmp_path / "back.img")
    rng = random.Random(5)
    with open(source, "wb") as file:
        file.truncate(4 * MIB)
        for start in (0, 300 * KIB + 7, 2 * MIB):
            file.seek(start)
            file.write(rng.randbytes(200 * KIB))
    key = new_key()
    nbdkit_s3(s3_store, key, "4M", "64K", f"nbdcopy {source} $uri")  # nbdkit 1.32: objects of at most 64K
    with served(s3_store, key, "--size", "4M", "--object-size", "64K") as uri:
        run(["nbdcopy", uri, back], s3_store)
    assert same_contents(back, source)


def test_an_image_written_through_ours_reads_the_same_through_nbdkits_s3_plugin(
    s3_store: SeaweedFS, tmp_path: Any, peers: Any
) -> None:
    peers("nbdkit", "nbdcopy")
    back = str(tmp_path / "back.img")
    key = new_key()
    rng = random.Random(6)
    expected = bytearray(4 * MIB)
    with served(s3_store, key, "--size", "4M", "--object-size", "64K") as uri, nt.connect(uri) as client:
        for _ in range(30):
            offset = rng.randrange(4 * MIB - 50 * KIB)
            data = rng.randbytes(rng.randrange(1, 50 * KIB))
            client.pwrite(data, offset)
            expected[offset : offset + len(data)] = data
    nbdkit_s3(s3_store, key, "4M", "64K", f"nbdcopy $uri {back}")
    with open(back, "rb") as file:
        assert file.read() == expected
    assert os.path.getsize(back) == 4 * MIB
