"""nbdproto.sockets: the socket set-up both servers and the command line share.

``listen_socket(address)`` binds and listens on a TCP address or a unix socket path (the one place that knows
how: IPv6 literals, SO_REUSEADDR, the backlog); ``AcceptBackoff`` is what an accept loop does when accept()
fails (running out of descriptors must not end a server). Unlike the engine in ``nbdproto``, this package touches
sockets; ``import nbdproto`` never imports it.
"""

from __future__ import annotations

from ._accept import AcceptBackoff
from ._listen import LISTEN_BACKLOG, listen_socket, peer_name

__all__ = ["LISTEN_BACKLOG", "listen_socket", "peer_name", "AcceptBackoff"]
