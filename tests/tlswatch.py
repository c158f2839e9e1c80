"""Watch a TLS connection for what OpenSSL forbids: one thread reading it while another writes it or shuts it
down (it corrupts memory). ``TlsOverlaps().socket_class()`` is an ``ssl.SSLSocket`` class to put on a context
(``context.sslsocket_class``); every receive, send and shutdown on the connections it makes is noted, with
whether another thread was inside one at the time."""

from __future__ import annotations

import ssl
import threading
from typing import Any

__all__ = ["TlsOverlaps"]

_WATCHED = ("recv", "recv_into", "send", "sendall", "unwrap", "read", "write")


class TlsOverlaps:
    """Which threads are inside a call on each TLS connection, and how often two were at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside: dict[int, dict[int, int]] = {}  # connection -> thread -> depth (sendall calls send)
        self.calls = 0
        self.overlaps: list[str] = []

    def socket_class(self) -> type[ssl.SSLSocket]:
        watch = self

        def watched(name: str) -> Any:
            original = getattr(ssl.SSLSocket, name)

            def call(sock: ssl.SSLSocket, *args: Any, **kwargs: Any) -> Any:
                watch._enter(sock, name)
                try:
                    return original(sock, *args, **kwargs)
                finally:
                    watch._leave(sock)

            return call

        return type("WatchedSSLSocket", (ssl.SSLSocket,), {name: watched(name) for name in _WATCHED})

    def assert_none(self, at_least: int) -> None:
        """No call overlapped another thread's, among at least ``at_least`` calls (the watch saw the traffic)."""
        assert self.calls >= at_least, f"only {self.calls} calls were watched"
        assert not self.overlaps, f"{len(self.overlaps)} calls overlapped another thread's: {self.overlaps[:5]}"

    def _enter(self, sock: object, name: str) -> None:
        me = threading.get_ident()
        with self._lock:
            threads = self._inside.setdefault(id(sock), {})
            if any(thread != me for thread in threads):
                self.overlaps.append(name)
            threads[me] = threads.get(me, 0) + 1
            self.calls += 1

    def _leave(self, sock: object) -> None:
        me = threading.get_ident()
        with self._lock:
            threads = self._inside[id(sock)]
            threads[me] -= 1
            if not threads[me]:
                del threads[me]
