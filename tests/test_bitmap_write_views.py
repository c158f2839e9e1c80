"""Writes received in place through a bitmap filter: the filter offers the device's write views, marks a write's
granules (and lets backup views copy aside) when the engine asks for the view, before any payload arrives, and
knows when the write is over (``write_view_ended``, called by the serving logic when the request is carried
out or the connection ends part-way), so that ``quiesced`` waits for exactly the writes still landing. On both
backends, with a client that goes away mid-payload, and with nbdcopy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto
import nbdproto_threads
from nbdproto import Command
from nbdproto.devices import FileDevice, MemoryDevice
from nbdproto.devices.bitmaps import DirtyBitmapFilter, MemoryBitmapStore
from tests.conftest import require_peers
from tests.nbdbytes import request
from tests.serving import BACKENDS, Export, serve_exports
from tests.test_bad_input import RawClient
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)
KIB, MIB = 1 << 10, 1 << 20
CONTEXT = "qemu:dirty-bitmap:"


class CountingFile(FileDevice):
    """A FileDevice that counts the writes handed to its pwrite."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.pwrites = 0

    def pwrite(self, data: nbdproto.Buffer, offset: int, fua: bool = False) -> None:
        self.pwrites += 1
        super().pwrite(data, offset, fua)


class SlowStore(MemoryBitmapStore):
    """A store that says its marks wait on a disk: the filter then gives no view for granules to mark."""

    dispatch: nbdproto.Dispatch = "batch"


@pytest.fixture
def shm_file() -> Iterator[str]:
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="nbdproto-bitmap-view-") as file:
        file.write(bytes(16 * MIB))
        file.flush()
        yield file.name


def dirty(tracked: DirtyBitmapFilter, name: str) -> list[tuple[int, int]]:
    out, position = [], 0
    for length, flags in tracked.extents(CONTEXT + name, 0, tracked.size):
        if flags:
            out.append((position, length))
        position += length
    return out


# --- The filter ---------------------------------------------------------------------------------------------


def test_the_filter_offers_views_where_the_device_does_and_marks_before_the_payload(shm_file: str) -> None:
    assert getattr(DirtyBitmapFilter(MemoryDevice(MIB)), "write_view", None) is None
    with DirtyBitmapFilter(FileDevice(shm_file)) as tracked:
        tracked.bitmap_add("b", 64 * KIB)
        view = tracked.write_view(MIB + 10, 300 * KIB)
        assert view is not None and len(view) == 300 * KIB
        assert dirty(tracked, "b") == [(MIB, 320 * KIB)]  # marked before a byte arrived
        view[:] = b"\x01" * (300 * KIB)  # what the kernel's receive does
        tracked.write_view_ended(view)
        tracked.write_view_ended(view)  # told twice: ignored
        assert tracked._viewing == set()


def test_a_quiesce_waits_for_a_write_still_landing_in_place_and_closes_the_door(shm_file: str) -> None:
    with DirtyBitmapFilter(FileDevice(shm_file)) as tracked:
        view = tracked.write_view(0, 64 * KIB)
        assert view is not None
        entered = threading.Event()
        added = threading.Event()

        def checkpoint() -> None:
            with tracked.quiesced():
                entered.set()
                tracked.bitmap_add("late", 4096)
            added.set()

        thread = threading.Thread(target=checkpoint)
        thread.start()
        wait_until(lambda: tracked._views_closed, "the checkpoint closing the door to write views", timeout=10)
        assert tracked.write_view(MIB, 4096) is None  # the door is closed: this write comes through pwrite
        assert not entered.wait(0.2)  # the payload still landing holds the instant back
        tracked.pwrite(b"p", 2 * MIB)  # while pwrites go on (nothing holds them yet)
        view[:] = b"\x02" * (64 * KIB)
        tracked.write_view_ended(view)
        assert added.wait(10)
        thread.join(10)
        assert dirty(tracked, "late") == []  # the write landed before the bitmap started
        again = tracked.write_view(3 * MIB, 4096)
        assert again is not None  # the door is open again
        tracked.write_view_ended(again)
        assert dirty(tracked, "late") == [(3 * MIB, 4096)]


def test_no_view_where_a_mark_would_wait_on_the_store_until_the_granules_are_dirty(shm_file: str) -> None:
    with DirtyBitmapFilter(FileDevice(shm_file), SlowStore()) as tracked:
        tracked.bitmap_add("b", 64 * KIB)
        assert tracked.write_view(0, 4096) is None  # the mark would wait: pwrite, in a worker thread
        tracked.pwrite(b"x", 0)
        view = tracked.write_view(0, 4096)
        assert view is not None  # the granule is dirty: nothing to wait for
        tracked.write_view_ended(view)


def test_a_write_in_place_lets_backup_views_copy_aside_first(shm_file: str) -> None:
    with DirtyBitmapFilter(FileDevice(shm_file)) as tracked:
        tracked.pwrite(b"\x03" * MIB, 0)
        backup = tracked.checkpoint("cp", granularity=64 * KIB)
        view = tracked.write_view(100 * KIB, 200 * KIB)
        assert view is not None
        assert backup.status().copied_bytes == 256 * KIB  # before the payload: its four granules
        view[:] = b"\x04" * (200 * KIB)
        tracked.write_view_ended(view)
        copy = bytearray(MIB)
        backup.pread_into(memoryview(copy), 0)
        assert copy == b"\x03" * MIB


