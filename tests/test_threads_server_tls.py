"""The threads server over TLS with a pool of request threads: OpenSSL must never see one connection read in
one thread while another writes it (the rule the threads client follows too, test_threads_client_tls.py). The
server's TLS connections are made with a socket class that notes every receive and send and whether another
thread was inside one at the same time; with replies sent by pool threads while the connection's reader waits
for the client, every such overlap is a connection OpenSSL may corrupt."""

from __future__ import annotations

import pytest

import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice, NbdDevice
from tests.serving import Export, make_pki, serve_exports
from tests.threaded import run_threads
from tests.tlswatch import TlsOverlaps

pytestmark = pytest.mark.timeout(120)


def test_a_pooled_tls_connection_is_never_read_while_a_pool_thread_writes_it() -> None:
    overlaps = TlsOverlaps()
    with make_pki() as pki:
        pki.server_context.sslsocket_class = overlaps.socket_class()
        exports = {"d": Export(MemoryDevice(1 << 20))}
        with serve_exports("threads", exports, tls=pki.server_context, workers=4) as base:
            uri = base.format("d")
            with nt.connect(uri, tls=pki.client_context, timeout=20) as client:

                def work(k: int) -> None:
                    for j in range(150):
                        data = bytes([k + j & 0xFF]) * 4096
                        client.pwrite(data, k * 4096)
                        assert client.pread(4096, k * 4096) == data

                run_threads(work, 8)
    assert overlaps.calls > 2400  # the watch saw the traffic: 2400 requests' receives and replies
    assert not overlaps.overlaps, f"{len(overlaps.overlaps)} calls overlapped another thread's: {overlaps.overlaps[:5]}"


def test_the_threads_client_never_reads_a_tls_connection_while_another_thread_writes_it() -> None:
    overlaps = TlsOverlaps()
    with make_pki() as pki:
        pki.client_context.sslsocket_class = overlaps.socket_class()
        exports = {"d": Export(MemoryDevice(1 << 20))}
        with (
            serve_exports("threads", exports, tls=pki.server_context) as base,
            nt.connect(base.format("d"), tls=pki.client_context, timeout=20) as client,
        ):

            def work(k: int) -> None:
                for j in range(150):
                    data = bytes([k + j & 0xFF]) * 4096
                    client.pwrite(data, k * 4096)
                    assert client.pread(4096, k * 4096) == data

            run_threads(work, 8)
    assert overlaps.calls > 2400
    assert not overlaps.overlaps, f"{len(overlaps.overlaps)} calls overlapped another thread's: {overlaps.overlaps[:5]}"


def test_a_remote_device_never_reads_a_tls_connection_while_another_thread_writes_it() -> None:
    overlaps = TlsOverlaps()
    with make_pki() as pki:
        pki.client_context.sslsocket_class = overlaps.socket_class()
        with serve_exports("threads", {"d": Export(MemoryDevice(1 << 20))}, tls=pki.server_context) as base:
            device = NbdDevice(base.format("d"), tls=pki.client_context, connections=1)
            try:

                def work(k: int) -> None:
                    for j in range(150):
                        data = bytes([k + j & 0xFF]) * 4096
                        device.pwrite(data, k * 4096)
                        buffer = bytearray(4096)
                        device.pread_into(memoryview(buffer), k * 4096)
                        assert buffer == data

                run_threads(work, 8)
            finally:
                device.close()
    assert overlaps.calls > 2400
    assert not overlaps.overlaps, f"{len(overlaps.overlaps)} calls overlapped another thread's: {overlaps.overlaps[:5]}"
