"""Run an nbdproto server of any backend in the background for a test, and certificates for TLS tests.

``serve_exports(backend, exports, ...)`` is a context manager yielding the server's base URI; the same sync
devices serve every backend (each called as its ``dispatch`` says). Servers listen on
127.0.0.1 port 0 or a unix socket in a temporary directory, and are stopped on exit; start-up is bounded
(the listening socket exists before the context is entered).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
import trustme

import nbdproto
import nbdproto.devices
import nbdproto_anyio
import nbdproto_threads

BACKENDS = ("threads", "asyncio", "trio")


@dataclass
class Export:
    """An export for a test server: a sync device and how to offer it."""

    device: Any
    description: str = ""
    read_only: bool = False
    tls_required: bool = False


@dataclass
class Pki:
    """A throwaway CA and a server certificate for 127.0.0.1, laid out the way libnbd and qemu read them."""

    directory: str
    server_context: ssl.SSLContext
    client_context: ssl.SSLContext


@contextlib.contextmanager
def make_pki(verify_client: bool = False) -> Iterator[Pki]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
    client_cert = ca.issue_cert("client.example")
    with tempfile.TemporaryDirectory(prefix="nbdproto-pki-") as directory:
        ca.cert_pem.write_to_path(os.path.join(directory, "ca-cert.pem"))
        # The names qemu's tls-creds-x509 reads, for tests that run qemu-nbd as the TLS server.
        server_cert.private_key_pem.write_to_path(os.path.join(directory, "server-key.pem"))
        server_cert.cert_chain_pems[0].write_to_path(os.path.join(directory, "server-cert.pem"))
        client_cert.private_key_pem.write_to_path(os.path.join(directory, "client-key.pem"))
        client_cert.cert_chain_pems[0].write_to_path(os.path.join(directory, "client-cert.pem"))
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(server)
        if verify_client:
            ca.configure_trust(server)
            server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(client)
        client_cert.configure_cert(client)
        yield Pki(directory, server, client)


def tls_socket_pair(pki: Pki) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """The two ends of a TLS connection over a socket pair, handshake done: the client's (blocking, 10 s
    timeout) and the server's (blocking until the caller says otherwise)."""
    left, right = socket.socketpair()
    server: list[ssl.SSLSocket] = []
    accepting = threading.Thread(target=lambda: server.append(pki.server_context.wrap_socket(right, server_side=True)))
    accepting.start()
    client = pki.client_context.wrap_socket(left, server_hostname="127.0.0.1")
    accepting.join(10)
    client.settimeout(10)
    return client, server[0]


def _tls_mode(tls: ssl.SSLContext | None, exports: Mapping[str, Export]) -> nbdproto.TlsMode | None:
    if tls is None:
        return None
    return nbdproto.TlsMode.SELECTIVETLS if any(e.tls_required for e in exports.values()) else None


@contextlib.contextmanager
def serve_exports(
    backend: str,
    exports: Mapping[str, Export],
    *,
    tls: ssl.SSLContext | None = None,
    unix: bool = False,
    workers: int = 0,
    max_bytes_in_flight: int = 64 * 1024 * 1024,
    limits: nbdproto.ServerLimits | None = None,
) -> Iterator[str]:
    """Serve ``exports`` with ``backend`` ("threads", "asyncio" or "trio"); yields the URI without export name
    (append the name), e.g. "nbd://127.0.0.1:40123/" or "nbd+unix:///?socket=...". ``limits`` replaces the
    default limits (``max_bytes_in_flight`` is then ignored)."""
    with serving(backend, exports, tls=tls, unix=unix, workers=workers, limits=limits,
                 max_bytes_in_flight=max_bytes_in_flight) as (uri, _):  # fmt: skip
        yield uri


@contextlib.contextmanager
def serving(
    backend: str,
    exports: Mapping[str, Export],
    *,
    tls: ssl.SSLContext | None = None,
    unix: bool = False,
    workers: int = 0,
    max_bytes_in_flight: int = 64 * 1024 * 1024,
    limits: nbdproto.ServerLimits | None = None,
) -> Iterator[tuple[str, Any]]:
    """serve_exports, yielding the server object too (nbdproto_threads.Server or nbdproto_anyio.Server), for
    tests that look at its state."""
    limits = limits or nbdproto.ServerLimits(memory_limit=max_bytes_in_flight)
    with tempfile.TemporaryDirectory(prefix="nbdproto-sock-") as tmp:
        address: tuple[str, int] | str = os.path.join(tmp, "nbd.sock") if unix else ("127.0.0.1", 0)
        if backend == "threads":
            with _serve_threads(exports, address, tls, workers, limits) as (bound, server):
                yield _uri(bound, tls is not None), server
        else:
            with _serve_anyio(backend, exports, address, tls, limits) as (bound, server):
                yield _uri(bound, tls is not None), server


def _uri(bound: Any, tls: bool) -> str:
    scheme = "nbds" if tls else "nbd"
    if isinstance(bound, str):
        return f"{scheme}+unix:///{{}}?socket={bound}"
    return f"{scheme}://127.0.0.1:{bound[1]}/{{}}"


@contextlib.contextmanager
def _serve_threads(
    exports: Mapping[str, Export], address: Any, tls: ssl.SSLContext | None, workers: int, limits: nbdproto.ServerLimits
) -> Iterator[tuple[Any, Any]]:
    specs = {
        name: nbdproto.ExportSpec(e.device, e.description, e.read_only, e.tls_required) for name, e in exports.items()
    }
    server = nbdproto_threads.Server(
        specs, address, tls=tls, tls_mode=_tls_mode(tls, exports), workers=workers, limits=limits
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.address, server
    finally:
        server.shutdown()
        thread.join(10)


@contextlib.contextmanager
def _serve_anyio(
    backend: str, exports: Mapping[str, Export], address: Any, tls: ssl.SSLContext | None, limits: nbdproto.ServerLimits
) -> Iterator[tuple[Any, Any]]:
    specs = {
        name: nbdproto.ExportSpec(e.device, e.description, e.read_only, e.tls_required) for name, e in exports.items()
    }
    server = nbdproto_anyio.Server(specs, tls=tls, tls_mode=_tls_mode(tls, exports), limits=limits)
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        listener = portal.call(nbdproto_anyio.listen, address)
        bound = listener.address
        future = portal.start_task_soon(server.serve, listener)
        try:
            yield bound, server
        finally:
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result(timeout=10)
