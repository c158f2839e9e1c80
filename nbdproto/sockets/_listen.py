"""Listening sockets from addresses, and how a connected peer is named in logs."""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["LISTEN_BACKLOG", "listen_socket", "peer_name"]

LISTEN_BACKLOG = 128


def listen_socket(address: tuple[str, int] | str) -> socket.socket:
    """A socket listening on ``(host, port)`` (IPv4 or IPv6 literal or name; port 0 for any) or on a unix
    socket ``path``. OSError when the address cannot be bound."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_to: Any = address
    else:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_to = (host, port)
    try:
        sock.bind(bind_to)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_name(sock: socket.socket) -> str:
    """How logs name the client at the other end of ``sock``: host:port, [v6]:port, or "unix"."""
    try:
        address = sock.getpeername()
    except OSError:
        return "?"
    if sock.family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    if sock.family == socket.AF_INET:
        return f"{address[0]}:{address[1]}"
    return "unix" if not address else f"unix:{address}"
