"""A loopback TCP proxy that records every chunk passing through it, in order, with its direction.

Put it between a real client and a real server to capture what they say to each other:

    with RecordingProxy(("127.0.0.1", server_port)) as proxy:
        run_client(f"nbd://127.0.0.1:{proxy.port}/")
    proxy.chunks  # [("c2s", b"..."), ("s2c", b"..."), ...]

It listens on 127.0.0.1 only, serves the connections that arrive until it is closed, and bounds every wait.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType

__all__ = ["RecordingProxy"]


class RecordingProxy:
    def __init__(self, upstream: tuple[str, int], timeout: float = 30.0) -> None:
        self.upstream = upstream
        self.timeout = timeout
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[list[tuple[str, bytes]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._workers: list[threading.Thread] = []

    @property
    def chunks(self) -> list[tuple[str, bytes]]:
        """The chunks of the first connection (most captures use one)."""
        return self.connections[0] if self.connections else []

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(self.timeout)
        for worker in self._workers:
            worker.join(self.timeout)

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            record: list[tuple[str, bytes]] = []
            self.connections.append(record)
            worker = threading.Thread(target=self._pump, args=(client, record), daemon=True)
            self._workers.append(worker)
            worker.start()

    def _pump(self, client: socket.socket, record: list[tuple[str, bytes]]) -> None:
        server = socket.create_connection(self.upstream, timeout=self.timeout)
        peers = {client: (server, "c2s"), server: (client, "s2c")}
        with selectors.DefaultSelector() as selector, client, server:
            for sock in peers:
                sock.setblocking(True)
                selector.register(sock, selectors.EVENT_READ)
            open_ends = 2
            while open_ends:
                ready = selector.select(self.timeout)
                if not ready:
                    break  # nothing moved for `timeout` seconds: give up rather than hang
                for key, _ in ready:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    other, direction = peers[sock]
                    try:
                        data = sock.recv(1 << 20)
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(sock)
                        open_ends -= 1
                        with contextlib.suppress(OSError):
                            other.shutdown(socket.SHUT_WR)
                        continue
                    record.append((direction, data))
                    other.sendall(data)
