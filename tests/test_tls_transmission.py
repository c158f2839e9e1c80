"""Transmission over TLS as the servers now drive it (nbdproto.sockets.TlsChannel, the anyio server's
TlsSocketStream, nbdproto.serving's ReplyBuffers): a write's payload decrypted straight into its own buffer, the
header after it in the same receive; replies sent without joining them, large payloads handed to OpenSSL as the
buffers they are; read replies' buffers filled again once sent. Real TLS throughout (trustme certificates, our
clients and libnbd's nbdcopy), both backends; sizes at and around a TLS record (16 KiB) and the server's
receive and streaming sizes."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import pytest

import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from nbdproto.serving import (
    RECV_SIZE,
    STREAM_WRITES_OVER,
    BudgetShare,
    MemoryBudget,
    ReplyBuffers,
    ServerSessionLogic,
    SessionSettings,
)
from nbdproto.sockets import TLS_RECORD_SIZE, TlsChannel
from tests.conftest import PEER_ENV, require_peers
from tests.serving import Export, Pki, make_pki, serve_exports, tls_socket_pair
from tests.threaded import run_threads

pytestmark = pytest.mark.timeout(120)

BACKENDS = ["threads", "asyncio", "trio"]
R = TLS_RECORD_SIZE
SIZES = sorted({1, 28, R - 28, R - 1, R, R + 1, R + 28, 2 * R, RECV_SIZE - 1, RECV_SIZE, RECV_SIZE + 1,
                256 << 10, (256 << 10) + 1, STREAM_WRITES_OVER, STREAM_WRITES_OVER + 1,
                3 * STREAM_WRITES_OVER // 2 + 7})  # fmt: skip


def _pattern(size: int, key: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 2))[key % 256 :][:size]


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with make_pki() as made:
        yield made


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_around_record_boundaries_arrive_intact_and_read_back(backend: str, pki: Pki) -> None:
    device = MemoryDevice(16 << 20)
    with (
        serve_exports(backend, {"d": Export(device, read_only=False)}, tls=pki.server_context) as base,
        nt.connect(base.format("d"), tls=pki.client_context, timeout=30) as client,
    ):
        offset = 0
        for key, size in enumerate(SIZES):
            data = _pattern(size, key)
            client.pwrite(data, offset)
            assert client.pread(size, offset) == data, size
            offset += size + 3  # the next one starts off any boundary
        expected = b"".join(_pattern(size, key) + bytes(3) for key, size in enumerate(SIZES))
        assert client.pread(len(expected), 0) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipelined_big_writes_and_reads_stream_intact(backend: str, pki: Pki) -> None:
    # Several callers on one connection keep writes larger than a receive in flight together, so the server
    # receives each payload and the header after it in one go; reads in flight together fill reused buffers.
    chunk, rounds, callers = 300_000, 6, 6
    device = MemoryDevice(callers * rounds * chunk)
    with (
        serve_exports(backend, {"d": Export(device, read_only=False)}, tls=pki.server_context) as base,
        nt.connect(base.format("d"), tls=pki.client_context, timeout=30) as client,
    ):

        def write(k: int) -> None:
            for j in range(rounds):
                client.pwrite(_pattern(chunk, k * rounds + j), (k * rounds + j) * chunk)

        run_threads(write, callers)
        failures: list[int] = []

        def read(k: int) -> None:
            for j in range(rounds):
                index = k * rounds + j
                if client.pread(chunk, index * chunk) != _pattern(chunk, index):
                    failures.append(index)

        run_threads(read, callers)
        assert failures == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_nbdcopy_over_tls_writes_and_reads_back_a_random_image(backend: str, pki: Pki) -> None:
    require_peers("nbdcopy")
    size = 12 << 20
    with tempfile.TemporaryDirectory(prefix="nbdproto-tls-copy-") as tmp:
        source, back = os.path.join(tmp, "source.img"), os.path.join(tmp, "back.img")
        with open(source, "wb") as f:
            f.write(os.urandom(size))
        device = MemoryDevice(size)
        with serve_exports(backend, {"d": Export(device, read_only=False)}, tls=pki.server_context) as base:
            uri = f"{base.format('d')}?tls-certificates={pki.directory}"
            for ends in ([source, uri], [uri, back]):
                done = subprocess.run(["nbdcopy", "--connections=4", *ends], env=PEER_ENV, capture_output=True,
                                      text=True, timeout=90)  # fmt: skip
                assert done.returncode == 0, done.stderr
        with open(source, "rb") as a, open(back, "rb") as b:
            assert a.read() == b.read()


# --- TlsChannel on its own ----------------------------------------------------------------------------------


@pytest.fixture
def channel(pki: Pki) -> Iterator[tuple[TlsChannel, ssl.SSLSocket]]:
    """A TlsChannel over the server end of a TLS connection, and the client end as a blocking SSLSocket."""
    client, server = tls_socket_pair(pki)
    try:
        yield TlsChannel(server), client
    finally:
        client.close()
        server.close()


def test_receive_into_fills_buffers_exactly_and_keeps_the_rest_for_the_next(
    channel: tuple[TlsChannel, ssl.SSLSocket],
) -> None:
    tls, peer = channel
    assert tls.receive_into([memoryview(bytearray(10))]) is None  # nothing has arrived
    data = _pattern(3 * R + 100, 7)
    peer.sendall(data[: R + 5])  # records that do not end where the buffers do
    peer.sendall(data[R + 5 :])
    payload, header = memoryview(bytearray(2 * R + 3)), memoryview(bytearray(28))
    filled = 0
    while filled < len(payload) + len(header):
        rest = [payload[filled:], header] if filled < len(payload) else [header[filled - len(payload) :]]
        got = tls.receive_within(10, rest)
        assert isinstance(got, int) and got > 0
        filled += got
    assert bytes(payload) == data[: 2 * R + 3]
    assert bytes(header) == data[2 * R + 3 : 2 * R + 31]
    tail = b""
    while len(tail) < len(data) - 2 * R - 31:
        more = tls.receive_within(10, None, 1 << 20)
        assert isinstance(more, bytes) and more
        tail += more
    assert tail == data[2 * R + 31 :]
    assert tls.receive_within(0.05) is None  # a wait that runs out


@pytest.mark.parametrize("goodbye", ["close_notify", "no close_notify"])
def test_the_peer_closing_reads_as_the_end(channel: tuple[TlsChannel, ssl.SSLSocket], goodbye: str) -> None:
    tls, peer = channel
    if goodbye == "close_notify":
        peer.settimeout(0.0)
        with pytest.raises(ssl.SSLWantReadError):  # ours, sent; the server's is not waited for
            peer.unwrap()
    else:
        socket.socket.shutdown(peer, socket.SHUT_WR)  # the TCP connection ends under TLS
    assert tls.receive_within(10) == b""
    assert tls.receive_within(10, [memoryview(bytearray(4))]) == 0


def test_records_go_through_the_tls_object_and_a_socket_without_one_reads_as_the_end(
    channel: tuple[TlsChannel, ssl.SSLSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The channel reads and writes records with CPython's TLS object itself, not through ssl.SSLSocket's read
    and write (two Python calls a record); once the socket has no TLS object (closed here: ssl.SSLSocket drops
    it), those say so, and the channel takes it as the end, as before."""
    tls, peer = channel
    wrapped: list[str] = []
    for name in ("read", "write"):  # (this socket's: the peer is an ssl.SSLSocket too)
        method = getattr(tls.sock, name)
        monkeypatch.setattr(tls.sock, name, lambda *a, _m=method, _n=name: (wrapped.append(_n), _m(*a))[1])
    tls.send([b"hello"])
    assert peer.recv(5) == b"hello"
    peer.sendall(b"world")
    assert tls.receive_within(10, None, 5) == b"world"
    assert tls.receive_into([memoryview(bytearray(4))]) is None  # nothing more has arrived
    assert wrapped == []
    tls.sock.close()
    assert tls.receive() == b""
    assert tls.receive_into([memoryview(bytearray(4))]) == 0
    tls.queue([b"late"])
    with pytest.raises(ConnectionAbortedError):
        tls.send_queued()
    assert wrapped == ["read", "read", "write"]


