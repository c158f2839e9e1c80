"""The control socket's file: a unix socket made at a path without following or replacing anything there.

A server that first removed whatever was at the path (a stale socket, it hopes) would remove, or follow,
whatever someone put there; so nothing there is ever replaced, and the socket is made as every file a server
creates is (nbdproto.files.bind_unix_socket: bound in a private directory beside the path, given mode 0600
there, then hard-linked to the path, which fails on anything at all there and follows nothing). When the
server stops it removes the path only if it is still its own socket (same device and inode).

The path's directory must allow hard links (every local Linux file system does).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

from nbdproto.files import DATA_MODE, bind_unix_socket

__all__ = ["ControlSocket", "listen_control"]


class ControlSocket:
    """A listening unix socket at ``path`` (``listen_control``); ``close`` stops it and removes its file."""

    def __init__(self, sock: socket.socket, path: str, identity: tuple[int, int]) -> None:
        self.sock = sock
        self.path = path
        self._identity = identity

    def close(self) -> None:
        """Close the socket and remove its file, if the path still names it (idempotent)."""
        self.sock.close()
        with contextlib.suppress(OSError):
            found = os.stat(self.path, follow_symlinks=False)
            if (found.st_dev, found.st_ino) == self._identity:
                os.unlink(self.path)


def listen_control(path: str | os.PathLike[str], backlog: int = 16) -> ControlSocket:
    """A unix socket listening at ``path``, mode 0600, made as the module docstring says
    (nbdproto.files.bind_unix_socket). FileExistsError when something is at ``path`` already; OSError when the
    directory cannot be used."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "something is there already (a stale socket? remove it first)", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_unix_socket(sock, path, DATA_MODE)
        sock.listen(backlog)
        found = os.stat(path, follow_symlinks=False)
    except BaseException:
        sock.close()
        raise
    return ControlSocket(sock, path, (found.st_dev, found.st_ino))
