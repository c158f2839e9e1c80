"""nbdproto_threads: NBD server and client over blocking sockets and threads."""

__all__: list[str] = []