def test_large_payloads_go_to_openssl_as_they_are_and_records_are_filled(
    channel: tuple[TlsChannel, ssl.SSLSocket],
) -> None:
    tls, _ = channel
    payload = bytearray(_pattern(256 << 10, 3))
    tls.queue([b"h" * 16, payload, b"t" * 16, b"x" * 100])
    units = list(tls._units)
    assert [len(u) for u in units] == [R, (256 << 10) - R, 132]  # full records, then what is left
    assert b"".join(units) == b"h" * 16 + payload + b"t" * 16 + b"x" * 100
    assert isinstance(units[1], memoryview) and units[1].obj is payload  # the payload itself, no copy of it


def test_small_replies_are_sent_in_full_records(channel: tuple[TlsChannel, ssl.SSLSocket]) -> None:
    tls, peer = channel
    pieces = [piece for i in range(20) for piece in (bytes([i]) * 16, bytearray(_pattern(4096, i)))]  # 4 KiB reads
    tls.queue(pieces)
    units = list(tls._units)
    whole = b"".join(pieces)
    assert [len(u) for u in units] == [R] * (len(whole) // R) + [len(whole) % R]  # full records, then the rest
    assert b"".join(units) == whole
    tls.send([], timeout=10)
    assert _read_all(peer, len(whole)) == whole


def test_sends_wait_for_a_peer_that_reads_late_and_arrive_whole(channel: tuple[TlsChannel, ssl.SSLSocket]) -> None:
    tls, peer = channel
    pieces = [_pattern(5 << 20, 1), b"header" * 3, bytearray(_pattern(70_000, 2))]
    tls.queue(pieces)
    assert not tls.send_queued()  # 5 MiB do not fit in the socket's buffers: it would wait
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_read_all(peer, sum(map(len, pieces)))))
    reader.start()
    while not tls.send_queued():
        assert tls.wait_writable(10)
    reader.join(30)
    assert bytes(received) == b"".join(pieces)
    tls.send([b"more"], timeout=10)
    assert _read_all(peer, 4) == b"more"


