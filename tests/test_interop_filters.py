"""Filters served by our servers (every backend) to the real tools: a cow overlay over a file that must not
change, injected errors that nbdcopy and qemu-io report while other connections go on, a 4 KiB-sector device
that qemu-io writes single bytes to through the blocksize filter, and the stats and log of a qemu-io session."""

from __future__ import annotations

import errno
import io
import json
import os
from typing import Any

import pytest

import nbdproto_threads as nt
from nbdproto.devices import BlockSizeFilter, CowFilter, ErrorFilter, FileDevice, LogFilter, MemoryDevice, StatsFilter
from tests.filtertools import AlignedDevice
from tests.serving import BACKENDS, Export, serve_exports
from tests.test_interop_server import run, sha256

MIB = 1 << 20
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("overlay", ["memory", "file"])
def test_cow_takes_writes_and_leaves_the_base_file_as_it_was(
    backend: str, overlay: str, peers: Any, tmp_path: Any
) -> None:
    peers("qemu-io", "nbdcopy", "nbdinfo")
    base_path, written, out = tmp_path / "base.img", tmp_path / "written.img", tmp_path / "out.img"
    original = os.urandom(8 * MIB)
    base_path.write_bytes(original)
    before = sha256(base_path)
    written.write_bytes(os.urandom(MIB))
    device = CowFilter(
        FileDevice(base_path, read_only=True), overlay=tmp_path / "overlay" if overlay == "file" else None
    )
    with serve_exports(backend, {"disk": Export(device)}) as base:
        uri = base.format("disk")
        io = run(
            "qemu-io", "-f", "raw",
            "-c", "write -P 0xab 1 4095",  # unaligned: copy-up of a block, then the write
            "-c", "write -P 0xcd 3M 1M",
            "-c", "write -z -u 5M 64k",  # zeroes that may be a hole
            "-c", "discard 6M 128k",
            "-c", "read -P 0xab 1 4095",
            "-c", "read -P 0xcd 3M 1M",
            "-c", "read -P 0 5M 64k",
            "-c", "flush",
            uri,
        )  # fmt: skip
        assert "Pattern verification failed" not in io.stdout + io.stderr
        with nt.connect(uri) as client:
            client.pwrite(written.read_bytes(), 6 * MIB + 200_007)  # crosses blocks, unaligned ends
        run("nbdcopy", uri, str(out))
        mapped = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    expected = bytearray(original)
    expected[1:4096] = b"\xab" * 4095
    expected[3 * MIB : 4 * MIB] = b"\xcd" * MIB
    expected[5 * MIB : 5 * MIB + 65536] = bytes(65536)
    expected[6 * MIB : 6 * MIB + 131072] = bytes(131072)
    expected[6 * MIB + 200_007 : 7 * MIB + 200_007] = written.read_bytes()
    assert out.read_bytes() == bytes(expected)
    assert sha256(base_path) == before  # the base never changed
    zero = [e for e in mapped if e["offset"] <= 5 * MIB < e["offset"] + e["length"]]
    assert zero and zero[0]["type"] & 2  # block status shows the overlay's zeroes (NBD_STATE_ZERO)
    assert any(e["type"] == 0 for e in mapped)  # and the base's data
    device.close()


def test_injected_errors_reach_nbdcopy_and_qemu_io_and_other_connections_go_on(
    backend: str, peers: Any, tmp_path: Any
) -> None:
    peers("qemu-io", "nbdcopy")
    source = tmp_path / "src.img"
    source.write_bytes(os.urandom(4 * MIB))
    full = ErrorFilter(MemoryDevice(4 * MIB), error=errno.ENOSPC, commands=["write", "zero"])
    # A file on tmpfs: the servers answer its reads with views of its mapping, which the filter hands out.
    shm = f"/dev/shm/nbdproto-test-{os.getpid()}-errors.img"
    with open(shm, "wb") as f:
        f.write(source.read_bytes())
    data = FileDevice(shm)
    os.unlink(shm)  # the open descriptor keeps it alive
    broken = ErrorFilter(data, error=errno.EIO, commands=["read"])
    exports = {"full": Export(full), "broken": Export(broken)}
    with serve_exports(backend, exports) as base:
        with nt.connect(base.format("full")) as bystander:  # a connection open through all the failures
            assert bystander.pread(4, 0) == bytes(4)
            copy = run("nbdcopy", str(source), base.format("full"), check=False)
            assert copy.returncode != 0 and "No space left on device" in copy.stderr
            write = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", base.format("full"), check=False)
            assert "write failed: No space left on device" in write.stdout + write.stderr
            read = run("qemu-io", "-f", "raw", "-c", "read 0 4k", base.format("broken"), check=False)
            assert "read failed: Input/output error" in read.stdout + read.stderr
            copy_out = run("nbdcopy", base.format("broken"), "null:", check=False)
            assert copy_out.returncode != 0 and "Input/output error" in copy_out.stderr
            with pytest.raises(OSError) as info:
                bystander.pwrite(b"x", 0)
            assert info.value.errno == errno.ENOSPC
            assert bystander.pread(4, 0) == bytes(4)  # the same connection still serves
            bystander.flush()
        with nt.connect(base.format("full")) as later:  # and so does the server, to new connections
            assert later.pread(4, 4 * MIB - 4) == bytes(4)
            assert later.block_status(MIB, 0)["base:allocation"]
    data.close()


