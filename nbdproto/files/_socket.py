"""A unix socket at a path, created as the other files are: exclusively, with its mode set before anyone can
connect, never through a planted symlink.

``bind`` creates the socket file with the process's umask, and a ``chmod`` by path afterwards would follow
whatever another user put there meanwhile. So the socket is bound inside a new private directory (0700, in the
target's directory: same file system), given its mode there, and hard-linked to the path (``link`` fails on
anything already there, a symlink included, and follows none), and its temporary name removed. The caller
calls ``listen()`` afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import tempfile

from ._create import DATA_MODE, UnsafeFileError, refusal_of_existing

__all__ = ["bind_unix_socket"]

_SUN_PATH = 108  # the bytes of sockaddr_un's sun_path, its terminating NUL included


def bind_unix_socket(
    sock: socket.socket, path: str | os.PathLike[str], mode: int = DATA_MODE, *, replace_stale: bool = False
) -> None:
    """Bind the AF_UNIX ``sock`` to ``path`` with ``mode`` (0600: only the server's user may connect).

    Something already at ``path`` is an error (FileExistsError), except with ``replace_stale`` a socket that
    the server's user owns, no other user can write, and nobody listens on (what a server killed before it
    could remove its socket leaves): it is replaced. UnsafeFileError for anything else there (a symlink, another
    user's socket). After a failure past the binding (another file appeared at ``path`` meanwhile) ``sock`` is
    bound to a name that is gone: close it."""
    target = os.path.abspath(os.fspath(path))
    if replace_stale:
        _remove_stale(target)
    if os.path.lexists(target):  # (``link`` below decides; this saves binding a socket that cannot be used)
        raise FileExistsError(errno.EEXIST, "something is there already", target)
    private = tempfile.mkdtemp(prefix=".", dir=os.path.dirname(target))
    try:
        temporary = os.path.join(private, "s")
        try:
            sock.bind(temporary)
        except OSError as exc:
            if len(os.fsencode(temporary)) >= _SUN_PATH:
                raise OSError(errno.ENAMETOOLONG, "the path is too long for a unix socket", target) from None
            raise OSError(exc.errno, exc.strerror, target) from None
        os.chmod(temporary, mode)  # inside our own 0700 directory: nothing there but what we put
        os.link(temporary, target)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _remove_stale(target: str) -> None:
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(info.st_mode):  # the rule's owner and mode checks, on a socket instead of a regular file
        reason = refusal_of_existing(os.stat_result((stat.S_IFREG | stat.S_IMODE(info.st_mode), *tuple(info)[1:])))
    else:
        reason = "is not a socket"
    if reason is not None:
        raise UnsafeFileError(errno.EPERM, f"exists and {reason}: only a stale socket of ours is replaced", target)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a listener with a full backlog makes connect wait: it is not stale either
    try:
        probe.connect(target)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise FileExistsError(errno.EEXIST, "a server is listening there", target)
