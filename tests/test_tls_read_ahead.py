"""OpenSSL's read-ahead on the servers' TLS connections (nbdproto.sockets' read_ahead, turned on by TlsChannel):
records that arrived together are taken with one system call, not two each; a record that arrived in part is
waited for (its first bytes sit in OpenSSL's buffer, where poll does not see them) and taken whole once the rest
comes; and the channel works as before on a socket whose read-ahead cannot be turned on."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator

import pytest

from nbdproto.sockets import TlsChannel
from nbdproto.sockets._read_ahead import read_ahead
from tests.serving import Pki, make_pki, tls_socket_pair

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with make_pki() as made:
        yield made


@pytest.fixture
def ends(pki: Pki) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """The client end (blocking) and the server end of a TLS connection."""
    client, server = tls_socket_pair(pki)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def _reads_by_this_thread() -> int:
    """read() system calls this thread has made (OpenSSL reads a socket with read())."""
    with open("/proc/thread-self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("syscr:"))


def test_read_ahead_can_be_had_on_every_python_ci_runs(ends: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    # CPython 3.10 to 3.13: the layout read_ahead knows. Elsewhere it says False and changes nothing.
    _, server = ends
    assert read_ahead(server) is True


@pytest.mark.parametrize("ahead", [True, False])
def test_records_that_arrived_together_are_taken_with_one_read(
    ends: tuple[ssl.SSLSocket, ssl.SSLSocket], ahead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, server = ends
    if not ahead:  # as before read-ahead, or on a Python where it cannot be had: two reads a record
        monkeypatch.setattr("nbdproto.sockets._tls_channel.read_ahead", lambda sock: False)
    channel = TlsChannel(server)
    requests = [bytes([i]) * 28 for i in range(16)]
    for request in requests:  # a record each, as libnbd sends pipelined requests
        client.sendall(request)
    before = _reads_by_this_thread()
    got = channel.receive()
    reads = _reads_by_this_thread() - before
    assert got == b"".join(requests)
    if ahead:
        assert reads <= 3  # what arrived, and the read that finds nothing more
    else:
        assert reads >= 2 * len(requests)


def test_a_record_that_arrived_in_part_is_waited_for_and_taken_whole(pki: Pki) -> None:
    raw, server = _memory_client(pki)
    client, outgoing, sock = raw
    try:
        channel = TlsChannel(server)
        assert channel.receive() is None
        client.write(b"x" * 5000)  # one record, its bytes on the wire cut in two
        record = outgoing.read()
        sock.sendall(record[:3000])
        assert channel.receive() is None  # the first part is OpenSSL's now, and the socket has nothing more
        later = threading.Timer(0.2, lambda: sock.sendall(record[3000:]))
        later.start()
        assert channel.wait_readable(10)  # the rest wakes the wait
        assert channel.receive() == b"x" * 5000
        later.join()
    finally:
        sock.close()
        server.close()


def _memory_client(pki: Pki) -> tuple[tuple[ssl.SSLObject, ssl.MemoryBIO, socket.socket], ssl.SSLSocket]:
    """A client whose TLS records are made in memory (so that a test sends their bytes as it likes) over a
    socket pair, the handshake done with the server end, which is returned too."""
    left, right = socket.socketpair()
    left.settimeout(10)
    server: list[ssl.SSLSocket] = []
    accepting = threading.Thread(target=lambda: server.append(pki.server_context.wrap_socket(right, server_side=True)))
    accepting.start()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = pki.client_context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            left.sendall(outgoing.read())
            incoming.write(left.recv(1 << 16))
    left.sendall(outgoing.read())
    accepting.join(10)
    return (client, outgoing, left), server[0]
