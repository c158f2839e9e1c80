"""The spec's rules that only real servers, clients and devices can show: durability of FLUSH and FUA, what
CAN_MULTI_CONN promises, TCP_NODELAY, how nbdproto copy uses connections and flushes, and what the devices
do for WRITE_ZEROES, FAST_ZERO, CACHE and block status (spec: "Ordering of messages and writes",
"Transmission flags", "Protocol phases", "Request types", "base:allocation metadata context")."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import anyio
import pytest

import nbdproto as n
import nbdproto.serving
import nbdproto_anyio
import nbdproto_threads
from nbdproto.devices import FileDevice, MemoryDevice
from nbdproto.serving._carry_out import carry_out
from nbdproto_anyio._socket import connect_socket
from tests.recording_proxy import RecordingProxy
from tests.serving import BACKENDS, Export, serve_exports
from tests.waiting import wait_until

MIB = 1 << 20
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def shm_file() -> Iterator[str]:
    """A 1 MiB file of data on tmpfs (/dev/shm), removed afterwards."""
    path = f"/dev/shm/nbdproto-rules-{os.getpid()}-{threading.get_ident()}.img"
    with open(path, "wb") as f:
        f.write(b"\x5a" * MIB)
    try:
        yield path
    finally:
        os.unlink(path)


@contextlib.contextmanager
def threads_server(exports: dict[str, Any]) -> Iterator[nbdproto_threads.Server]:
    server = nbdproto_threads.Server(exports, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(10)


def nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


# --- Durability ---------------------------------------------------------------------------------------------------


@pytest.fixture
def fdatasync_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every os.fdatasync the process makes (the real call still happens), by file descriptor."""
    calls: list[int] = []
    real = os.fdatasync

    def recorded(fd: int) -> None:
        real(fd)
        calls.append(fd)

    monkeypatch.setattr(os, "fdatasync", recorded)
    return calls


def test_fua_and_flush_are_answered_only_after_fdatasync(shm_file: str, fdatasync_calls: list[int]) -> None:
    # spec: a FUA write (and trim, write-zeroes) is answered only once durable; FLUSH only once every write
    # answered before it is durable. FileDevice makes data durable with fdatasync, and the reply is built
    # only when the device call returned.
    device = FileDevice(shm_file)
    with threads_server({"d": n.ExportSpec(device, read_only=False)}) as server:
        port = server.address[1]
        with nbdproto_threads.connect(f"nbd://127.0.0.1:{port}/d") as client:
            flags = client.export.flags
            assert flags & n.TransmissionFlags.SEND_FUA and flags & n.TransmissionFlags.SEND_FLUSH
            client.pwrite(b"a" * 4096, 0)
            assert fdatasync_calls == []
            client.pwrite(b"b" * 4096, 4096, fua=True)
            assert fdatasync_calls == [device.fileno()]
            client.flush()
            assert fdatasync_calls == [device.fileno()] * 2
    device.close()
    fua = n.CommandFlags.FUA
    for request in (n.TrimRequest(1, 0, 4096, fua), n.WriteZeroesRequest(2, 0, 4096, fua)):
        device = FileDevice(shm_file)
        before = len(fdatasync_calls)
        assert carry_out(device, request, {}) == n.SuccessReply(request.cookie)
        assert len(fdatasync_calls) == before + 1
        device.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_conn_writes_are_visible_across_connections(backend: str) -> None:
    # spec: with CAN_MULTI_CONN, what one connection wrote and flushed is seen by every other at once.
    with (
        serve_exports(backend, {"d": Export(MemoryDevice(MIB))}) as base,
        nbdproto_threads.connect(base.format("d")) as one,
        nbdproto_threads.connect(base.format("d")) as two,
    ):
        assert one.export.flags & n.TransmissionFlags.CAN_MULTI_CONN
        two.pread(4096, 8192)
        one.pwrite(b"x" * 4096, 8192, fua=True)
        assert bytes(two.pread(4096, 8192)) == b"x" * 4096
        one.pwrite(b"y" * 4096, 8192)
        one.flush()
        assert bytes(two.pread(4096, 8192)) == b"y" * 4096


