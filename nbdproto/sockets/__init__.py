"""nbdproto.sockets: the socket set-up both servers, both clients and the command line share.

``listen_socket(address)`` binds and listens on a TCP address or a unix socket path (the one place that knows
how: IPv6 literals, SO_REUSEADDR, the backlog); ``activated_sockets()`` takes the listening sockets a service
manager passed instead (systemd's socket activation, as nbdinfo and nbdcopy start servers); ``client_info``
says what a server knows of an accepted client; ``AcceptBackoff`` is what an accept loop does when accept()
fails (running out of descriptors must not end a server). ``ActivatedServer`` is the starter's side of socket
activation: a server command run on a private unix socket, as a client's ``connect(command=[...])`` does.
``SharedClientCount`` keeps the connection policy's counts for several processes serving one listening socket
(``nbdproto serve --workers``), in memory made by ``anonymous_file``, as a shared memory export's is.
Unlike the engine in ``nbdproto``, this package touches sockets and processes; ``import nbdproto`` never
imports it.
"""

from __future__ import annotations

from ._accept import AcceptBackoff
from ._activation import LISTEN_FDS_START, activated_sockets
from ._anonymous import anonymous_file
from ._clientcount import SharedClientCount
from ._launch import STOP_TIMEOUT, ActivatedServer
from ._listen import LISTEN_BACKLOG, client_info, listen_socket, peer_name

__all__ = [
    "LISTEN_BACKLOG",
    "listen_socket",
    "peer_name",
    "client_info",
    "AcceptBackoff",
    "LISTEN_FDS_START",
    "activated_sockets",
    "ActivatedServer",
    "STOP_TIMEOUT",
    "SharedClientCount",
    "anonymous_file",
]
