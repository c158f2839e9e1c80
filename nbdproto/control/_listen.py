"""The control socket's file: a unix socket made at a path without following or replacing anything there.

Binding a unix socket creates its file with the process's umask, and a server that first removed whatever was
at the path (a stale socket, it hopes) would remove, or follow, whatever someone put there. So the socket is
bound in a private directory made beside the path (mode 0700: nobody else can reach it), given mode 0600
there, and only then linked to the path: ``link`` fails if anything at all is at the path (a file, a socket, a
symbolic link, dangling or not), and never follows it. The private directory is removed at once. When the
server stops it removes the path only if it is still its own socket (same device and inode).

The path's directory must be on one file system with the private one (it is the same directory) and allow
hard links (every local Linux file system does).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile

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
    """A unix socket listening at ``path``, mode 0600, made as the module docstring says. FileExistsError when
    something is at ``path`` already; OSError when the directory cannot be used."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "something is there already (a stale socket? remove it first)", path)
    private = tempfile.mkdtemp(prefix=".c", dir=os.path.dirname(path))
    bound = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(bound)
        except OSError as exc:
            if len(os.fsencode(bound)) >= 108:  # sockaddr_un's sun_path
                raise OSError(errno.ENAMETOOLONG, "the path is too long for a unix socket", path) from None
            raise OSError(exc.errno, exc.strerror, path) from None
        os.chmod(bound, 0o600)
        sock.listen(backlog)
        try:
            os.link(bound, path, follow_symlinks=False)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "something is there already", path) from None
        found = os.stat(path, follow_symlinks=False)
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(bound)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return ControlSocket(sock, path, (found.st_dev, found.st_ino))
