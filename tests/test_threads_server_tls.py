"""OpenSSL must never see one connection read in one thread while another writes it or shuts it down (it
corrupts memory): every place where threads share a TLS connection, watched. The connections are made with a
socket class that notes every receive, send and goodbye and whether another thread was inside one at the same
time (tests/tlswatch.py); eight threads then write and read back over one connection. The threads server's
request pool (replies sent by pool threads while the connection's reader waits for the client), the threads
client (its reader thread beside the callers) and NbdDevice's wire (callers sending while one of them reads)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice, NbdDevice
from tests.serving import Export, make_pki, serve_exports
from tests.threaded import run_threads
from tests.tlswatch import TlsOverlaps

pytestmark = pytest.mark.timeout(120)

_EXPORTS = {"d": Export(MemoryDevice(1 << 20))}


def _hammer(write: Callable[[bytes, int], object], read: Callable[[int, int], bytes]) -> None:
    """Eight threads on one connection, each writing 150 blocks of its own and reading each back."""

    def work(k: int) -> None:
        for j in range(150):
            data = bytes([k + j & 0xFF]) * 4096
            write(data, k * 4096)
            assert read(4096, k * 4096) == data

    run_threads(work, 8)


@pytest.mark.parametrize("watched", ["server with a request pool", "client"])
def test_a_tls_connection_is_never_read_while_another_thread_writes_it(watched: str) -> None:
    overlaps = TlsOverlaps()
    with make_pki() as pki:
        server = watched.startswith("server")
        (pki.server_context if server else pki.client_context).sslsocket_class = overlaps.socket_class()
        with (
            serve_exports("threads", _EXPORTS, tls=pki.server_context, workers=4 if server else 0) as base,
            nt.connect(base.format("d"), tls=pki.client_context, timeout=20) as client,
        ):
            _hammer(client.pwrite, client.pread)
    overlaps.assert_none(at_least=2400)


def test_a_remote_device_never_reads_a_tls_connection_while_another_thread_writes_it() -> None:
    overlaps = TlsOverlaps()
    with make_pki() as pki:
        pki.client_context.sslsocket_class = overlaps.socket_class()
        with serve_exports("threads", _EXPORTS, tls=pki.server_context) as base:
            device = NbdDevice(base.format("d"), tls=pki.client_context, connections=1)

            def read(length: int, offset: int) -> bytes:
                buffer = bytearray(length)
                device.pread_into(memoryview(buffer), offset)
                return bytes(buffer)

            try:
                _hammer(device.pwrite, read)
            finally:
                device.close()
    overlaps.assert_none(at_least=2400)
