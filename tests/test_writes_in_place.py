"""Write payloads received in place (nbdproto.WriteView): a device that offers ``write_view`` (FileDevice on tmpfs
or a memfd) has big writes' payloads received straight into its storage, with no buffer between the socket and
the page cache. The stream, however it is cut, leaves the export as a model says; the receives ask for one header
while big writes stream in; FUA still flushes; shutting down refuses no write that is already written and
receives none in place from then on; TLS never receives in place; and the servers and nbdcopy agree."""

from __future__ import annotations

import errno
import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto
import nbdproto.serving
import nbdproto_threads
from nbdproto import Command, CommandFlags, DeviceCall, Errno, WriteRequest
from nbdproto.devices import (
    DelayFilter,
    ErrorFilter,
    FileDevice,
    Filter,
    LogFilter,
    ReadOnlyFilter,
    SharedMemoryDevice,
    StatsFilter,
)
from nbdproto.serving import RECV_SIZE
from tests.conftest import PEER_ENV, require_peers, unavailable
from tests.nbdbytes import request
from tests.serving import BACKENDS, Export, make_pki, serve_exports
from tests.test_bad_input import RawClient
from tests.test_receive_size import _feed, _transmitting, _writes

SHM = "/dev/shm"
MIB = 1 << 20


class CountingFile(FileDevice):
    """A FileDevice that counts the writes it was handed (pwrite, and how many with FUA) and its flushes."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.pwrites = 0
        self.fua_pwrites = 0
        self.flushes = 0

    def pwrite(self, data: nbdproto.Buffer, offset: int, fua: bool = False) -> None:
        self.pwrites += 1
        self.fua_pwrites += fua
        super().pwrite(data, offset, fua)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def shm_file() -> Iterator[str]:
    """A 16 MiB file of zeroes on tmpfs, written (no holes: reads are views of it too)."""
    with tempfile.NamedTemporaryFile(dir=SHM, prefix="nbdproto-in-place-") as file:
        file.write(bytes(16 * MIB))
        file.flush()
        yield file.name


def _content(path: str, offset: int = 0, length: int = 16 * MIB) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


def _in_place_session(device: FileDevice, *, extended: bool = False) -> nbdproto.serving.ServerSessionLogic:
    logic = _transmitting(device, extended=extended)  # type: ignore[arg-type]
    logic.write_in_place(kernel_receives=True)
    logic.engine.data_to_send()
    return logic


# --- The device --------------------------------------------------------------------------------------------


def test_a_tmpfs_file_hands_out_writable_views_of_its_pages(shm_file: str) -> None:
    with FileDevice(shm_file) as device:
        view = device.write_view(4096 + 10, 5000)
        assert view is not None and not view.readonly and len(view) == 5000
        view[:] = b"\x07" * 5000
        read = device.read_view(4096, 6000)
        assert read is not None and read.readonly  # the views for reads stay read-only
        assert bytes(read[10:5010]) == b"\x07" * 5000
        buffer = bytearray(5000)
        device.pread_into(memoryview(buffer), 4096 + 10)
        assert buffer == b"\x07" * 5000
        view.release()
        read.release()
        assert device.write_view(16 * MIB - 10, 11) is None  # beyond the end: the engine's checks say why
        assert device.write_view(-1, 10) is None


def test_read_only_files_and_files_on_disk_take_writes_with_pwrite(shm_file: str, tmp_path: Any) -> None:
    with FileDevice(shm_file, read_only=True) as device:
        assert device.write_view(0, 4096) is None
    on_disk = tmp_path / "disk.img"
    on_disk.write_bytes(bytes(MIB))
    with FileDevice(on_disk) as device:
        # Only tmpfs and ramfs are written through the mapping (a disk's writeback would fault every page).
        assert (device.write_view(0, 4096) is None) == (not device.in_memory)


def test_shared_memory_exports_receive_in_place() -> None:
    with SharedMemoryDevice(MIB) as device:
        view = device.write_view(0, 8192)
        assert view is not None
        view[:] = b"\x05" * 8192
        buffer = bytearray(8192)
        device.pread_into(memoryview(buffer), 0)
        assert buffer == b"\x05" * 8192
        view.release()


class _Map:
    """Stands in for a device's mapping: counts the pages faulted in (madvise), or fails as told."""

    def __init__(self, real: Any, code: int = 0) -> None:
        self.real, self.code, self.calls = real, code, []  # type: ignore[var-annotated]

    def madvise(self, option: int, start: int, length: int) -> None:
        if self.code:
            raise OSError(self.code, os.strerror(self.code))
        self.calls.append((start, length))
        self.real.madvise(option, start, length)

    def close(self) -> None:
        self.real.close()


