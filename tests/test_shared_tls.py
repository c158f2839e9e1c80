"""nbdproto_threads.SharedTls on a real TLS connection: a thread receiving while another sends never has two
threads inside OpenSSL at once; a send that cannot go on (the peer does not read) waits without the lock, so
replies are still received meanwhile, and gives up after its timeout; a receive gives up after its timeout;
closing ends a wait in another thread."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from nbdproto.sockets import SharedTls
from nbdproto.sockets._shared_tls import _wait
from tests.serving import make_pki
from tests.threaded import run_threads
from tests.tlswatch import TlsOverlaps
from tests.waiting import running, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair() -> Iterator[tuple[SharedTls, ssl.SSLSocket, TlsOverlaps]]:
    """A SharedTls over the client end of a TLS connection (watched for overlapping calls), and the server end
    as a plain blocking SSLSocket."""
    watch = TlsOverlaps()
    with make_pki() as pki:
        pki.client_context.sslsocket_class = watch.socket_class()
        left, right = socket.socketpair()
        server: list[ssl.SSLSocket] = []
        accepting = threading.Thread(
            target=lambda: server.append(pki.server_context.wrap_socket(right, server_side=True))
        )
        accepting.start()
        client = pki.client_context.wrap_socket(left, server_hostname="127.0.0.1")
        accepting.join(10)
        shared = SharedTls(client)
        try:
            yield shared, server[0], watch
        finally:
            shared.close()
            server[0].close()


def _receive_exactly(receive: object, count: int) -> bytes:
    got = bytearray()
    while len(got) < count:
        piece = receive()  # type: ignore[operator]
        assert piece, "the connection ended early"
        got += piece
    return bytes(got)


def test_a_reader_and_a_sender_never_meet_inside_openssl(pair: tuple[SharedTls, ssl.SSLSocket, TlsOverlaps]) -> None:
    shared, peer, watch = pair
    message = bytes(range(256)) * 64  # 16 KiB
    count = 300
    echoed: list[bytes] = []

    def echo() -> None:  # the peer sends back everything it is sent
        left = count * len(message)
        while left:
            data = peer.recv(65536)
            peer.sendall(data)
            left -= len(data)

    def send() -> None:
        for _ in range(count):
            shared.send([message[:100], message[100:]])

    def receive() -> None:
        echoed.append(_receive_exactly(lambda: shared.receive(), count * len(message)))

    run_threads(lambda i: [echo, send, receive][i](), 3)
    assert echoed == [message * count]
    watch.assert_none(at_least=count)


def test_a_send_that_cannot_go_on_leaves_receiving_free_and_times_out(
    pair: tuple[SharedTls, ssl.SSLSocket, TlsOverlaps],
) -> None:
    shared, peer, _ = pair
    failures: list[BaseException] = []

    def flood() -> None:  # the peer never reads: the send fills every buffer, then waits for room
        try:
            shared.send([bytes(64 << 20)], timeout=2.0)
        except BaseException as exc:
            failures.append(exc)

    sender = threading.Thread(target=flood)
    sender.start()
    wait_until(lambda: running(sender, SharedTls.send, _wait), "the send waiting for room")
    peer.sendall(b"a reply")
    assert shared.receive(timeout=5.0) == b"a reply"  # while the send waits for room
    sender.join(10)
    assert not sender.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], TimeoutError)


def test_a_receive_gives_up_after_its_timeout(pair: tuple[SharedTls, ssl.SSLSocket, TlsOverlaps]) -> None:
    shared, _, _ = pair
    started = time.monotonic()
    assert shared.receive(timeout=0.3) is None
    assert 0.25 <= time.monotonic() - started < 5


def test_closing_ends_a_wait_in_another_thread(pair: tuple[SharedTls, ssl.SSLSocket, TlsOverlaps]) -> None:
    shared, _, _ = pair
    ended: list[object] = []

    def wait() -> None:
        try:
            ended.append(shared.receive())
        except OSError as exc:
            ended.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: running(waiter, SharedTls.receive, _wait), "the receive waiting for bytes")
    shared.close()
    waiter.join(10)
    assert not waiter.is_alive()
    assert ended and (ended[0] in (b"", 0) or isinstance(ended[0], OSError))
