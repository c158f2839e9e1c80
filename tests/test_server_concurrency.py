"""Many requests in flight on one connection: replies out of order, and memory bounded under a write flood.

Runs against the anyio server (asyncio, trio) and the threads server in worker mode; a device that delays
some requests makes the order visible.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import tracemalloc
from collections.abc import Sequence

import pytest

import nbdproto as n
import nbdproto.wire
from nbdproto.devices import FileDevice, MemoryDevice
from tests.nbdbytes import request
from tests.serving import Export, serve_exports
from tests.test_bad_input import RawClient

MIB = 1 << 20
pytestmark = pytest.mark.timeout(60)
CONCURRENT_BACKENDS = [("threads", 16), ("asyncio", 0), ("trio", 0)]


class SlowDevice:
    """A MemoryDevice whose reads of the first 64 KiB wait (30 s at most) until ``release`` is set, and whose
    every write takes ``write_delay`` seconds (a slow disk)."""

    def __init__(self, size: int, write_delay: float = 0.0) -> None:
        self.inner = MemoryDevice(size)
        self.write_delay = write_delay
        self.release = threading.Event()

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def capabilities(self) -> n.DeviceCapabilities:
        return self.inner.capabilities

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        if offset < 65536:
            self.release.wait(30)
        self.inner.pread_into(buffer, offset)

    def pwrite(self, data: bytes, offset: int, fua: bool = False) -> None:
        time.sleep(self.write_delay)  # the device under test is slow on purpose: slower than the client sends
        self.inner.pwrite(data, offset, fua)

    def flush(self) -> None:
        self.inner.flush()

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return self.inner.extents(context, offset, length)

    def close(self) -> None:
        self.inner.close()


def port_of(base: str) -> int:
    return int(base.split(":")[2].split("/")[0])


@pytest.mark.parametrize(("backend", "workers"), CONCURRENT_BACKENDS, ids=[b for b, _ in CONCURRENT_BACKENDS])
def test_64_requests_in_flight_are_answered_out_of_order(backend: str, workers: int) -> None:
    device = SlowDevice(16 * MIB)
    for i in range(64):
        device.inner.pwrite(bytes([i]) * 4096, i * 65536 * 2)
    with serve_exports(backend, {"d": Export(device)}, workers=workers) as base:
        client = RawClient(("127.0.0.1", port_of(base)))
        client.go("d")
        # Cookie 0 reads the slow first block, which waits until the other 63 were answered: they must overtake
        # it (a server that answered in order would keep the client waiting here until the device gave up).
        client.sock.sendall(b"".join(request(n.Command.READ, i, i * 65536 * 2, 4096) for i in range(64)))
        order = []
        for _ in range(64):
            magic, error, cookie = struct.unpack(">IIQ", client.recv_exactly(16))
            assert magic == n.wire.SIMPLE_REPLY_MAGIC and error == 0
            assert client.recv_exactly(4096) == bytes([cookie]) * 4096
            order.append(cookie)
            if len(order) == 63:
                device.release.set()
        client.close()
    assert sorted(order) == list(range(64))
    assert order[-1] == 0, f"the slow read should finish last, got order {order[:5]}..."


@pytest.mark.parametrize(("backend", "workers"), CONCURRENT_BACKENDS, ids=[b for b, _ in CONCURRENT_BACKENDS])
def test_a_write_flood_cannot_make_the_server_buffer_it(backend: str, workers: int) -> None:
    limit = 8 * MIB
    total = 160 * MIB
    # Writes slower than the client can send them: without backpressure the server would buffer the flood.
    device = SlowDevice(16 * MIB, write_delay=0.05)
    device.inner.pwrite(bytes(16 * MIB), 0)  # allocate the device's pages now, so the peak measures the server
    payload = os.urandom(MIB)
    with serve_exports(backend, {"d": Export(device)}, workers=workers, max_bytes_in_flight=limit) as base:
        client = RawClient(("127.0.0.1", port_of(base)))
        client.go("d")
        count = total // len(payload)
        replies: dict[int, int] = {}

        def read_replies() -> None:
            # Replies come in any order: collect them by cookie.
            for _ in range(count):
                magic, error, cookie = struct.unpack(">IIQ", client.recv_exactly(16))
                assert magic == n.wire.SIMPLE_REPLY_MAGIC
                replies[cookie] = error

        reader = threading.Thread(target=read_replies, daemon=True)
        reader.start()
        tracemalloc.start()
        try:
            for cookie in range(count):
                client.sock.sendall(request(n.Command.WRITE, cookie, (cookie % 16) * MIB, len(payload)) + payload)
            reader.join(30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        client.close()
    assert not reader.is_alive() and replies == dict.fromkeys(range(count), 0)
    # What the server may hold: the in-flight limit, each write also pinning the rest of the receive chunk it
    # was cut from (up to 256 KiB), plus one chunk and one payload being gathered, plus this test's own copies.
    assert peak < limit * 1.5 + 8 * MIB, f"peak {peak / MIB:.1f} MiB for a {total // MIB} MiB flood"


@pytest.mark.parametrize(("backend", "workers"), [*CONCURRENT_BACKENDS, ("threads", 0)])
def test_pipelined_reads_of_a_file_see_every_acknowledged_write(backend: str, workers: int) -> None:
    # Plaintext reads of a FileDevice are views of its mapping, queued until the reply is sent: with requests
    # in flight together (and, with workers, carried out at once), each read still returns exactly the data of
    # the writes acknowledged before it was sent, and blocks written meanwhile do not leak into other reads.
    path = f"/dev/shm/nbdproto-test-{os.getpid()}-views.img"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    device = FileDevice(path)
    os.unlink(path)
    block = 65536
    first = [os.urandom(block) for _ in range(64)]
    second = [os.urandom(block) for _ in range(64)]
    try:
        with serve_exports(backend, {"d": Export(device, read_only=False)}, workers=workers) as base:
            client = RawClient(("127.0.0.1", port_of(base)))
            client.go("d")

            def replies(count: int, data_for: dict[int, int]) -> dict[int, bytes]:
                got = {}
                for _ in range(count):
                    magic, error, cookie = struct.unpack(">IIQ", client.recv_exactly(16))
                    assert magic == n.wire.SIMPLE_REPLY_MAGIC and error == 0, (cookie, error)
                    got[cookie] = client.recv_exactly(data_for.get(cookie, 0))
                return got

            client.sock.sendall(b"".join(request(n.Command.WRITE, i, i * block, block) + first[i] for i in range(64)))
            replies(64, {})
            reads = {100 + i: block for i in range(64)}
            client.sock.sendall(b"".join(request(n.Command.READ, 100 + i, i * block, block) for i in range(64)))
            assert replies(64, reads) == {100 + i: first[i] for i in range(64)}
            # Overwrite the even blocks while reading the odd ones, all in flight together.
            mixed = b"".join(
                request(n.Command.WRITE, 200 + i, i * block, block) + second[i]
                if i % 2 == 0
                else request(n.Command.READ, 200 + i, i * block, block)
                for i in range(64)
            )
            client.sock.sendall(mixed)
            got = replies(64, {200 + i: block for i in range(1, 64, 2)})
            assert all(got[200 + i] == first[i] for i in range(1, 64, 2))
            client.sock.sendall(b"".join(request(n.Command.READ, 300 + i, i * block, block) for i in range(64)))
            expected = {300 + i: second[i] if i % 2 == 0 else first[i] for i in range(64)}
            assert replies(64, {300 + i: block for i in range(64)}) == expected
            client.close()
    finally:
        device.close()
