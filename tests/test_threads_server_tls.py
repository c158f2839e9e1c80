"""The threads server over TLS with a pool of request threads: OpenSSL must never see one connection read in
one thread while another writes it (the rule the threads client follows too, test_threads_client_tls.py). The
server's TLS connections are made with a socket class that notes every receive and send and whether another
thread was inside one at the same time; with replies sent by pool threads while the connection's reader waits
for the client, every such overlap is a connection OpenSSL may corrupt."""

from __future__ import annotations

import ssl
import threading
from typing import Any

import pytest

import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from tests.serving import Export, make_pki, serve_exports
from tests.threaded import run_threads

pytestmark = pytest.mark.timeout(120)


class _Overlaps:
    """Which threads are inside a call on each TLS connection, and how often two were at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside: dict[int, dict[int, int]] = {}  # connection -> thread -> depth (sendall calls send)
        self.calls = 0
        self.overlaps: list[str] = []

    def enter(self, sock: object, name: str) -> None:
        me = threading.get_ident()
        with self.lock:
            threads = self.inside.setdefault(id(sock), {})
            if any(thread != me for thread in threads):
                self.overlaps.append(name)
            threads[me] = threads.get(me, 0) + 1
            self.calls += 1

    def leave(self, sock: object) -> None:
        me = threading.get_ident()
        with self.lock:
            threads = self.inside[id(sock)]
            threads[me] -= 1
            if not threads[me]:
                del threads[me]


def _watched_socket_class(overlaps: _Overlaps) -> type[ssl.SSLSocket]:
    def watch(name: str) -> Any:
        original = getattr(ssl.SSLSocket, name)

        def call(self: ssl.SSLSocket, *args: Any, **kwargs: Any) -> Any:
            overlaps.enter(self, name)
            try:
                return original(self, *args, **kwargs)
            finally:
                overlaps.leave(self)

        return call

    names = ("recv", "recv_into", "send", "sendall", "unwrap", "read", "write")
    return type("WatchedSSLSocket", (ssl.SSLSocket,), {name: watch(name) for name in names})


def test_a_pooled_tls_connection_is_never_read_while_a_pool_thread_writes_it() -> None:
    overlaps = _Overlaps()
    with make_pki() as pki:
        pki.server_context.sslsocket_class = _watched_socket_class(overlaps)
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
