"""nbdproto_anyio: NBD server and client for asyncio and trio, on anyio.

Server side: ``Server`` (a task per connection), ``ServerSession`` (one connection, the seed's
negotiate-then-serve contract). Devices: the ``AsyncBlockDevice`` protocol, ``AsyncMemoryDevice``,
``AsyncFileDevice``, and ``AsyncDeviceAdapter`` for any sync device.
"""

from nbdproto._export import DeviceCapabilities

from ._client import AsyncClient, NBDError, connect, list_exports
from ._device import AsyncBlockDevice, AsyncDeviceAdapter, AsyncFileDevice, AsyncMemoryDevice
from ._server import AsyncExportSpec, AsyncResolver, Server, ServerSession, listen

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
