"""Listening sockets from addresses, and what a server knows of a connected peer (how logs name it)."""

from __future__ import annotations

import socket
from typing import Any

from nbdproto.serving import ClientInfo

__all__ = ["LISTEN_BACKLOG", "listen_socket", "peer_name", "client_info"]

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
    return client_info(sock).address


def client_info(sock: socket.socket) -> ClientInfo:
    """What a server knows of the client at the other end of an accepted ``sock`` (nbdproto.ClientInfo): how
    logs name it (host:port, [v6]:port, "unix") and its IP address, for the connection policy."""
    try:
        address = sock.getpeername()
    except OSError:
        return ClientInfo("?")
    if sock.family == socket.AF_INET6:
        return ClientInfo(f"[{address[0]}]:{address[1]}", address[0])
    if sock.family == socket.AF_INET:
        return ClientInfo(f"{address[0]}:{address[1]}", address[0])
    if sock.family == socket.AF_UNIX:
        return ClientInfo("unix" if not address else f"unix:{address}", unix=True)
    return ClientInfo(str(address))
