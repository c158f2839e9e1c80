"""nbdproto_anyio: NBD server and client for asyncio and trio, on anyio.

Server side: ``Server`` (a task per connection) and ``listen``, ``ServerSession`` (one connection, the seed's
negotiate-then-serve contract). It serves the same synchronous devices as the threads server
(``nbdproto.devices``, or any ``nbdproto.BlockDevice``), calling them on the event loop or in worker threads as
their ``dispatch`` says. Client: ``connect``, ``AsyncClient``, ``list_exports``.

The names are loaded on first use (PEP 562): importing the package costs only what the caller touches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdproto import lazy_names

if TYPE_CHECKING:
    from ._client import AsyncClient, connect, list_exports
    from ._server import Server, ServerSession, listen

_WHERE = {
    "AsyncClient": "._client",
    "connect": "._client",
    "list_exports": "._client",
    "Server": "._server",
    "ServerSession": "._server",
    "listen": "._server",
}

__all__ = [
    "AsyncClient",
    "connect",
    "list_exports",
    "Server",
    "ServerSession",
    "listen",
]


if not TYPE_CHECKING:  # type checkers see the imports above; a __getattr__ would hide misspelt names
    __getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