def test_pages_that_cannot_be_had_leave_the_write_to_pwrite(shm_file: str) -> None:
    with FileDevice(shm_file) as device:
        real = device._mmap
        device._mmap = _Map(real, errno.EFAULT)  # type: ignore[assignment]  # a full tmpfs
        assert device.write_view(0, 4096) is None
        device._mmap = real
        assert device.write_view(0, 4096) is not None  # room again: in place again
        device._mmap = _Map(real, errno.EINVAL)  # type: ignore[assignment]  # a kernel before 5.14
        assert device.write_view(5 * MIB, 4096) is None
        device._mmap = real
        assert device.write_view(6 * MIB, 4096) is None  # never asked again


def test_a_file_without_holes_is_faulted_in_a_mib_at_a_time_once(shm_file: str) -> None:
    with FileDevice(shm_file) as device:
        device._mmap = counted = _Map(device._mmap)  # type: ignore[assignment]
        for offset in range(MIB // 2, 3 * MIB, 256 << 10):  # writes of 256 KiB over MiBs 0 to 2
            view = device.write_view(offset, 256 << 10)
            assert view is not None
            view.release()
        assert counted.calls == [(0, MIB), (MIB, MIB), (2 * MIB, MIB)]
        assert device.write_view(16 * MIB - 100, 100) is not None and counted.calls[-1] == (15 * MIB, MIB)


def test_a_sparse_file_is_faulted_in_write_by_write() -> None:
    with tempfile.NamedTemporaryFile(dir=SHM, prefix="nbdproto-in-place-") as file:
        file.truncate(4 * MIB)  # all hole: faulting in more than a write's pages would allocate them
        with FileDevice(file.name) as device:
            device._mmap = counted = _Map(device._mmap)  # type: ignore[assignment]
            for _ in range(2):
                view = device.write_view(4096 + 100, 8192)
                assert view is not None
                view.release()
            assert counted.calls == [(4096, 8292)] * 2
            assert os.fstat(file.fileno()).st_blocks * 512 <= 3 * 4096  # the pages written, no more


# --- Carrying them out -------------------------------------------------------------------------------------


def test_a_write_in_place_is_only_its_fua_flush(shm_file: str) -> None:
    with CountingFile(shm_file) as device:
        view = device.write_view(0, 4096)
        assert view is not None
        plain = WriteRequest(1, 0, view, in_place=True)
        fua = WriteRequest(2, 0, view, CommandFlags.FUA, in_place=True)
        assert nbdproto.serving.carry_out(device, plain, {}) == nbdproto.SuccessReply(1)
        assert (device.pwrites, device.flushes) == (0, 0)
        assert nbdproto.serving.carry_out(device, fua, {}) == nbdproto.SuccessReply(2)
        assert (device.pwrites, device.flushes) == (0, 1)
        assert nbdproto.serving.device_calls(plain, {}) == []
        assert nbdproto.serving.device_calls(fua, {}) == [DeviceCall("flush", ())]
        view.release()


_WRITES = st.lists(
    st.tuples(st.integers(0, 3 * MIB), st.integers(1, 300 << 10), st.booleans()), min_size=1, max_size=12
)
_CUTS = st.lists(st.integers(1, 64) | st.integers(4096, 400 << 10), max_size=20)


@settings(max_examples=60, deadline=None)
@given(_WRITES, _CUTS, st.booleans())
def test_a_stream_of_writes_leaves_what_a_model_says_however_it_is_cut(
    writes: list[tuple[int, int, bool]], cuts: list[int], extended: bool
) -> None:
    cuts = [*cuts, 256 << 10]  # receives of a few bytes, of headers, of parts of payloads, of whole writes
    with tempfile.NamedTemporaryFile(dir=SHM, prefix="nbdproto-in-place-") as file:
        file.truncate(4 * MIB)
        with CountingFile(file.name) as device:
            logic = _in_place_session(device, extended=extended)
            model = bytearray(4 * MIB)
            stream = b""
            for cookie, (offset, length, fua) in enumerate(writes, 1):
                payload = bytes([cookie]) * length
                flags = (CommandFlags.FUA if fua else 0) | (CommandFlags.PAYLOAD_LEN if extended else 0)
                stream += request(Command.WRITE, cookie, offset, length, flags, extended=extended) + payload
                model[offset : offset + length] = payload
            pos, turn = 0, 0
            while pos < len(stream):  # a driver whose receives bring whatever the cuts say, at most what it asks
                cut = cuts[turn % len(cuts)]
                turn += 1
                target = logic.engine.write_buffer()
                if target is not None:
                    count = min(len(target), cut, len(stream) - pos)
                    target[:count] = stream[pos : pos + count]
                    logic.received_into_payload(count)
                else:
                    count = min(logic.receive_size, cut, len(stream) - pos)
                    logic.received(stream[pos : pos + count])
                pos += count
                for step in logic.inline_transmission(None):
                    if step is nbdproto.serving.RECEIVE:
                        break
            replies = b"".join(bytes(piece) for piece in logic.engine.data_to_send())  # type: ignore[arg-type]
            if extended:  # one extended reply (32 bytes, NBD_REPLY_TYPE_NONE) a write, in order
                assert [replies[i : i + 4] for i in range(0, len(replies), 32)] == [b"\x6e\x8a\x27\x8c"] * len(writes)
                assert [int.from_bytes(replies[i + 8 : i + 16], "big") for i in range(0, len(replies), 32)] == list(
                    range(1, len(writes) + 1)
                )
            else:
                assert replies == b"".join(_simple_reply(cookie) for cookie in range(1, len(writes) + 1))
            assert _content(file.name, 0, 4 * MIB) == model
            # Every FUA write made durable once: by pwrite's own sync, or in place by a flush.
            assert device.fua_pwrites + device.flushes == sum(fua for _, _, fua in writes)


def test_big_writes_stream_in_with_their_headers_received_alone(shm_file: str) -> None:
    with CountingFile(shm_file) as device:
        logic = _in_place_session(device)
        asked = _feed(logic, _writes(1, 24, 256 << 10))  # 256 KiB writes, as nbdcopy sends them
        # The first write came with the receive of its header and went to a buffer; every payload after it
        # came straight into the file, after a receive of its header alone.
        assert asked[0] == RECV_SIZE and set(asked[1:]) == {28}
        assert device.pwrites == 1
        for cookie in (1, 2, 24):
            assert _content(shm_file, cookie << 18, 256 << 10) == bytes([cookie]) * (256 << 10)
        _feed(logic, _writes(100, 4, 4096))  # the rest of the stream is small: back to small receives
        assert logic.receive_size == RECV_SIZE
        assert _content(shm_file, 100 * 4096, 4096) == bytes([100]) * 4096


def test_with_extended_headers_the_header_received_alone_is_32_bytes(shm_file: str) -> None:
    with CountingFile(shm_file) as device:
        logic = _in_place_session(device, extended=True)
        asked = _feed(logic, _writes(1, 8, 300 << 10, extended=True))
        assert set(asked[1:]) == {32} and device.pwrites == 1
        assert _content(shm_file, 8 * (300 << 10), 300 << 10) == bytes([8]) * (300 << 10)


def test_tls_never_receives_in_place(shm_file: str) -> None:
    with CountingFile(shm_file) as device:
        logic = _transmitting(device)  # type: ignore[arg-type]
        logic.write_in_place(kernel_receives=False)  # OpenSSL would write into the mapping from user space
        assert logic.engine.write_view is None
        logic.engine.data_to_send()
        asked = _feed(logic, _writes(1, 8, 256 << 10))
        assert device.pwrites == 8 and 28 not in asked


def test_shutting_down_receives_nothing_in_place_and_refuses_nothing_written(shm_file: str) -> None:
    with CountingFile(shm_file) as device:
        logic = _in_place_session(device)
        _feed(logic, _writes(1, 2, 256 << 10))  # streaming: the next payload goes in place
        whole = request(Command.WRITE, 3, 3 << 18, 256 << 10) + b"\x03" * (256 << 10)
        logic.received(whole[:28])
        for step in logic.inline_transmission(None):
            if step is nbdproto.serving.RECEIVE:
                break
        target = logic.engine.write_buffer()
        assert target is not None and len(target) == 256 << 10
        target[:] = whole[28:]  # received in place, then the server begins shutting down
        logic.begin_shutdown()
        logic.received_into_payload(256 << 10)
        logic.engine.data_to_send()
        for step in logic.inline_transmission(None):
            if step is nbdproto.serving.RECEIVE:
                break
        assert b"".join(logic.engine.data_to_send()) == _simple_reply(3)  # type: ignore[arg-type]  # it is written
        assert logic.engine.write_view is None
        logic.received(request(Command.WRITE, 4, 4 << 18, 256 << 10))  # from now on refused, and nothing written
        for step in logic.inline_transmission(None):
            if step is nbdproto.serving.RECEIVE:
                break
        target = logic.engine.write_buffer()
        assert target is not None
        target[:] = b"\x04" * (256 << 10)
        logic.received_into_payload(256 << 10)
        for step in logic.inline_transmission(None):
            if step is nbdproto.serving.RECEIVE:
                break
        assert b"".join(logic.engine.data_to_send()) == _simple_reply(4, Errno.ESHUTDOWN)  # type: ignore[arg-type]
        assert _content(shm_file, 4 << 18, 256 << 10) == bytes(256 << 10)


def _simple_reply(cookie: int, error: int = 0) -> bytes:
    return (0x67446698).to_bytes(4, "big") + error.to_bytes(4, "big") + cookie.to_bytes(8, "big")


# --- Servers ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_servers_receive_big_writes_in_place(backend: str, shm_file: str) -> None:
    with CountingFile(shm_file) as device, serve_exports(backend, {"": Export(device)}) as uri:
        with nbdproto_threads.connect(uri.format(""), timeout=20) as client:
            for index in range(12):
                client.pwrite(bytes([index + 1]) * MIB, index * MIB, fua=index == 11)
            assert client.pread(MIB, 5 * MIB) == b"\x06" * MIB
        assert device.pwrites < 12  # after the first write's, the payloads came straight into the file
        for index in range(12):
            assert _content(shm_file, index * MIB, MIB) == bytes([index + 1]) * MIB


@pytest.mark.timeout(60)
def test_tls_servers_take_big_writes_with_pwrite(shm_file: str) -> None:
    with make_pki() as pki, CountingFile(shm_file) as device:
        served = serve_exports("threads", {"": Export(device)}, tls=pki.server_context)
        with served as uri, nbdproto_threads.connect(uri.format(""), tls=pki.client_context, timeout=20) as client:
            for index in range(4):
                client.pwrite(bytes([index + 1]) * MIB, index * MIB)
        assert device.pwrites == 4
        assert _content(shm_file, 3 * MIB, MIB) == b"\x04" * MIB


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_gone_part_way_through_a_payload_in_place_leaves_the_server_serving(
    backend: str, shm_file: str
) -> None:
    with CountingFile(shm_file) as device, serve_exports(backend, {"": Export(device)}) as uri:
        port = int(uri.split(":")[2].split("/")[0])
        raw = RawClient(("127.0.0.1", port))
        raw.go("")
        raw.sock.sendall(request(Command.WRITE, 1, 0, MIB) + b"\x01" * MIB)  # streaming: the next goes in place
        assert raw.recv_exactly(16)[4:8] == bytes(4)
        raw.sock.sendall(request(Command.WRITE, 2, MIB, MIB) + b"\x02" * (MIB // 2))
        raw.sock.shutdown(socket.SHUT_RDWR)
        raw.sock.close()
        with nbdproto_threads.connect(uri.format(""), timeout=20) as client:
            client.pwrite(b"\x09" * MIB, 2 * MIB)
            assert client.pread(MIB, 2 * MIB) == b"\x09" * MIB
            assert client.pread(MIB, 0) == b"\x01" * MIB


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_nbdcopy_writes_land_whole(backend: str, shm_file: str, tmp_path: Any) -> None:
    require_peers("nbdcopy")
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(16 * MIB))
    with CountingFile(shm_file) as device, serve_exports(backend, {"": Export(device)}) as uri:
        subprocess.run(
            ["nbdcopy", "--connections=4", "--request-size=262144", str(source), uri.format("")],
            check=True,
            timeout=60,
        )
        assert device.pwrites < 64  # of 64 writes of 256 KiB: most came in place
    assert _content(shm_file) == source.read_bytes()


@pytest.mark.timeout(60)
def test_writes_in_place_from_many_connections_at_once_land(shm_file: str) -> None:
    with CountingFile(shm_file) as device, serve_exports("threads", {"": Export(device)}) as uri:
        errors: list[BaseException] = []

        def writer(index: int) -> None:
            try:
                with nbdproto_threads.connect(uri.format(""), timeout=20) as client:
                    for step in range(4):
                        client.pwrite(bytes([index * 4 + step + 1]) * MIB, (index * 4 + step) * MIB)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors and not any(thread.is_alive() for thread in threads)
    for block in range(16):
        assert _content(shm_file, block * MIB, MIB) == bytes([block + 1]) * MIB


def test_a_filter_offers_write_views_only_while_writes_and_flushes_pass_through(shm_file: str) -> None:
    with FileDevice(shm_file) as inner:
        filters = [
            Filter(inner),
            DelayFilter(inner, read=1),
            DelayFilter(inner, write=1),
            ErrorFilter(inner, commands=["write"]),
            ErrorFilter(inner, commands=["read"]),
            LogFilter(inner, io.StringIO()),
            StatsFilter(inner),
            ReadOnlyFilter(inner),
        ]
        for made in filters:
            offered = getattr(made, "write_view", None)
            if made.passes_through("pwrite") and made.passes_through("flush"):
                assert offered == inner.write_view, made
            else:
                assert offered is None, made  # a payload in place would skip the filter's pwrite
        assert getattr(Filter(inner), "write_view", None) is not None


def _step(logic: nbdproto.serving.ServerSessionLogic) -> None:
    for step in logic.inline_transmission(None):
        if step in (nbdproto.serving.RECEIVE, nbdproto.serving.RECEIVE_READY):
            break


@pytest.mark.parametrize("extended", [False, True])
def test_one_receive_brings_a_payload_in_place_and_the_header_after_it(shm_file: str, extended: bool) -> None:
    header_size = 32 if extended else 28
    flags = CommandFlags.PAYLOAD_LEN if extended else 0
    with CountingFile(shm_file) as device:
        logic = _in_place_session(device, extended=extended)
        assert logic.in_place_buffers() is None  # nothing streams yet: receive as receive_size says
        _feed(logic, _writes(1, 2, 256 << 10, extended=extended))
        buffers = logic.in_place_buffers()  # streaming in place, between writes: a header alone
        assert buffers is not None and [len(b) for b in buffers] == [header_size]
        stream = b"".join(
            request(Command.WRITE, cookie, cookie << 18, 256 << 10, flags, extended=extended)
            + bytes([cookie]) * (256 << 10)
            for cookie in (3, 4, 5)
        )
        # Receives as recvmsg_into fills them: a header, a payload and the next header, part of a payload, ...
        cuts = [header_size, header_size + (256 << 10), 1000, 7, 300 << 10] * 4
        pos = 0
        for cut in cuts:
            if pos == len(stream):
                break
            buffers = logic.in_place_buffers()
            assert buffers is not None and len(buffers[-1]) == header_size
            room = sum(len(b) for b in buffers)
            count = min(cut, room, len(stream) - pos)
            data, done = stream[pos : pos + count], 0
            for buffer in buffers:
                part = data[done : done + len(buffer)]
                buffer[: len(part)] = part
                done += len(part)
            logic.received_in_place(count)
            pos += count
            _step(logic)
        assert pos == len(stream)
        assert device.pwrites == 1  # the first write of the stream only
        for cookie in (3, 4, 5):
            assert _content(shm_file, cookie << 18, 256 << 10) == bytes([cookie]) * (256 << 10)
        logic.received_in_place(0)  # the client closed
        assert logic.engine.next_event() == nbdproto.ConnectionClosed()


@pytest.mark.parametrize("in_place", [True, False])
def test_a_stream_of_big_writes_is_taken_a_receive_at_a_time_without_the_event_loop(
    shm_file: str, in_place: bool
) -> None:
    """Each receive of a stream of big writes (the rest of a payload and the next header, nbdcopy's pattern)
    hands its write over with one call into the engine (ServerConnection.received_in_place): the steps carry it
    out and ask for the next receive without going through ``next_event``; the export ends as written, every
    write answered in order. Into the device's place, or into each payload's own buffer (TLS)."""
    with CountingFile(shm_file) as device:
        logic = _transmitting(device)  # type: ignore[arg-type]
        logic.write_in_place(kernel_receives=in_place, exact_receives=not in_place)
        logic.engine.data_to_send()
        _feed(logic, _writes(1, 2, 256 << 10))  # streaming in place now, between writes
        replies = logic.engine.data_to_send()
        engine, events = logic.engine, 0
        next_event = engine.next_event

        def counted() -> Any:
            nonlocal events
            events += 1
            return next_event()

        engine.next_event = counted  # type: ignore[method-assign]
        steps = logic.inline_transmission(None)
        assert next(steps) is nbdproto.serving.RECEIVE_READY
        found: int | None = None
        for cookie in range(3, 12):
            if cookie == 4:  # the first header came alone, through next_event: from here on, payload and header
                events = 0
            buffers = logic.in_place_buffers()
            assert buffers is not None
            header = request(Command.WRITE, cookie, cookie << 18, 256 << 10)
            if len(buffers) == 2:
                buffers[0][:] = bytes([cookie - 1]) * (256 << 10)
            buffers[-1][:] = header
            found = sum(len(b) for b in buffers)
            assert steps.send(found) is nbdproto.serving.RECEIVE_READY
        assert events == 0
        buffers = logic.in_place_buffers()
        assert buffers is not None and len(buffers) == 2
        buffers[0][:] = bytes([11]) * (256 << 10)
        assert steps.send(256 << 10) is nbdproto.serving.RECEIVE_READY  # the last payload, no header after it
        assert steps.send(None) is nbdproto.serving.RECEIVE
        replies += logic.engine.data_to_send()
        assert b"".join(replies) == b"".join(_simple_reply(c) for c in range(1, 12))  # type: ignore[arg-type]
        for cookie in range(1, 12):
            assert _content(shm_file, cookie << 18, 256 << 10) == bytes([cookie]) * (256 << 10)
        assert device.pwrites == (1 if in_place else 11)  # in place: the first write of the stream only


def test_writes_handed_over_by_receives_in_a_row_are_all_carried_out_in_order(shm_file: str) -> None:
    # A driver that receives twice before the next batch (none does now) loses no write handed over.
    with CountingFile(shm_file) as device:
        logic = _in_place_session(device)
        _feed(logic, _writes(1, 2, 256 << 10) + request(Command.WRITE, 3, 3 << 18, 256 << 10))
        for cookie in (3, 4):
            buffers = logic.in_place_buffers()
            assert buffers is not None and len(buffers) == 2
            buffers[0][:] = bytes([cookie]) * (256 << 10)
            buffers[1][:] = request(Command.WRITE, cookie + 1, (cookie + 1) << 18, 256 << 10)
            logic.received_in_place(sum(len(b) for b in buffers))
        batch: list[Any] = []
        assert logic.next_batch(batch) is nbdproto.serving.BatchEnd.NEED_DATA
        assert [(type(w), w.cookie) for w in batch] == [(WriteRequest, 3), (WriteRequest, 4)]
        assert logic.engine.write_buffer() is not None  # write 5's payload is next


def test_replies_wait_while_bytes_keep_coming_and_go_out_before_any_wait(shm_file: str) -> None:
    with CountingFile(shm_file) as device:
        logic = _in_place_session(device)
        _feed(logic, _writes(1, 2, 256 << 10))  # streaming in place, the two replies queued or sent
        logic.engine.data_to_send()
        steps = logic.inline_transmission(None)
        assert next(steps) is nbdproto.serving.RECEIVE_READY
        header = request(Command.WRITE, 3, 3 << 18, 256 << 10)
        buffers = logic.in_place_buffers()
        assert buffers is not None and len(buffers) == 1
        buffers[0][:] = header
        # Bytes were waiting: no send, the next receive is tried first.
        assert steps.send(len(header)) is nbdproto.serving.RECEIVE_READY
        buffers = logic.in_place_buffers()
        assert buffers is not None and [len(b) for b in buffers] == [256 << 10, 28]
        buffers[0][:] = b"\x03" * (256 << 10)
        # Write 3 carried out, its reply queued, not sent.
        assert steps.send(256 << 10) is nbdproto.serving.RECEIVE_READY
        assert steps.send(None) is nbdproto.serving.RECEIVE  # nothing waiting: send, then wait
        assert b"".join(logic.engine.data_to_send()) == _simple_reply(3)  # type: ignore[arg-type]
        assert _content(shm_file, 3 << 18, 256 << 10) == b"\x03" * (256 << 10)


def test_a_client_that_never_stops_sending_still_gets_its_replies(shm_file: str) -> None:
    # Replies wait while bytes keep coming, but not for ever: a send at least every READY_IN_A_ROW receives.
    with CountingFile(shm_file) as device:
        logic = _in_place_session(device)
        _feed(logic, _writes(1, 2, 256 << 10))
        logic.engine.data_to_send()
        stream = _writes(3, 150, 64 << 10)  # 150 writes of 64 KiB (over RECV_SIZE with their header): in place
        pos, ready_in_a_row, longest, answered = 0, 0, 0, 0
        steps = logic.inline_transmission(None)
        found: int | None = None
        while True:
            step = steps.send(found)
            found = None
            if step not in (nbdproto.serving.RECEIVE_READY, nbdproto.serving.RECEIVE):
                continue
            if step is nbdproto.serving.RECEIVE:  # the driver sends what is queued first
                answered += len(b"".join(logic.engine.data_to_send())) // 16  # type: ignore[arg-type]
                ready_in_a_row = 0
            if pos == len(stream):
                break
            buffers = logic.in_place_buffers()
            assert buffers is not None
            count = 0
            for buffer in buffers:  # every receive finds bytes: the client never pauses
                part = stream[pos + count : pos + count + len(buffer)]
                buffer[: len(part)] = part
                count += len(part)
            pos += count
            if step is nbdproto.serving.RECEIVE_READY:
                ready_in_a_row += 1
                longest = max(longest, ready_in_a_row)
                found = count  # sent back into the steps
            else:
                logic.received_in_place(count)
        assert longest == nbdproto.serving.READY_IN_A_ROW
        assert answered >= 150 - nbdproto.serving.READY_IN_A_ROW  # every batch of replies went out on the way
        assert _content(shm_file, 152 << 16, 64 << 10) == bytes([152]) * (64 << 10)


def test_a_block_device_is_not_in_memory_though_its_node_is_on_a_tmpfs(tmp_path: Any) -> None:
    # /dev is a devtmpfs, which statfs calls tmpfs: a disk behind a block device node was taken for memory
    # (called inline on an event loop, and written through a mapping).
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MIB))
    losetup = shutil.which("losetup", path=PEER_ENV["PATH"])
    if losetup is None:
        unavailable("no losetup here (Debian package mount)")
    made = subprocess.run([losetup, "--find", "--show", str(image)], capture_output=True, text=True)
    if made.returncode != 0:  # not root, or no loop devices (a container without them)
        unavailable(f"no loop device here: {made.stderr.strip()}")
    node = made.stdout.strip()
    try:
        with FileDevice(node) as device:
            assert not device.in_memory and device.dispatch == "batch"
            assert device.write_view(0, 4096) is None
            device.pwrite(b"\x07" * 4096, 0)
            buffer = bytearray(4096)
            device.pread_into(memoryview(buffer), 0)
            assert buffer == b"\x07" * 4096
    finally:
        subprocess.run([losetup, "-d", node], check=True)