def test_qemu_io_writes_single_bytes_to_a_4k_sector_device(backend: str, peers: Any, tmp_path: Any) -> None:
    peers("qemu-io", "nbdinfo", "nbdcopy")
    sectors = AlignedDevice(4 * MIB, minimum=4096, maximum=65536)
    device = BlockSizeFilter(sectors)
    out = tmp_path / "out.img"
    with serve_exports(backend, {"disk": Export(device)}) as base:
        uri = base.format("disk")
        info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
        assert info["block_size_minimum"] == 1
        io = run(
            "qemu-io", "-f", "raw",
            "-c", "write -P 0x41 1 1",
            "-c", "write -P 0x42 4095 2",
            "-c", "write -P 0x43 5000 10000",
            "-c", "write -P 0x44 100000 200000",  # longer than the device's 64 KiB: split as well
            "-c", "write -z 20003 5",
            "-c", "read -P 0x41 1 1",
            "-c", "read -P 0x42 4095 2",
            "-c", "read -P 0x43 5000 10000",
            "-c", "read -P 0x44 100000 200000",
            "-c", "read -P 0 20003 5",
            "-c", "read -P 0 0 1",
            "-c", "read -P 0 2 4093",
            uri,
        )  # fmt: skip
        assert "Pattern verification failed" not in io.stdout + io.stderr and "failed" not in io.stdout, io.stdout
        run("nbdcopy", uri, str(out))
    expected = bytearray(4 * MIB)
    expected[1] = 0x41
    expected[4095:4097] = b"\x42\x42"
    expected[5000:15000] = b"\x43" * 10000
    expected[100000:300000] = b"\x44" * 200000
    expected[20003:20008] = bytes(5)
    assert out.read_bytes() == bytes(expected)
    assert not sectors.violations and sectors.calls  # every request the device saw was whole sectors


def test_stats_and_log_count_what_qemu_io_did(backend: str, peers: Any) -> None:
    peers("qemu-io")
    out = io.StringIO()
    stats = StatsFilter(MemoryDevice(8 * MIB))
    with serve_exports(backend, {"disk": Export(LogFilter(stats, out))}) as base:
        run(
            "qemu-io", "-f", "raw",
            "-c", "write -P 1 0 4k",
            "-c", "write -P 2 64k 8k",
            "-c", "read 0 12k",
            "-c", "write -z 1M 64k",
            "-c", "discard 2M 64k",
            "-c", "flush",
            base.format("disk"),
        )  # fmt: skip
    counted = {name: (s.count, s.bytes, s.errors) for name, s in stats.snapshot().items()}
    assert counted["write"] == (2, 12288, 0) and counted["read"] == (1, 12288, 0)
    assert counted["zero"] == (1, 65536, 0) and counted["trim"] == (1, 65536, 0)
    assert counted["flush"][0] >= 1 and counted["extents"] == counted["cache"] == (0, 0, 0)
    requests = [line.split()[3:] for line in out.getvalue().splitlines() if " ..." not in line]
    # qemu-io's default cache mode is writethrough: its writes carry FUA.
    assert ["Write", "id=1", "offset=0x0", "length=0x1000", "flags=fua"] in requests
    assert ["Read", "id=3", "offset=0x0", "length=0x3000"] in requests
    assert [r[0] for r in requests if r[0] != "Flush"] == ["Write", "Write", "Read", "Zero", "Trim"]
    assert len(out.getvalue().splitlines()) == 2 * len(requests)
