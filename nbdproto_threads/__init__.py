"""nbdproto_threads: NBD server and client over blocking sockets and threads.

Server side: ``Server`` (many connections, a thread each), ``ServerSession`` / ``negotiate`` (one accepted
socket, the seed's negotiate-then-serve contract). Devices: the ``BlockDevice`` protocol, ``MemoryDevice``
(sparse, in memory) and ``FileDevice`` (a file or block device).

The names are loaded on first use (PEP 562): a client (``nbdproto copy``, ``nbdproto info``) should not pay for
importing the server, its thread pool and logging, or ctypes for the file device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdproto._lazy import lazy_names

if TYPE_CHECKING:
    from nbdproto._export import DeviceCapabilities

    from ._client import Client, Connection, NBDError, connect, list_exports, negotiate_client, open_connection
    from ._device import BlockDevice
    from ._file import FileDevice
    from ._memory import MemoryDevice
    from ._server import ExportSpec, Resolver, Server, ServerSession, negotiate

_WHERE = {
    "Client": "._client",
    "NBDError": "._client",
    "connect": "._client",
    "list_exports": "._client",
    "Connection": "._client",
    "open_connection": "._client",
    "negotiate_client": "._client",
    "BlockDevice": "._device",
    "DeviceCapabilities": "nbdproto._export",
    "MemoryDevice": "._memory",
    "FileDevice": "._file",
    "ExportSpec": "._server",
    "Resolver": "._server",
    "Server": "._server",
    "ServerSession": "._server",
    "negotiate": "._server",
}

__all__ = [
    "Client",
    "NBDError",
    "connect",
    "list_exports",
    "Connection",
    "open_connection",
    "negotiate_client",
    "BlockDevice",
    "DeviceCapabilities",
    "MemoryDevice",
    "FileDevice",
    "ExportSpec",
    "Resolver",
    "Server",
    "ServerSession",
    "negotiate",
]


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
