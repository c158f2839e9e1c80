"""nbdproto_anyio: NBD server and client for asyncio and trio, on anyio.

Server side: ``Server`` (a task per connection) and ``listen``, ``ServerSession`` (one connection, the
negotiate-then-serve contract). It serves the same synchronous devices as the threads server
(``nbdproto.devices``, or any ``nbdproto.BlockDevice``), calling them on the event loop or in worker threads as
their ``dispatch`` says. Client: ``connect``, ``AsyncClient``, ``list_exports``, and opt-mode questions: ``inquire``,
``export_info``, ``list_meta_contexts``.
"""

from __future__ import annotations

from ._client import AsyncClient, connect, export_info, inquire, list_exports, list_meta_contexts
from ._server import Server, ServerSession, listen

__all__ = [
    "Server",
    "ServerSession",
    "listen",
    "AsyncClient",
    "connect",
    "inquire",
    "export_info",
    "list_meta_contexts",
    "list_exports",
]