# --- Sockets ---------------------------------------------------------------------------------------------------


def test_tcp_nodelay_on_every_connection() -> None:
    with threads_server({"d": MemoryDevice(MIB)}) as server:
        uri = f"nbd://127.0.0.1:{server.address[1]}/d"
        with nbdproto_threads.connect(uri) as client:
            assert nodelay(client.stream.sock)
            wait_until(lambda: server.sessions, "the server's session")
            assert all(nodelay(session.stream.sock) for session in server.sessions)

        async def anyio_ends() -> None:
            async with await nbdproto_anyio.connect(uri) as anyio_client:
                assert nodelay(anyio_client.stream.extra(anyio.abc.SocketAttribute.raw_socket))
            acceptor = await nbdproto_anyio.listen(("127.0.0.1", 0))
            outgoing = await connect_socket(acceptor.address)
            accepted = await acceptor.accept()
            assert nodelay(outgoing.sock) and nodelay(accepted.sock)
            for closing in (outgoing, accepted, acceptor):
                await closing.aclose()

        anyio.run(anyio_ends)


# --- nbdproto copy ---------------------------------------------------------------------------------------------


class Recorded:
    """A MemoryDevice that records the order of pwrite and flush calls, and may deny multi-conn."""

    dispatch: n.Dispatch = "threads"

    def __init__(self, multi_conn: bool) -> None:
        self.inner = MemoryDevice(4 * MIB)
        self.log: list[str] = []
        self.capabilities = replace(self.inner.capabilities, can_multi_conn=multi_conn)
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def size(self) -> int:
        return self.inner.size

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        with self.lock:
            self.log.append("write")
        self.inner.pwrite(data, offset, fua)
        with self.lock:
            self.log.append("written")

    def flush(self) -> None:
        with self.lock:
            self.log.append("flush")


@pytest.mark.parametrize("multi_conn", [False, True])
def test_copy_uses_several_connections_only_with_multi_conn_and_flushes_after_every_write(
    multi_conn: bool, tmp_path: Any
) -> None:
    # spec: without CAN_MULTI_CONN a client SHOULD NOT spread its requests over connections; one that does
    # MUST NOT flush before every write it wants covered has its reply.
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(4 * MIB))
    device = Recorded(multi_conn)
    spec = n.ExportSpec(device, read_only=False)  # type: ignore[type-var]
    with threads_server({"d": spec}) as server, RecordingProxy(("127.0.0.1", server.address[1])) as proxy:
        nbdproto_threads.copy(str(source), f"nbd://127.0.0.1:{proxy.port}/d", connections=4)
        connections = len(proxy.connections)
    assert connections == (4 if multi_conn else 1)
    log = device.log
    assert log.count("write") == log.count("written") >= 4
    # The copy's NBD_CMD_FLUSH (and the server's own flush as each connection ends) come after every write.
    assert "flush" in log and log.index("flush") > max(i for i, what in enumerate(log) if what == "written")
    copied = bytearray(4 * MIB)
    device.inner.pread_into(memoryview(copied), 0)
    assert copied == source.read_bytes()


# --- Devices ------------------------------------------------------------------------------------------------------


def test_cache_changes_nothing(shm_file: str) -> None:
    for device in (FileDevice(shm_file), MemoryDevice(MIB)):
        device.pwrite(b"c" * 8192, 4096)
        before = bytearray(MIB)
        device.pread_into(memoryview(before), 0)
        assert carry_out(device, n.CacheRequest(1, 0, MIB), {}) == n.SuccessReply(1)
        after = bytearray(MIB)
        device.pread_into(memoryview(after), 0)
        assert after == before
        device.close()


