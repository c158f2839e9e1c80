"""Who a server serves (nbdproto.ConnectionPolicy), on every backend, in-process: oneshot, a connection limit,
allowed addresses, allowed certificate subjects; and what the server knows of its clients (nbdproto.ClientInfo),
which the log names and a two-argument resolver is given."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import pytest

import nbdproto as n
import nbdproto.serving
import nbdproto_anyio
import nbdproto_threads
from nbdproto.devices import MemoryDevice
from tests.serving import BACKENDS, make_pki

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20
GREETING = 18  # NBDMAGIC, IHAVEOPT, handshake flags


class Running:
    """A server of some backend running in the background: its URI, and whether its serving loop returned."""

    def __init__(self, server: n.serving.ServerCore, uri: str, finished: Callable[[], bool]) -> None:
        self.server = server
        self.uri = uri
        self.finished = finished

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {timeout} s")
            time.sleep(0.005)


@contextlib.contextmanager
def running(
    backend: str,
    policy: n.ConnectionPolicy,
    exports: Any = None,
    *,
    tls: ssl.SSLContext | None = None,
    unix: bool = False,
) -> Iterator[Running]:
    exports = exports if exports is not None else {"": n.ExportSpec(MemoryDevice(MIB), read_only=False)}
    scheme = "nbds" if tls is not None else "nbd"
    with tempfile.TemporaryDirectory(prefix="nbdproto-policy-") as tmp:
        address: Any = os.path.join(tmp, "sock") if unix else ("127.0.0.1", 0)

        def uri_of(bound: Any) -> str:
            return f"{scheme}+unix:///?socket={bound}" if unix else f"{scheme}://127.0.0.1:{bound[1]}/"

        if backend == "threads":
            server = nbdproto_threads.Server(exports, address, tls=tls, policy=policy)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                yield Running(server, uri_of(server.address), lambda: not thread.is_alive())
            finally:
                server.shutdown()
                thread.join(10)
            return
        anyio_server = nbdproto_anyio.Server(exports, tls=tls, policy=policy)
        with anyio.from_thread.start_blocking_portal(backend) as portal:
            listener = portal.call(nbdproto_anyio.listen, address)
            future = portal.start_task_soon(anyio_server.serve, listener)
            try:
                yield Running(anyio_server, uri_of(listener.address), future.done)
            finally:
                portal.call(anyio_server.shutdown)
                future.result(10)


def greeting_from(port: int, source: str = "127.0.0.1") -> bytes:
    """What the server sends a client connecting from ``source`` before the client says anything: the greeting,
    or b"" when it closes the connection first."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        received = b""
        while len(received) < GREETING:
            chunk = sock.recv(GREETING - len(received))
            if not chunk:
                break
            received += chunk
        return received