def _read_all(sock: ssl.SSLSocket, count: int) -> bytes:
    got = bytearray()
    while len(got) < count:
        piece = sock.recv(count - len(got))
        assert piece
        got += piece
    return bytes(got)


# --- ReplyBuffers ------------------------------------------------------------------------------------------


def test_reply_buffers_are_filled_again_once_sent_and_bounded() -> None:
    device = MemoryDevice(1 << 20)
    device.pwrite(_pattern(1 << 20, 5), 0)
    buffers = ReplyBuffers(limit=3 * 4096)
    read = buffers.reader(device)
    first = [read(i * 4096, 4096) for i in range(4)]
    assert [bytes(b) for b in first] == [_pattern(1 << 20, 5)[i * 4096 : (i + 1) * 4096] for i in range(4)]
    buffers.sent()
    assert buffers.kept == 3 * 4096  # the limit: the fourth is let go
    again = [read(8192, 4096) for _ in range(4)]
    assert sum(any(b is a for a in first) for b in again) == 3  # three of them used again, one new
    assert all(bytes(b) == _pattern(1 << 20, 5)[8192:12288] for b in again)
    assert buffers.kept == 0
    buffers.sent()
    buffers.release()
    assert buffers.kept == 0


def test_reply_buffers_of_mixed_sizes_are_kept_in_order_as_they_fit() -> None:
    device = MemoryDevice(1 << 20)
    sizes = [4096, 8192, 2048, 4096]
    # Under a limit that takes them all, all of them; under 10000 bytes, the first that fit: 4096, then 2048.
    for limit, hits in ((1 << 20, [True, True, True, True]), (10000, [True, False, True, False])):
        buffers = ReplyBuffers(limit=limit)
        read = buffers.reader(device)
        made = [read(0, size) for size in sizes]
        buffers.sent()
        assert buffers.kept == sum(size for size, hit in zip(sizes, hits, strict=True) if hit)
        again = [buffers.kept_for(size) for size in sizes]
        assert [b is not None for b in again] == hits
        assert {id(b) for b in again if b is not None} <= {id(b) for b in made}  # the very buffers, again
        assert buffers.kept == 0


def test_reply_buffers_hold_what_they_keep_from_the_connections_share() -> None:
    """Kept buffers are memory the server holds: counted in the budget, given back when used again or let go,
    and not kept at all when the share cannot hold them."""
    device = MemoryDevice(1 << 20)
    budget = MemoryBudget(limit=64 << 10, guaranteed=0)
    share, other = BudgetShare(budget), BudgetShare(budget)
    buffers = ReplyBuffers(limit=32 << 10, share=share)
    read = buffers.reader(device)
    for i in range(4):
        read(i * 4096, 4096)
    buffers.sent()
    assert buffers.kept == share.held == budget.used == 16 << 10
    read(0, 4096)  # one used again: the read that fills it counts it now (the session took it), the share not
    assert buffers.kept == share.held == 12 << 10
    buffers.release()
    assert buffers.kept == share.held == budget.used == 0
    assert other.try_take(60 << 10)  # the budget nearly all another's: what is sent is not kept
    for i in range(4):
        read(i * 4096, 4096)
    buffers.sent()
    assert buffers.kept == share.held == 0 and budget.used == 60 << 10


def test_a_read_waiting_for_budget_takes_back_what_kept_buffers_held() -> None:
    """A session whose budget is held by its own kept reply buffers gives them back for a read instead of
    waiting for budget that only it could free."""
    budget = MemoryBudget(limit=64 << 10, guaranteed=0)
    logic = ServerSessionLogic(SessionSettings(), share=BudgetShare(budget))
    logic.reuse_read_buffers()
    kept = logic._reply_buffers
    assert kept is not None
    read = kept.reader(MemoryDevice(1 << 20))
    for i in range(12):
        read(i * 4096, 4096)
    kept.sent()
    assert budget.used == 48 << 10
    assert logic._take_kept_back(32 << 10)  # 48 + 32 > 64: fits only once the kept 48 are given back
    assert kept.kept == 0 and budget.used == 32 << 10
