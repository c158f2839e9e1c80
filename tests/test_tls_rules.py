"""TLS as the spec asks it of real servers and clients (spec: "TLS support", "Terminating the transmission
phase", "Termination of the session during option haggling", "TLS versions"): whoever ends a TLS session
sends close_notify before closing TCP, a failed TLS handshake ends the session, and TLS 1.2 and 1.3 work.

The far end is a hand-driven TLS peer (ssl.SSLObject over memory BIOs on a plain socket), so a test can tell
a clean TLS shutdown (close_notify, SSLZeroReturnError) from a dropped connection (SSLEOFError).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Iterator

import anyio
import pytest

import nbdproto as n
import nbdproto.wire
import nbdproto_anyio
import nbdproto_threads
from nbdproto.cli._serve import _tls as cli_tls
from nbdproto.devices import MemoryDevice
from tests.nbdbytes import client_flags, info_payload, option, request
from tests.serving import BACKENDS, Export, Pki, make_pki, serve_exports

OPT, R = n.Option, n.OptionReplyType
pytestmark = pytest.mark.timeout(60)
SERVERS = BACKENDS


class TlsPeer:
    """One end of an NBD connection driven by hand, plaintext first and TLS after ``start_tls``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None

    def _pull(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def _push(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def start_tls(self, context: ssl.SSLContext, server_side: bool = False) -> None:
        hostname = None if server_side else "127.0.0.1"
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side, server_hostname=hostname)
        while True:
            try:
                self.tls.do_handshake()
                self._push()
                return
            except ssl.SSLWantReadError:
                self._push()
                self._pull()

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
            return
        self.tls.write(data)
        self._push()

    def recv(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            if self.tls is None:
                chunk = self.sock.recv(size - len(data))
                assert chunk, "the peer closed"
                data += chunk
                continue
            try:
                data += self.tls.read(size - len(data))
            except ssl.SSLWantReadError:
                self._pull()
        return data

    def option_reply(self) -> tuple[int, bytes]:
        _, _, reply_type, length = struct.unpack(">QIII", self.recv(20))
        return reply_type, self.recv(length)

    def how_it_ended(self) -> str:
        """Read to the end: "close_notify" for a TLS shutdown (an SSLObject reads b"" once it has one; the
        peer gets ours in return, as a bidirectional shutdown waits for it), "dropped" when TCP closed without."""
        assert self.tls is not None
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                try:
                    self._pull()
                except ConnectionResetError:
                    return "dropped"
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as exc:
                return "close_notify" if isinstance(exc, ssl.SSLZeroReturnError) else "dropped"
            assert data == b"", f"{len(data)} bytes after the end"
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()
            with contextlib.suppress(OSError):
                self._push()
            return "close_notify"


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with make_pki() as made:
        yield made


def served_port(base: str) -> int:
    return int(base.split(":")[2].split("/")[0])


def tls_client(port: int, pki: Pki) -> TlsPeer:
    peer = TlsPeer(socket.create_connection(("127.0.0.1", port), timeout=10))
    assert len(peer.recv(18)) == 18
    peer.send(client_flags() + option(OPT.STARTTLS))
    assert peer.option_reply()[0] == R.ACK
    peer.start_tls(pki.client_context)
    return peer


@pytest.mark.parametrize("backend", SERVERS)
def test_the_server_shuts_tls_down_after_disc(backend: str, pki: Pki) -> None:
    # spec: on NBD_CMD_DISC the server MUST close down the TLS session, then the TCP connection.
    with serve_exports(backend, {"disk": Export(MemoryDevice(1 << 20))}, tls=pki.server_context) as base:
        peer = tls_client(served_port(base), pki)
        peer.send(option(OPT.GO, info_payload("disk")))
        while peer.option_reply()[0] != R.ACK:
            pass
        peer.send(request(n.Command.DISC, 1))
        assert peer.how_it_ended() == "close_notify"


@pytest.mark.parametrize("backend", SERVERS)
def test_the_server_shuts_tls_down_after_abort(backend: str, pki: Pki) -> None:
    with serve_exports(backend, {"disk": Export(MemoryDevice(1 << 20))}, tls=pki.server_context) as base:
        peer = tls_client(served_port(base), pki)
        peer.send(option(OPT.ABORT))
        assert peer.option_reply()[0] == R.ACK
        assert peer.how_it_ended() == "close_notify"


@contextlib.contextmanager
def scripted_tls_server(pki: Pki, ended: list[str]) -> Iterator[int]:
    """A server that lists no exports over TLS, then records how the client ended the session."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        sock, _ = listener.accept()
        with sock:
            peer = TlsPeer(sock)
            peer.send(struct.pack(">QQH", n.wire.NBDMAGIC, n.wire.IHAVEOPT, 3))
            _, code, _ = struct.unpack(">QII", peer.recv(4 + 16)[4:])
            assert code == OPT.STARTTLS
            peer.send(struct.pack(">QIII", n.wire.OPTION_REPLY_MAGIC, OPT.STARTTLS, R.ACK, 0))
            peer.start_tls(pki.server_context, server_side=True)
            for expected in (OPT.LIST, OPT.ABORT):
                _, code, length = struct.unpack(">QII", peer.recv(16))
                assert code == expected and length == 0
                peer.send(struct.pack(">QIII", n.wire.OPTION_REPLY_MAGIC, code, R.ACK, 0))
            ended.append(peer.how_it_ended())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(20)
        listener.close()


@pytest.mark.parametrize("client", ["threads", "anyio"])
def test_the_client_shuts_tls_down_after_abort(client: str, pki: Pki) -> None:
    # spec: NBD_OPT_ABORT MUST be followed by the client shutting down TLS, then dropping the connection.
    ended: list[str] = []
    with scripted_tls_server(pki, ended) as port:
        uri = f"nbds://127.0.0.1:{port}/"
        if client == "threads":
            assert nbdproto_threads.list_exports(uri, tls=pki.client_context) == []
        else:
            assert anyio.run(lambda: nbdproto_anyio.list_exports(uri, tls=pki.client_context)) == []
    assert ended == ["close_notify"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_tls_handshake_ends_the_session_on_both_sides(backend: str, pki: Pki) -> None:
    stranger = ssl.create_default_context()  # trusts the system CAs, not the test CA
    with serve_exports(backend, {"disk": Export(MemoryDevice(1 << 20))}, tls=pki.server_context) as base:
        with pytest.raises(ssl.SSLCertVerificationError):
            nbdproto_threads.connect(base.format("disk"), tls=stranger)
        with nbdproto_threads.connect(base.format("disk"), tls=pki.client_context) as good:
            assert good.size == 1 << 20


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_both_work(version: ssl.TLSVersion, pki: Pki) -> None:
    client = ssl.create_default_context(cafile=f"{pki.directory}/ca-cert.pem")
    client.minimum_version = client.maximum_version = version
    exports = {"disk": Export(MemoryDevice(1 << 20))}
    with (
        serve_exports("threads", exports, tls=pki.server_context) as base,
        nbdproto_threads.connect(base.format("disk"), tls=client) as connected,
    ):
        assert connected.stream.sock.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]


def test_the_command_line_never_offers_tls_older_than_1_2(pki: Pki) -> None:
    cert = f"{pki.directory}/server-cert.pem"
    key = f"{pki.directory}/server-key.pem"
    args = argparse.Namespace(
        tls="require", tls_cert=cert, tls_key=key, tls_ca=None, tls_verify_client=False, tls_psk=None
    )
    context, mode = cli_tls(args)
    assert context is not None and mode is n.TlsMode.FORCEDTLS
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