def test_write_zeroes_reads_back_as_zero_and_no_hole_keeps_it_allocated(shm_file: str) -> None:
    device = FileDevice(shm_file)
    flags = n.CommandFlags.NO_HOLE
    assert carry_out(device, n.WriteZeroesRequest(1, 0, 65536, flags), {}) == n.SuccessReply(1)
    assert carry_out(device, n.WriteZeroesRequest(2, 65536, 65536), {}) == n.SuccessReply(2)
    data = bytearray(3 * 65536)
    device.pread_into(memoryview(data), 0)
    assert data == bytes(2 * 65536) + b"\x5a" * 65536
    extents = device.extents(n.BASE_ALLOCATION, 0, 2 * 65536)
    assert extents[0] == (65536, 0)  # NO_HOLE: zeroes written, still allocated
    assert extents[1][1] & n.AllocationState.ZERO  # may trim: a hole that reads as zero
    device.close()


def test_memory_device_keeps_no_hole_zeroes_allocated() -> None:
    device = MemoryDevice(MIB)
    device.pwrite(b"d" * 65536, 0)
    carry_out(device, n.WriteZeroesRequest(1, 0, 2 * 65536, n.CommandFlags.NO_HOLE), {})
    assert device.extents(n.BASE_ALLOCATION, 0, 3 * 65536) == [(2 * 65536, 0), (65536, 3)]
    data = bytearray(2 * 65536)
    device.pread_into(memoryview(data), 0)
    assert data == bytes(2 * 65536)


def test_fast_zero_fails_at_once_with_enotsup_and_changes_nothing(shm_file: str) -> None:
    # tmpfs cannot zero a range without writing zeroes (no FALLOC_FL_ZERO_RANGE): with NO_HOLE, a fast zero
    # must fail before touching anything.
    device = FileDevice(shm_file)
    fast = n.CommandFlags.FAST_ZERO | n.CommandFlags.NO_HOLE
    reply = carry_out(device, n.WriteZeroesRequest(1, 0, 65536, fast), {})
    assert isinstance(reply, n.ErrorReply) and reply.error == n.Errno.ENOTSUP
    data = bytearray(65536)
    device.pread_into(memoryview(data), 0)
    assert data == b"\x5a" * 65536
    slow = carry_out(device, n.WriteZeroesRequest(2, 0, 65536, n.CommandFlags.NO_HOLE), {})
    assert slow == n.SuccessReply(2)  # the same request without FAST_ZERO never fails with ENOTSUP
    device.close()


def test_block_status_alternates_and_keeps_to_whole_sectors(shm_file: str) -> None:
    # spec: consecutive descriptors SHOULD differ, be multiples of 512 where possible, and say what can be
    # easily known (holes read as zeroes).
    memory = MemoryDevice(MIB)
    memory.pwrite(b"m" * 100, 0)
    memory.pwrite(b"m" * 100, 3 * 65536 + 7)
    file = FileDevice(shm_file)
    file.trim(65536, 2 * 65536)
    for device in (memory, file):
        extents = device.extents(n.BASE_ALLOCATION, 0, MIB)
        assert sum(length for length, _ in extents) == MIB
        assert all(length % 512 == 0 for length, _ in extents)
        statuses = [status for _, status in extents]
        assert all(a != b for a, b in itertools.pairwise(statuses))
        assert int(n.AllocationState.HOLE | n.AllocationState.ZERO) in statuses
    file.close()


def test_devices_advertise_only_what_they_do(shm_file: str) -> None:
    # spec: no transmission flag for a feature the export does not support. Neither device can resize, so
    # RESIZE is never advertised; a device that says can_resize gets it, writable exports only.
    TF = n.TransmissionFlags
    for device in (MemoryDevice(MIB), FileDevice(shm_file)):
        flags = n.serving.export_for("d", device.size, device.capabilities, read_only=False).flags
        assert not flags & TF.SEND_RESIZE and flags & TF.SEND_WRITE_ZEROES and flags & TF.SEND_FAST_ZERO
        device.close()
    resizable = n.DeviceCapabilities(can_resize=True, can_fast_zero=True)
    assert n.serving.export_for("d", MIB, resizable, read_only=False).flags & TF.SEND_RESIZE
    flags = n.serving.export_for("d", MIB, resizable).flags
    assert not flags & (TF.SEND_RESIZE | TF.SEND_FAST_ZERO | TF.SEND_WRITE_ZEROES)
    assert not n.serving.export_for("d", MIB, resizable, read_only=False).flags & TF.SEND_FAST_ZERO  # no can_zero
