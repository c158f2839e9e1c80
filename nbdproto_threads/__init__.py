"""nbdproto_threads: NBD server and client over blocking sockets and threads.

Server side: ``Server`` (many connections, a thread each), ``ServerSession`` / ``negotiate`` (one accepted
socket, the seed's negotiate-then-serve contract). Devices: the ``BlockDevice`` protocol, ``MemoryDevice``
(sparse, in memory) and ``FileDevice`` (a file or block device).
"""

from nbdproto._export import DeviceCapabilities

from ._client import Client, Connection, NBDError, connect, list_exports, negotiate_client, open_connection
from ._device import BlockDevice
from ._file import FileDevice
from ._memory import MemoryDevice
from ._server import ExportSpec, Resolver, Server, ServerSession, negotiate

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
