"""nbdproto_threads: NBD server and client over blocking sockets and threads.

Server side: ``Server`` (many connections, a thread each), ``ServerSession`` / ``negotiate`` (one accepted
socket, the seed's negotiate-then-serve contract). Devices: the ``BlockDevice`` protocol, ``MemoryDevice``
(sparse, in memory) and ``FileDevice`` (a file or block device).

The names are loaded on first use (PEP 562): a client (``nbdproto copy``, ``nbdproto info``) should not pay for
importing the server, its thread pool and logging, or ctypes for the file device.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