def size_of(uri: str, **options: Any) -> int:
    with nbdproto_threads.connect(uri, timeout=10, **options) as client:
        return client.export.size


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_oneshot_refuses_a_second_client_and_stops_once_the_first_leaves(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with running(backend, n.ConnectionPolicy(oneshot=True)) as server:
        first = nbdproto_threads.connect(server.uri, timeout=10)
        with pytest.raises((ConnectionError, n.ProtocolError)):
            nbdproto_threads.connect(server.uri, timeout=10)
        [refusal] = refusals(caplog)
        assert refusal.startswith("client 127.0.0.1:") and refusal.endswith(
            "refused: this server serves one client only (oneshot)"
        )
        first.pwrite(b"x" * 512, 0)
        assert not server.finished()
        first.close()
        server.wait_until(server.finished, "stopped after its one client")


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_connections_refuses_one_more_until_one_leaves(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running(backend, n.ConnectionPolicy(max_connections=2), unix=True) as server:
        first = nbdproto_threads.connect(server.uri, timeout=10)
        second = nbdproto_threads.connect(server.uri, timeout=10)
        with pytest.raises((ConnectionError, n.ProtocolError)):
            nbdproto_threads.connect(server.uri, timeout=10)
        assert refusals(caplog) == ["client unix refused: too many connections (at most 2 at a time)"]
        first.close()
        server.wait_until(lambda: len(server.server.sessions) == 1, "down to one session")
        with nbdproto_threads.connect(server.uri, timeout=10) as third:
            third.pwrite(b"y" * 512, 0)
            assert second.pread(512, 0) == b"y" * 512
        second.close()
        assert not server.finished()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_address_not_allowed_is_closed_before_the_greeting(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running(backend, n.ConnectionPolicy(allow_addresses=["127.0.0.1/32", "::1"])) as server:
        port = int(server.uri.rsplit(":", 1)[1].strip("/"))
        assert greeting_from(port, "127.0.0.2") == b""
        assert len(greeting_from(port, "127.0.0.1")) == GREETING
        [refusal] = refusals(caplog)
        assert refusal.startswith("client 127.0.0.2:") and "address 127.0.0.2 is not among the allowed ones" in refusal
        with nbdproto_threads.connect(server.uri, timeout=10) as client:
            assert client.export.size == MIB


def test_a_unix_socket_client_is_not_subject_to_allowed_addresses() -> None:
    with running("threads", n.ConnectionPolicy(allow_addresses=["192.0.2.0/24"]), unix=True) as server:
        assert nbdproto_threads.list_exports(server.uri, timeout=10)[0].name == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_certificate_subject_not_allowed_is_refused_after_tls(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with make_pki(verify_client=True) as pki:
        # trustme's client certificate: "OU=Testing cert #...,O=trustme v1.2.1" (no CN).
        refused = n.ConnectionPolicy(allow_client_dn=["CN=backup.example,O=*"])
        with (
            running(backend, refused, tls=pki.server_context) as server,
            pytest.raises((ConnectionError, ssl.SSLError, n.ProtocolError)),
        ):
            nbdproto_threads.connect(server.uri, tls=pki.client_context, timeout=10)
        [refusal] = refusals(caplog)
        assert "refused: certificate subject 'OU=Testing cert #" in refusal
        assert ",O=trustme" in refusal and "matches no allowed pattern" in refusal
        caplog.clear()
        allowed = n.ConnectionPolicy(allow_client_dn=["CN=backup.example,O=*", "OU=*,O=trustme v*"])
        with running(backend, allowed, tls=pki.server_context) as server:
            assert size_of(server.uri, tls=pki.client_context) == MIB
        assert refusals(caplog) == []
        [chose] = [r.getMessage() for r in caplog.records if "uses export" in r.getMessage()]
        assert "(certificate 'OU=Testing cert #" in chose


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resolver_of_two_arguments_is_told_who_asks(backend: str) -> None:
    seen: list[tuple[str, str, str | None]] = []
    device = MemoryDevice(MIB)

    def resolve(name: str, client: n.ClientInfo) -> n.ExportSpec[Any] | None:
        seen.append((name, client.address, client.certificate_subject))
        return n.ExportSpec(device) if name == "disk" else None

    with (
        make_pki(verify_client=True) as pki,
        running(backend, n.ConnectionPolicy(), resolve, tls=pki.server_context) as server,
        nbdproto_threads.connect(server.uri + "disk", tls=pki.client_context, timeout=10) as client,
    ):
        assert client.export.size == MIB
        local = client.stream.sock.getsockname()
    assert seen and {name for name, _, _ in seen} == {"disk"}
    for _, address, subject in seen:
        assert address == f"{local[0]}:{local[1]}"
        assert subject is not None and subject.startswith("OU=Testing cert #")


def test_resolvers_of_one_argument_keep_working() -> None:
    device = MemoryDevice(MIB)
    specs = {"a": n.ExportSpec(device)}
    for resolver in (specs.get, lambda name, default=None: specs.get(name, default)):
        with running("threads", n.ConnectionPolicy(), resolver) as server:
            assert size_of(server.uri + "a") == MIB


def test_which_resolvers_take_the_client() -> None:
    def one(name: str) -> None: ...

    def two(name: str, client: n.ClientInfo) -> None: ...

    def defaulted(name: str, client: object = None) -> None: ...

    def many(*args: object) -> None: ...

    assert not n.serving.takes_client({}.get)
    assert not n.serving.takes_client(one)
    assert n.serving.takes_client(two)
    assert not n.serving.takes_client(defaulted)
    assert not n.serving.takes_client(many)
    assert n.serving.takes_client(lambda name, client: None)


def test_policy_decisions() -> None:
    policy = n.ConnectionPolicy(allow_addresses=["10.0.0.0/8", "2001:db8::/32"])
    assert policy.address_allowed("10.1.2.3")
    assert policy.address_allowed("::ffff:10.1.2.3")  # an IPv4 client of a dual-stack socket
    assert policy.address_allowed("2001:db8::1")
    assert not policy.address_allowed("11.0.0.1")
    assert not policy.address_allowed("fe80::1%eth0")
    tcp = n.ClientInfo("11.0.0.1:5", "11.0.0.1")
    assert policy.refusal(tcp, open_connections=0, admitted=0) == "address 11.0.0.1 is not among the allowed ones"
    assert policy.refusal(n.ClientInfo("unix", unix=True), open_connections=0, admitted=0) is None
    assert policy.refusal(n.ClientInfo("?"), open_connections=0, admitted=0) is not None
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300/8' is not an address or network"):
        n.ConnectionPolicy(allow_addresses=["10.0.0.300/8"])
    with pytest.raises(ValueError, match="max_connections -1"):
        n.ConnectionPolicy(max_connections=-1)
    oneshot = n.ConnectionPolicy(oneshot=True)
    assert oneshot.refusal(tcp, open_connections=0, admitted=0) is None
    assert oneshot.refusal(tcp, open_connections=0, admitted=1) is not None


def test_certificate_subjects_are_written_as_openssl_writes_rfc_2253() -> None:
    certificate = {
        "subject": (
            (("countryName", "GB"),),
            (("organizationName", "Example, Ltd"),),
            (("organizationalUnitName", "#1"), ("domainComponent", "x")),
            (("commonName", "host.example "),),
        )
    }
    # Every attribute in reverse, those of a multi-valued RDN too (tests/test_client_dn.py compares with openssl).
    assert n.serving.certificate_subject(certificate) == "CN=host.example\\ ,DC=x+OU=\\#1,O=Example\\, Ltd,C=GB"
    assert n.serving.certificate_subject({}) is None
    client = n.ClientInfo("1.2.3.4:5", "1.2.3.4")
    client.certificate_subject = "CN=a"
    policy = n.ConnectionPolicy(allow_client_dn=["CN=a"])
    assert policy.certificate_refusal(client) is None
    client.certificate_subject = "CN=ab"
    assert policy.certificate_refusal(client) == "certificate subject 'CN=ab' matches no allowed pattern"
    client.psk_identity = "alice"  # authenticated by its key: the subject rules are for certificates
    assert policy.certificate_refusal(client) is None


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_shutdown_before_serving_begins_is_not_lost(backend: str) -> None:
    # A SIGTERM while `nbdproto serve` starts asks for the shutdown before the serving task runs.
    server = nbdproto_anyio.Server({"": MemoryDevice(MIB)})

    async def main() -> None:
        listener = await nbdproto_anyio.listen(("127.0.0.1", 0))
        await server.shutdown()
        with anyio.fail_after(10):
            await server.serve(listener)

    anyio.run(main, backend=backend)


@pytest.mark.skipif(sys.version_info < (3, 13), reason="TLS-PSK needs Python 3.13+; CI runs this test on 3.13")
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_psk_identity_is_logged_and_given_to_the_resolver(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    from nbdproto.tls import psk_client_context, server_context

    caplog.set_level(logging.INFO)
    key = bytes(range(32))
    identities: list[str | None] = []

    def resolve(name: str, client: n.ClientInfo) -> n.ExportSpec[Any] | None:
        identities.append(client.psk_identity)
        return n.ExportSpec(MemoryDevice(MIB))

    with running(backend, n.ConnectionPolicy(), resolve, tls=server_context(psk={"alice": key})) as server:
        assert size_of(server.uri, tls=psk_client_context("alice", key)) == MIB
    assert identities and set(identities) == {"alice"}
    [chose] = [r.getMessage() for r in caplog.records if "uses export" in r.getMessage()]
    assert "(PSK identity 'alice') uses export ''" in chose


def test_ipv4_mapped_allowed_addresses_are_normalised_as_clients_are() -> None:
    policy = n.ConnectionPolicy(allow_addresses=["::ffff:127.0.0.1", "::ffff:10.0.0.0/104"])
    assert policy.address_allowed("127.0.0.1") and policy.address_allowed("::ffff:127.0.0.1")
    assert policy.address_allowed("10.1.2.3") and not policy.address_allowed("127.0.0.2")
    assert not n.ConnectionPolicy(allow_addresses=["::ffff:127.0.0.1"]).address_allowed("::1")


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_an_ipv4_mapped_allowed_address_serves_its_ipv4_client(backend: str) -> None:
    with running(backend, n.ConnectionPolicy(allow_addresses=["::ffff:127.0.0.1"])) as server:
        assert size_of(server.uri) == MIB
