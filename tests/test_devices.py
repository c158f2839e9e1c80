"""MemoryDevice and FileDevice against a plain bytearray model, and their allocation reports."""

from __future__ import annotations

import errno
import os
import threading
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbdproto as n
import nbdproto.serving
from nbdproto.devices import FileDevice, MemoryDevice, SharedMemoryDevice
from tests.threaded import run_threads

SIZE = 1 << 20
HOLE = n.AllocationState.HOLE | n.AllocationState.ZERO

operations = st.lists(
    st.tuples(
        st.sampled_from(["write", "trim", "zero", "zero-no-hole", "read", "extents"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 200_000),
    ),
    max_size=25,
)


@pytest.fixture(params=["memory", "file-tmp", "file-shm"])
def make_device(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    def make() -> Any:
        if request.param == "memory":
            return MemoryDevice(SIZE)
        directory = str(tmp_path) if request.param == "file-tmp" else "/dev/shm"
        path = os.path.join(directory, f"nbdproto-test-{os.getpid()}-{threading.get_ident()}.img")
        with open(path, "wb") as f:
            f.truncate(SIZE)
        device = FileDevice(path)
        os.unlink(path)  # the open descriptor keeps it alive
        return device

    return make


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_device_behaves_like_a_bytearray(make_device: Any, ops: list[tuple[str, int, int]]) -> None:
    device = make_device()
    model = bytearray(SIZE)
    try:
        for op, offset, length in ops:
            length = min(length, SIZE - offset)
            if op == "write":
                data = os.urandom(length)
                device.pwrite(data, offset, fua=length % 2 == 0)
                model[offset : offset + length] = data
            elif op in ("trim", "zero", "zero-no-hole"):
                if op == "trim":
                    device.trim(offset, length)
                else:
                    device.write_zeroes(offset, length, may_trim=op == "zero")
                model[offset : offset + length] = bytes(length)
            elif op == "read":
                buffer = memoryview(bytearray(length))
                device.pread_into(buffer, offset)
                assert bytes(buffer) == model[offset : offset + length]
                if isinstance(device, FileDevice):
                    view = device.read_view(offset, length)  # none for a sparse file in memory
                    if view is None:
                        assert device.in_memory
                    else:
                        assert bytes(view) == model[offset : offset + length]
            else:
                extents = device.extents(n.BASE_ALLOCATION, offset, length)
                assert extents and all(e_len > 0 for e_len, _ in extents)
                position = offset
                for e_len, status in extents:
                    if status & n.AllocationState.ZERO:
                        assert model[position : position + min(e_len, offset + length - position)].count(0) == min(
                            e_len, offset + length - position
                        ), "a range reported as zero holds data"
                    position += e_len
        device.flush()
        whole = memoryview(bytearray(SIZE))
        device.pread_into(whole, 0)
        assert bytes(whole) == model
    finally:
        device.close()


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_out_of_range_is_einval_for_reads_and_enospc_for_writes(kind: str, tmp_path: Any) -> None:
    if kind == "memory":
        device: Any = MemoryDevice(SIZE)
    else:
        path = tmp_path / "d.img"
        path.write_bytes(bytes(SIZE))
        device = FileDevice(path)
    with pytest.raises(OSError) as read_error:
        device.pread_into(memoryview(bytearray(10)), SIZE - 5)
    assert read_error.value.errno == errno.EINVAL
    with pytest.raises(OSError) as write_error:
        device.pwrite(b"x" * 10, SIZE - 5)
    assert write_error.value.errno == errno.ENOSPC
    device.close()


def test_file_device_views_follow_writes_and_outlive_close(tmp_path: Any) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(os.urandom(SIZE))
    device = FileDevice(path)
    view = device.read_view(4096, 8192)
    assert view is not None and view.readonly and bytes(view) == path.read_bytes()[4096 : 4096 + 8192]
    device.pwrite(b"x" * 100, 5000)  # the mapping and the descriptor share one page cache
    assert bytes(view[904:1004]) == b"x" * 100
    with pytest.raises(OSError) as error:
        device.read_view(SIZE - 5, 10)
    assert error.value.errno == errno.EINVAL
    device.close()  # a reply still queued with a view keeps the mapping alive
    assert bytes(view[904:1004]) == b"x" * 100
    assert device.read_view(0, 10) is None


def _read_as_a_server_does(device: FileDevice, offset: int, length: int) -> bytes:
    view = device.read_view(offset, length)
    if view is not None:
        return bytes(view)
    buffer = bytearray(length)
    device.pread_into(memoryview(buffer), offset)
    return bytes(buffer)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs tmpfs at /dev/shm")
def test_reading_a_sparse_file_in_memory_does_not_fill_its_holes() -> None:
    # A hole of a tmpfs file touched through a mapping is allocated; read with pread, it stays a hole.
    with open(f"/dev/shm/nbdproto-test-{os.getpid()}.img", "w+b") as f:
        try:
            f.write(os.urandom(SIZE))
            f.flush()
            with FileDevice(f.name) as device:
                assert device.in_memory and device.read_view(0, 4096) is not None  # no holes: views
                device.trim(SIZE // 2, SIZE // 2)
                assert device.read_view(0, 4096) is None  # a hole now: reads go through pread
                assert _read_as_a_server_does(device, 0, SIZE)[SIZE // 2 :] == bytes(SIZE // 2)
            assert os.fstat(f.fileno()).st_blocks * 512 == SIZE // 2
        finally:
            os.unlink(f.name)
    memory = SharedMemoryDevice(64 << 20)
    assert _read_as_a_server_does(memory, 0, 64 << 20) == bytes(64 << 20) and memory.allocated == 0
    memory.close()


def test_an_empty_file_has_no_view(tmp_path: Any) -> None:
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    with FileDevice(path) as device:
        assert device.read_view(0, 0) is None


def test_a_huge_memory_device_costs_only_what_is_written() -> None:
    tracemalloc.start()
    device = MemoryDevice(1 << 40)  # 1 TiB
    empty = tracemalloc.get_traced_memory()[0]
    device.pwrite(os.urandom(1 << 20), 1 << 39)
    written = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert empty < 1 << 16
    assert (1 << 20) <= written - empty < 2 * (1 << 20)
    assert device.extents(n.BASE_ALLOCATION, 0, 1 << 30) == [(1 << 30, HOLE)]


def test_memory_device_is_safe_from_many_threads() -> None:
    device = MemoryDevice(SIZE)

    def writer(i: int) -> None:
        for _ in range(50):
            device.pwrite(bytes([i]) * 4096, i * 4096)

    run_threads(writer, 32)
    for i in range(32):
        buffer = memoryview(bytearray(4096))
        device.pread_into(buffer, i * 4096)
        assert bytes(buffer) == bytes([i]) * 4096


def test_file_device_reports_the_holes_of_a_sparse_file(tmp_path: Any) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(2 << 20)
        f.write(os.urandom(1 << 20))
    with FileDevice(path) as device:
        assert device.extents(n.BASE_ALLOCATION, 0, 8 << 20) == [(2 << 20, HOLE), (1 << 20, 0), (5 << 20, HOLE)]
        device.trim(2 << 20, 1 << 20)
        assert device.extents(n.BASE_ALLOCATION, 0, 8 << 20) == [(8 << 20, HOLE)]


def test_read_only_devices_refuse_writes(tmp_path: Any) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    for device in (MemoryDevice(4096, read_only=True), FileDevice(path, read_only=True)):
        assert not device.capabilities.can_write
        with pytest.raises(OSError) as info:
            device.pwrite(b"x", 0)
        assert info.value.errno == errno.EROFS
        device.close()


def test_capabilities_become_transmission_flags() -> None:
    caps = MemoryDevice(SIZE).capabilities
    writable = n.serving.export_for("d", SIZE, caps, read_only=False).flags
    assert writable & n.TransmissionFlags.SEND_TRIM and writable & n.TransmissionFlags.SEND_FAST_ZERO
    assert not writable & n.TransmissionFlags.READ_ONLY
    read_only = n.serving.export_for("d", SIZE, caps).flags  # read-only is the default
    assert read_only & n.TransmissionFlags.READ_ONLY
    assert not read_only & (n.TransmissionFlags.SEND_TRIM | n.TransmissionFlags.SEND_FUA)
    with pytest.raises(ValueError, match="power of two"):
        n.DeviceCapabilities(minimum_block_size=3)


def test_an_export_spec_can_override_block_sizes() -> None:
    spec = n.ExportSpec(MemoryDevice(SIZE), block_sizes=(4096, 65536, 1 << 20))
    export = spec.export("d")
    assert (export.minimum_block_size, export.preferred_block_size, export.maximum_payload) == (4096, 65536, 1 << 20)
    with pytest.raises(ValueError, match="power of two"):
        n.ExportSpec(MemoryDevice(SIZE), block_sizes=(3, 4096, 1 << 20)).export("d")
