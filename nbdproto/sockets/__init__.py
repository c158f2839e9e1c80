"""nbdproto.sockets: the socket set-up both servers, both clients and the command line share.

``listen_socket(address)`` binds and listens on a TCP address or a unix socket path (the one place that knows
how: IPv6 literals, SO_REUSEADDR, the backlog); ``activated_sockets()`` takes the listening sockets a service
manager passed instead (systemd's socket activation, as nbdinfo and nbdcopy start servers); ``client_info``
says what a server knows of an accepted client; ``AcceptBackoff`` is what an accept loop does when accept()
fails (running out of descriptors must not end a server). ``ActivatedServer`` is the starter's side of socket
activation: a server command run on a private unix socket, as a client's ``connect(command=[...])`` does.
``SharedClientCount`` keeps the connection policy's counts for several processes serving one listening socket
(``nbdproto serve --workers``), in memory made by ``anonymous_file``, as a shared memory export's is.
``step_past`` is what a driver does after a partial scatter-gather send of the engine's pieces, and
``send_without_waiting`` sends them as far as a socket takes them now (``IOV_MAX`` buffers per call at most).
For blocking clients, below every backend: ``SocketStream`` (a socket as the engine's byte pipe), ``SharedTls`` (one TLS
connection several threads use at once), ``connect_socket`` / ``negotiate_client`` / ``open_together``
(connecting and negotiating, as the threads client and ``nbdproto.devices.NbdDevice`` do). For servers:
``TlsChannel`` (a TLS connection one thread or task drives without blocking: a whole payload per call, full
records out).
Unlike the engine in ``nbdproto``, this package touches sockets and processes; ``import nbdproto`` never
imports it, and its names load on first use (a client's start-up does not pay for logging and mmap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdproto.serving import lazy_names

if TYPE_CHECKING:
    from ._accept import AcceptBackoff
    from ._activation import LISTEN_FDS_START, activated_sockets
    from ._anonymous import anonymous_file
    from ._clientcount import SharedClientCount
    from ._connect import Connection, connect_socket, negotiate_client, open_together
    from ._launch import STOP_TIMEOUT, ActivatedServer
    from ._listen import LISTEN_BACKLOG, client_info, listen_socket, peer_name
    from ._sending import IOV_MAX, send_without_waiting, step_past
    from ._shared_tls import SharedTls
    from ._stream import SocketStream
    from ._tls_channel import TLS_RECORD_SIZE, TlsChannel

_WHERE = {
    "AcceptBackoff": "._accept",
    "LISTEN_FDS_START": "._activation",
    "activated_sockets": "._activation",
    "anonymous_file": "._anonymous",
    "SharedClientCount": "._clientcount",
    "STOP_TIMEOUT": "._launch",
    "ActivatedServer": "._launch",
    "LISTEN_BACKLOG": "._listen",
    "client_info": "._listen",
    "listen_socket": "._listen",
    "peer_name": "._listen",
    "IOV_MAX": "._sending",
    "step_past": "._sending",
    "send_without_waiting": "._sending",
    "Connection": "._connect",
    "connect_socket": "._connect",
    "negotiate_client": "._connect",
    "open_together": "._connect",
    "SharedTls": "._shared_tls",
    "SocketStream": "._stream",
    "TlsChannel": "._tls_channel",
    "TLS_RECORD_SIZE": "._tls_channel",
}

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
    "IOV_MAX",
    "step_past",
    "send_without_waiting",
    "SocketStream",
    "SharedTls",
    "TlsChannel",
    "TLS_RECORD_SIZE",
    "Connection",
    "connect_socket",
    "negotiate_client",
    "open_together",
]

if not TYPE_CHECKING:  # type checkers see the imports above; a __getattr__ would hide misspelt names
    __getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
