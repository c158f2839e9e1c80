"""The one-request road: a client that sends one request at a time (fio QD1) is answered by a short loop
(``ServerConnection.receive_lone_read`` and ``answer_lone_read``, ``ServerSessionLogic.answer_lone_read``, the
drivers' lone-read loops) instead of a turn of the steps per request. It must answer exactly as the steps do,
give way to them for everything that is not a lone read, and keep the limits and the shutdown.
tests/test_command_rules.py holds its check of a READ to the full check."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto
import nbdproto.engine
import nbdproto.serving
import nbdproto_anyio
import nbdproto_threads
from nbdproto.devices import FileDevice, MemoryDevice
from nbdproto.engine import NEED_DATA, ReadData, ServerConnection
from nbdproto.serving import RECEIVE, SEND
from nbdproto.wire import Command, CommandFlags
from tests.nbdbytes import replies, request
from tests.serving import BACKENDS, Export, serving
from tests.test_bad_input import RawClient
from tests.test_server import export, handshake, joined
from tests.test_session_carry_out import session

MIB = 1 << 20
DATA = bytes(range(256)) * (MIB // 256)
pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def data_file() -> Iterator[str]:
    """A 1 MiB file of data on tmpfs, removed afterwards: a FileDevice over it hands out read views (and is
    called inline)."""
    path = f"/dev/shm/nbdproto-lone-{os.getpid()}-{threading.get_ident()}.img"
    with open(path, "wb") as f:
        f.write(DATA)
    try:
        yield path
    finally:
        os.unlink(path)


@pytest.fixture
def shm_file() -> Iterator[str]:
    with data_file() as path:
        yield path


# --- The engine ---------------------------------------------------------------------------------------------------


def transmitting(mode: str) -> ServerConnection:
    s = ServerConnection()
    joined(s)
    handshake(s, structured=mode != "simple", extended=mode == "extended", exp=export(size=MIB))
    return s


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_a_lone_read_is_answered_with_the_bytes_of_the_usual_road(mode: str) -> None:
    header = request(Command.READ, 9, 4096, 512, extended=mode == "extended")
    lone, usual = transmitting(mode), transmitting(mode)
    read = lone.receive_lone_read(header)
    assert read is not None and (read.cookie, read.offset, read.length, read.flags) == (9, 4096, 512, CommandFlags(0))
    usual.receive_data(header)
    batch: list[Any] = []
    assert usual.next_requests(batch) is NEED_DATA and batch == [read]
    for s in (lone, usual):
        assert s.in_flight == 1
        s.send(ReadData(9, 4096, DATA[4096 : 4096 + 512]))
        assert s.in_flight == 0
    usual_bytes = joined(usual)
    assert joined(lone) == usual_bytes
    assert lone.next_requests(batch) is NEED_DATA and batch == [read]  # handed over once, never again
    direct = transmitting(mode)  # the road's own answer: the header, then the data, sent by the driver
    taken = direct.receive_lone_read(header)
    assert taken is not None
    assert direct.answer_lone_read(taken) + DATA[4096 : 4096 + 512] == usual_bytes
    assert direct.in_flight == 0 and joined(direct) == b""


def test_everything_but_a_lone_read_waits_for_next_requests() -> None:
    read, write = request(Command.READ, 1, 0, 512), request(Command.WRITE, 2, 512, 512) + bytes(512)
    cases: list[tuple[list[bytes], list[str]]] = [
        ([read[:10], read[10:]], ["ReadRequest"]),  # half a header, then the rest: bytes were waiting
        ([read + request(Command.READ, 3, 512, 512)], ["ReadRequest", "ReadRequest"]),  # two in one receive
        ([write], ["WriteRequest"]),
        ([request(Command.READ, 4, 0, 512, CommandFlags.DF)], ["ReadRequest"]),  # flags: the full check's
        ([request(Command.FLUSH, 5)], ["FlushRequest"]),
        ([request(Command.DISC, 6)], []),  # the end of the batch: DisconnectRequest
        ([request(Command.READ, 7, MIB, 512)], []),  # past the end: refused (EINVAL) where it is parsed
    ]
    for receives, kinds in cases:
        s = transmitting("structured")
        for data in receives:
            assert s.receive_lone_read(data) is None, receives
        batch: list[Any] = []
        end = s.next_requests(batch)
        assert [type(r).__name__ for r in batch] == kinds, receives
        if receives[0].startswith(request(Command.DISC, 6)[:8]):
            assert isinstance(end, nbdproto.DisconnectRequest)
    s = transmitting("structured")
    assert s.receive_lone_read(request(Command.READ, 7, MIB, 512)) is None
    s.next_requests([])
    assert [r.error for r in replies(joined(s))] == [nbdproto.Errno.EINVAL]


def test_a_lone_read_waits_while_another_is_unanswered() -> None:
    s = transmitting("structured")
    first = s.receive_lone_read(request(Command.READ, 1, 0, 512))
    assert first is not None
    assert s.receive_lone_read(request(Command.READ, 2, 512, 512)) is None  # in flight: the usual road
    batch: list[Any] = []
    assert s.next_requests(batch) is NEED_DATA and [r.cookie for r in batch] == [2]
    assert s.receive_lone_read(bytearray(request(Command.READ, 3, 0, 512))) is None  # not bytes: copied, as ever


# --- The logic ----------------------------------------------------------------------------------------------------


def logic_over(device: Any, *, structured: bool = True) -> tuple[nbdproto.serving.ServerSessionLogic, Any]:
    """A session in transmission over ``device``, its steps at their first RECEIVE (read views given)."""
    logic = session(device, structured=structured)
    steps = logic.inline_transmission(logic.read_view(kernel_sends=True))
    assert steps.send(None) is RECEIVE
    return logic, steps


def sent(logic: nbdproto.serving.ServerSessionLogic) -> bytes:
    out = b"".join(bytes(piece) for piece in logic.engine.data_to_send())
    logic.sent()
    return out


def test_the_logic_answers_lone_reads_and_gives_the_rest_to_the_steps(shm_file: str) -> None:
    logic, steps = logic_over(FileDevice(shm_file), structured=False)
    assert answered(logic, request(Command.READ, 1, 8192, 4096)) == replies_of(1, DATA[8192 : 8192 + 4096])
    assert logic.answer_lone_read(request(Command.WRITE, 2, 8192, 4096) + b"\xee" * 4096) is None
    assert steps.send(None) is RECEIVE  # the steps carried the write out
    assert [r.cookie for r in replies(sent(logic))] == [2]
    assert answered(logic, request(Command.READ, 3, 8192, 4096)) == replies_of(3, b"\xee" * 4096)  # read back
    assert logic.answer_lone_read(b"") is None  # the client closed
    assert steps.send(None) is nbdproto.serving.FINISHED


def answered(logic: nbdproto.serving.ServerSessionLogic, data: bytes) -> bytes:
    """The reply the one-request road gives ``data`` (it must give one), sent."""
    pieces = logic.answer_lone_read(data)
    assert pieces is not None
    logic.sent()
    assert logic.engine.data_to_send() == []  # nothing else queued
    return b"".join(bytes(piece) for piece in pieces)


def test_a_read_its_view_does_not_answer_is_carried_out_as_the_steps_would(shm_file: str) -> None:
    device = FileDevice(shm_file)
    asked: list[int] = []

    def no_view(offset: int, length: int) -> None:  # (as on a sparse file on tmpfs)
        asked.append(offset)

    device.read_view = no_view  # type: ignore[method-assign,assignment]
    logic, _ = logic_over(device, structured=False)
    assert answered(logic, request(Command.READ, 1, 512, 512)) == replies_of(1, DATA[512:1024])
    assert asked == [512]  # asked once: the read is then read (pread_into), not asked for a view again
    failures: list[BaseException] = []
    logic.on_device_error = lambda request, exc: failures.append(exc)

    def failing(offset: int, length: int) -> memoryview:
        raise OSError(5, "the device failed")

    device.read_view = failing  # type: ignore[method-assign]
    logic, _ = logic_over(device, structured=False)
    logic.on_device_error = lambda request, exc: failures.append(exc)
    header = nbdproto.wire.headers.SIMPLE_REPLY
    assert answered(logic, request(Command.READ, 2, 512, 512)) == header.pack(header.magic, nbdproto.Errno.EIO, 2)
    assert [str(f) for f in failures] == ["[Errno 5] the device failed"]


def replies_of(cookie: int, data: bytes) -> bytes:
    header = nbdproto.wire.headers.SIMPLE_REPLY
    return header.pack(header.magic, 0, cookie) + data


def test_shutting_down_and_devices_without_views_take_the_steps(shm_file: str) -> None:
    logic, steps = logic_over(FileDevice(shm_file))
    logic.begin_shutdown()
    assert not logic.lone_reads_wanted
    assert logic.answer_lone_read(request(Command.READ, 1, 0, 512)) is None
    assert steps.send(None) in (RECEIVE, SEND)
    assert [r.error for r in replies(sent(logic))] == [nbdproto.Errno.ESHUTDOWN]
    logic, steps = logic_over(MemoryDevice(MIB), structured=False)  # no views: the steps budget its reads
    assert not logic.lone_reads_wanted
    assert logic.answer_lone_read(request(Command.READ, 2, 0, 512)) is None
    assert steps.send(None) is RECEIVE
    assert sent(logic) == replies_of(2, bytes(512))


def served(receives: list[bytes], *, road: bool, structured: bool, path: str) -> tuple[bytes, str]:
    """Every byte a session over ``path`` sends for ``receives`` (one receive each), taking the one-request
    road where the logic wants it (``road``) or the steps alone; and how it ended."""
    logic, steps = logic_over(FileDevice(path), structured=structured)
    out = b""
    try:
        for data in receives:
            if road and logic.lone_reads_wanted:
                pieces = logic.answer_lone_read(data)
                if pieces is not None:
                    out += b"".join(bytes(piece) for piece in pieces)
                    logic.sent()
                    continue
            else:
                logic.received(data)
            while True:  # the steps, to their next RECEIVE
                step = steps.send(None)
                out += sent(logic)
                if step is RECEIVE or step is nbdproto.serving.FINISHED:
                    break
    except nbdproto.RemoteProtocolError as exc:
        return out, f"broke the protocol: {exc}"
    return out, "open"


_HEADERS = st.tuples(
    st.sampled_from([Command.READ, Command.READ, Command.READ, Command.FLUSH, Command.CACHE, 9]),
    st.one_of(st.just(0), st.integers(0, 63)),
    st.sampled_from([0, 512, 4096, MIB - 4096, MIB - 1, MIB]),
    st.sampled_from([0, 1, 512, 4096, 65536, 2 * MIB]),
    st.integers(0, 9),  # 0: the request magic broken (a protocol error ends the connection)
)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(_HEADERS, st.booleans()), max_size=12),
    structured=st.booleans(),
)
def test_the_road_answers_every_stream_as_the_steps_do(headers: list[Any], structured: bool) -> None:
    """Requests one a receive (or two, or a header cut across receives), read or not, valid or not: the bytes
    sent, and how the connection ended, are the same with the road as with the steps alone."""
    receives: list[bytes] = []
    for cookie, ((command, flags, offset, length, magic), joined_to_next) in enumerate(headers):
        header = request(command, cookie, offset, length, flags)
        if not magic:
            header = b"\0" * 4 + header[4:]
        if joined_to_next and receives and len(receives[-1]) < 28:
            receives[-1] += header  # the rest of a header cut in two
        elif joined_to_next:
            receives += [header[:10], header[10:]]
        else:
            receives.append(header)
    with data_file() as path:
        road = served(receives, road=True, structured=structured, path=path)
        assert road == served(receives, road=False, structured=structured, path=path)


# --- The servers --------------------------------------------------------------------------------------------------


def connect(port: int) -> contextlib.closing[RawClient]:
    """A raw client taken through the handshake (simple replies), closed on leaving."""
    client = RawClient(("127.0.0.1", port))
    client.go("")
    return contextlib.closing(client)


@pytest.fixture
def lone_reads_answered(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the reads the servers answered on the one-request road (answer_lone_read giving a reply)."""
    answered: list[int] = []
    real = nbdproto.serving.ServerSessionLogic.answer_lone_read

    def counted(logic: nbdproto.serving.ServerSessionLogic, data: Any) -> list[Any] | None:
        pieces = real(logic, data)
        if pieces is not None:
            answered.append(len(data))
        return pieces

    monkeypatch.setattr(nbdproto.serving.ServerSessionLogic, "answer_lone_read", counted)
    return answered


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_request_at_a_time_reads_what_was_written(
    backend: str, shm_file: str, lone_reads_answered: list[int]
) -> None:
    """Reads, writes, flushes and zeroes one at a time, against a model of the disk."""
    model = bytearray(DATA)
    rng = random.Random(32)
    reads = 0
    with (
        serving(backend, {"": Export(FileDevice(shm_file))}) as (uri, _),
        nbdproto_threads.connect(uri.format(""), timeout=20) as client,
    ):
        for _ in range(300):
            offset, length = rng.randrange(0, MIB // 512) * 512, rng.choice([512, 4096, 65536])
            length = min(length, MIB - offset)
            kind = rng.random()
            if kind < 0.6:
                assert client.pread(length, offset) == model[offset : offset + length]
                reads += 1
            elif kind < 0.85:
                length = min(length, 4096)  # (writes bigger than a receive stream in place: the steps' road)
                data = rng.randbytes(length)
                client.pwrite(data, offset)
                model[offset : offset + length] = data
            elif kind < 0.95:
                client.zero(length, offset)
                model[offset : offset + length] = bytes(length)
            else:
                client.flush()
        assert client.pread(MIB, 0) == model
    assert len(lone_reads_answered) == reads + 1  # every read took the road


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_quiet_longer_than_the_request_limit_between_requests_is_served(
    backend: str, shm_file: str, lone_reads_answered: list[int]
) -> None:
    """No idle limit, a request limit: the receive timer armed for it runs out while the client is quiet between
    requests (the lone-read loop waits again), and a half header is still cut off at the limit."""
    limits = nbdproto.ServerLimits(request_timeout=0.3)
    with (
        serving(backend, {"": Export(FileDevice(shm_file))}, limits=limits) as (uri, _),
        connect(int(uri.split(":")[2].split("/")[0])) as client,
    ):
        for cookie in (1, 2):
            client.sock.sendall(request(Command.READ, cookie, 4096 * cookie, 4096))
            assert client.simple_reply(cookie, 4096) == (0, DATA[4096 * cookie : 4096 * (cookie + 1)])
            time.sleep(0.8)
        client.sock.sendall(request(Command.READ, 4, MIB, 512))  # past the end: refused, and the connection goes on
        assert client.simple_reply(4) == (nbdproto.Errno.EINVAL, b"")
        client.sock.sendall(request(Command.READ, 3, 0, 512)[:10])
        started = time.monotonic()
        assert client.sock.recv(100) == b""  # cut off
        assert time.monotonic() - started >= 0.25
    assert len(lone_reads_answered) == 2


def test_a_threads_server_shutting_down_ends_a_connection_waiting_between_lone_reads(shm_file: str) -> None:
    limits = nbdproto.ServerLimits(shutdown_grace=30)
    server = nbdproto_threads.Server({"": FileDevice(shm_file)}, ("127.0.0.1", 0), limits=limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with connect(server.address[1]) as client:
            client.sock.sendall(request(Command.READ, 1, 0, 512))
            assert client.simple_reply(1, 512) == (0, DATA[:512])
            started = time.monotonic()
            server.shutdown()  # an idle connection is closed at once, not after the grace
            assert client.sock.recv(100) == b""
            assert time.monotonic() - started < 10
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_anyio_server_shutting_down_ends_a_connection_waiting_between_lone_reads(
    backend: str, shm_file: str
) -> None:
    limits = nbdproto.ServerLimits(shutdown_grace=30)
    server = nbdproto_anyio.Server({"": FileDevice(shm_file)}, limits=limits)
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        listener = portal.call(nbdproto_anyio.listen, ("127.0.0.1", 0))
        future = portal.start_task_soon(server.serve, listener)
        try:
            with connect(listener.address[1]) as client:
                client.sock.sendall(request(Command.READ, 1, 0, 512))
                assert client.simple_reply(1, 512) == (0, DATA[:512])
                started = time.monotonic()
                portal.call(server.shutdown)  # an idle connection is closed at once, not after the grace
                assert client.sock.recv(100) == b""
                assert time.monotonic() - started < 10
        finally:
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result(timeout=10)
