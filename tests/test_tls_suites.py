"""The TLS 1.2 cipher suites a certificate server offers: AEAD ones only. ``openssl s_client`` asking for a CBC
suite is refused by the context ``nbdproto.tls.server_context`` makes (on a plain TLS socket: s_client does not
speak NBD's STARTTLS), an AES-GCM one accepted; and the real NBD clients (nbdinfo, qemu-img) still connect to a
server using that context."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto
from nbdproto.devices import MemoryDevice
from tests.conftest import PEER_ENV
from tests.serving import Export, make_pki, serve_exports

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20


def _context(directory: str) -> ssl.SSLContext:
    return nbdproto.tls.server_context(
        certfile=os.path.join(directory, "server-cert.pem"), keyfile=os.path.join(directory, "server-key.pem")
    )


@contextlib.contextmanager
def _tls_listener(context: ssl.SSLContext) -> Iterator[int]:
    """A plain TLS server on loopback: each connection's handshake, then close. Yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(10)
            with contextlib.suppress(OSError), context.wrap_socket(sock, server_side=True) as tls:
                tls.sendall(b"hello\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(10)
        listener.close()


def _s_client(port: int, cipher: str, ca: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-cipher", cipher, "-CAfile", ca],
        input="", capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_openssl_s_client_is_refused_a_cbc_suite_and_served_an_aead_one(peers: Any) -> None:
    peers("openssl")
    with make_pki() as pki, _tls_listener(_context(pki.directory)) as port:
        ca = os.path.join(pki.directory, "ca-cert.pem")
        for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-SHA"):
            result = _s_client(port, cbc, ca)
            assert result.returncode != 0 and "handshake failure" in result.stdout + result.stderr, result
        accepted = _s_client(port, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256", ca)
        # (s_client then reads to the end our listener closes without a close_notify: its status says so)
        assert "New, TLSv1.2, Cipher is ECDHE-ECDSA-AES128-GCM-SHA256" in accepted.stdout, accepted


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_nbd_clients_connect_over_tls_1_2_and_1_3(backend: str, peers: Any) -> None:
    peers("nbdinfo", "qemu-img")
    with make_pki() as pki:
        context = _context(pki.directory)
        with serve_exports(backend, {"disk": Export(MemoryDevice(4 * MIB))}, tls=context) as base:
            uri = base.format("disk") + ("&" if "?" in base else "?") + f"tls-certificates={pki.directory}"
            info = json.loads(
                subprocess.run(
                    ["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60, env=PEER_ENV, check=True
                ).stdout
            )
            assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MIB
            port = base.split(":")[2].split("/")[0]
            for priority in ("NORMAL:-VERS-TLS1.3", "NORMAL"):  # GnuTLS held to TLS 1.2, then as it comes
                qemu = subprocess.run(
                    [
                        "qemu-img", "info", "--output=json",
                        "--object", f"tls-creds-x509,id=tls0,dir={pki.directory},endpoint=client,priority={priority}",
                        "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0",
                    ],
                    capture_output=True, text=True, timeout=60, env=PEER_ENV,
                )  # fmt: skip
                assert qemu.returncode == 0, qemu.stderr
                assert json.loads(qemu.stdout)["virtual-size"] == 4 * MIB
