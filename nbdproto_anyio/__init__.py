"""nbdproto_anyio: NBD server and client for asyncio and trio, on anyio.

Server side: ``Server`` (a task per connection), ``ServerSession`` (one connection, the seed's
negotiate-then-serve contract). Devices: the ``AsyncBlockDevice`` protocol, ``AsyncMemoryDevice``,
``AsyncFileDevice``, and ``AsyncDeviceAdapter`` for any sync device. Client: ``connect``, ``AsyncClient``.

The names are loaded on first use (PEP 562): importing the package costs only what the caller touches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdproto import lazy_names

if TYPE_CHECKING:
    from ._client import AsyncClient, NBDError, connect, list_exports
    from ._device import AsyncBlockDevice, AsyncDeviceAdapter, AsyncFileDevice, AsyncMemoryDevice
    from ._server import AsyncExportSpec, AsyncResolver, Server, ServerSession, listen

_WHERE = {
    "AsyncClient": "._client",
    "NBDError": "._client",
    "connect": "._client",
    "list_exports": "._client",
    "AsyncBlockDevice": "._device",
    "AsyncDeviceAdapter": "._device",
    "AsyncFileDevice": "._device",
    "AsyncMemoryDevice": "._device",
    "AsyncExportSpec": "._server",
    "AsyncResolver": "._server",
    "Server": "._server",
    "ServerSession": "._server",
    "listen": "._server",
}

__all__ = [
    "AsyncClient",
    "NBDError",
    "connect",
    "list_exports",
    "AsyncBlockDevice",
    "AsyncDeviceAdapter",
    "AsyncFileDevice",
    "AsyncMemoryDevice",
    "AsyncExportSpec",
    "AsyncResolver",
    "Server",
    "ServerSession",
    "listen",
]


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