# --- Servers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_servers_receive_writes_in_place_through_a_bitmap(backend: str, shm_file: str) -> None:
    inner = CountingFile(shm_file)
    with DirtyBitmapFilter(inner) as tracked, serve_exports(backend, {"": Export(tracked)}) as uri:
        tracked.bitmap_add("b", 64 * KIB)
        with nbdproto_threads.connect(uri.format(""), timeout=20) as client:
            for index in range(12):
                client.pwrite(bytes([index + 1]) * MIB, index * MIB + 4096, fua=index == 11)
        assert inner.pwrites < 12  # the payloads came straight into the file
        with tracked.quiesced(timeout=10):  # nothing is left landing
            assert dirty(tracked, "b") == [(0, 12 * MIB + 64 * KIB)]
        with open(shm_file, "rb") as file:
            file.seek(5 * MIB + 4096)
            assert file.read(MIB) == b"\x06" * MIB


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_gone_mid_payload_in_place_leaves_no_write_landing(backend: str, shm_file: str) -> None:
    inner = CountingFile(shm_file)
    with DirtyBitmapFilter(inner) as tracked, serve_exports(backend, {"": Export(tracked)}) as uri:
        tracked.bitmap_add("b", 64 * KIB)
        port = int(uri.split(":")[2].split("/")[0])
        raw = RawClient(("127.0.0.1", port))
        raw.go("")
        raw.sock.sendall(request(Command.WRITE, 1, 0, MIB) + b"\x01" * MIB)  # streaming: the next goes in place
        assert raw.recv_exactly(16)[4:8] == bytes(4)
        raw.sock.sendall(request(Command.WRITE, 2, 4 * MIB, MIB) + b"\x02" * (MIB // 2))
        wait_until(lambda: tracked._viewing, "the server receiving the write in place", timeout=20)
        raw.sock.shutdown(socket.SHUT_RDWR)
        raw.sock.close()
        with tracked.quiesced(timeout=20):  # the connection's end ended the write: no hang
            assert tracked._viewing == set()
        assert dirty(tracked, "b") == [(0, MIB), (4 * MIB, MIB)]  # the half-written payload is dirty
        with nbdproto_threads.connect(uri.format(""), timeout=20) as client:
            client.pwrite(b"\x09" * MIB, 8 * MIB)
            assert client.pread(MIB, 8 * MIB) == b"\x09" * MIB


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_nbdcopy_writes_through_a_bitmap_land_in_place_whole(backend: str, shm_file: str, tmp_path: Any) -> None:
    require_peers("nbdcopy")
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(16 * MIB))
    inner = CountingFile(shm_file)
    with DirtyBitmapFilter(inner) as tracked, serve_exports(backend, {"": Export(tracked)}) as uri:
        tracked.bitmap_add("b", 64 * KIB)
        subprocess.run(
            [shutil.which("nbdcopy") or "nbdcopy", "--connections=4", "--request-size=262144", str(source),
             uri.format("")],
            check=True,
            timeout=120,
        )  # fmt: skip
        assert inner.pwrites < 64  # of 64 writes of 256 KiB: most came in place
        assert dirty(tracked, "b") == [(0, 16 * MIB)]
    with open(shm_file, "rb") as file:
        assert file.read() == source.read_bytes()


# --- The serving logic's side ---------------------------------------------------------------------------------


class Recording:
    """A device that records the views it is told have ended, and takes batches (``call_batch``)."""

    def __init__(self) -> None:
        self.ended: list[memoryview] = []
        self.flushes = 0

    def write_view_ended(self, view: memoryview) -> None:
        self.ended.append(view)

    def flush(self) -> None:
        self.flushes += 1

    def call_batch(self, calls: list[nbdproto.DeviceCall]) -> list[Any]:
        return [getattr(self, call.method)(*call.args, **call.kwargs) for call in calls]


def test_carrying_out_a_write_in_place_ends_its_view_before_the_reply() -> None:
    device = Recording()
    views = [memoryview(bytearray(10)) for _ in range(3)]
    plain = nbdproto.WriteRequest(1, 0, views[0], nbdproto.CommandFlags(0), in_place=True)
    durable = nbdproto.WriteRequest(2, 0, views[1], nbdproto.CommandFlags.FUA, in_place=True)
    assert type(nbdproto.serving.carry_out(device, plain, {})) is nbdproto.SuccessReply
    assert type(nbdproto.serving.carry_out(device, durable, {})) is nbdproto.SuccessReply
    batched = nbdproto.WriteRequest(3, 0, views[2], nbdproto.CommandFlags.FUA, in_place=True)
    (reply,) = nbdproto.serving.carry_out_all(device, [batched], {})
    assert type(reply) is nbdproto.SuccessReply
    assert [id(view) for view in device.ended] == [id(view) for view in views] and device.flushes == 2
