"""nbdproto_threads: NBD server and client over blocking sockets and threads.

Server side: ``Server`` (many connections, a thread each), ``ServerSession`` / ``negotiate`` (one accepted
socket, the negotiate-then-serve contract). Client side: ``connect`` and ``Client`` (many threads may
share one), ``list_exports``, ``inquire``, ``export_info`` and ``list_meta_contexts`` (questions asked in opt
mode, without selecting an export), ``open_connection`` for callers that drive the engine themselves
(``open_together``: several at once), and ``copy``: disks copied between NBD exports and files by one thread
driving every connection's engine over non-blocking sockets; ``mount_export``: an export as a file in a FUSE
mount (the ``fuse`` extra). ``SharedTls`` (one TLS connection several threads use at once, safely) and the
blocking connection pieces (``Connection``, ``connect_socket``, ``negotiate_client``, ``open_together``) live
in ``nbdproto.sockets``, below the devices that use them too, and are re-exported here. The devices both
servers serve live in ``nbdproto.devices``.

The names are loaded on first use (PEP 562): a client (``nbdproto copy``, ``nbdproto info``) should not pay for
importing the server, its thread pool and logging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdproto.serving import lazy_names

if TYPE_CHECKING:
    from nbdproto.sockets import Connection, SharedTls, connect_socket, negotiate_client, open_together

    from ._client import Client, connect, export_info, inquire, list_exports, list_meta_contexts, open_connection
    from ._copy import SPARSE_DEFAULT, CopyEnd, CopyFailed, CopyProgress, UnreachableTail, copy
    from ._fuse import mount_export
    from ._server import Server
    from ._session import DEFAULT_WORKERS, ServerSession, negotiate

_WHERE = {
    "Client": "._client",
    "connect": "._client",
    "list_exports": "._client",
    "inquire": "._client",
    "export_info": "._client",
    "list_meta_contexts": "._client",
    "Connection": "nbdproto.sockets",
    "open_connection": "._client",
    "open_together": "nbdproto.sockets",
    "connect_socket": "nbdproto.sockets",
    "negotiate_client": "nbdproto.sockets",
    "CopyEnd": "._copy",
    "CopyFailed": "._copy",
    "UnreachableTail": "._copy",
    "CopyProgress": "._copy",
    "copy": "._copy",
    "SPARSE_DEFAULT": "._copy",
    "mount_export": "._fuse",
    "DEFAULT_WORKERS": "._session",
    "Server": "._server",
    "ServerSession": "._session",
    "negotiate": "._session",
    "SharedTls": "nbdproto.sockets",
}

__all__ = [
    "Client",
    "connect",
    "list_exports",
    "inquire",
    "export_info",
    "list_meta_contexts",
    "Connection",
    "open_connection",
    "open_together",
    "connect_socket",
    "negotiate_client",
    "CopyEnd",
    "CopyFailed",
    "UnreachableTail",
    "CopyProgress",
    "copy",
    "SPARSE_DEFAULT",
    "mount_export",
    "DEFAULT_WORKERS",
    "Server",
    "ServerSession",
    "negotiate",
    "SharedTls",
]


if not TYPE_CHECKING:  # type checkers see the imports above; a __getattr__ would hide misspelt names
    __getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
