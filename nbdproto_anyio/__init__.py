"""nbdproto_anyio: NBD server and client for asyncio and trio, on anyio.

Server side: ``Server`` (a task per connection), ``ServerSession`` (one connection, the seed's
negotiate-then-serve contract). Devices: the ``AsyncBlockDevice`` protocol, ``AsyncMemoryDevice``,
``AsyncFileDevice``, and ``AsyncDeviceAdapter`` for any sync device. Client: ``connect``, ``AsyncClient``.

The names are loaded on first use (PEP 562): the ``nbdproto`` command line lives in this package, and its
commands that need no event loop (copy, info, list) should not pay for importing one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbdproto._export import DeviceCapabilities

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
    "DeviceCapabilities": "nbdproto._export",
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
    "DeviceCapabilities",
    "AsyncExportSpec",
    "AsyncResolver",
    "Server",
    "ServerSession",
    "listen",
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
