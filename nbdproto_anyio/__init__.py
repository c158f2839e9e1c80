"""nbdproto_anyio: NBD server and client for asyncio and trio, on anyio."""

__all__: list[str] = []
