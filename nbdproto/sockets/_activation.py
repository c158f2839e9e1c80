"""Socket activation, the server's side: take the listening sockets a service manager passed.

The protocol is systemd's (sd_listen_fds(3)), which libnbd's connect_systemd_socket_activation, nbdinfo and
nbdcopy (``-- [ CMD ]``), qemu-nbd and nbdkit all speak: the starter binds and listens, then starts the server
with the sockets as descriptors 3, 4, ... and ``LISTEN_FDS`` saying how many, ``LISTEN_PID`` the server's own
process id (so that a child the server starts does not take the sockets for its own), and optionally
``LISTEN_FDNAMES`` (names, colon-separated; a server that serves every socket alike has no use for them). The
server checks the pid, and removes the variables so that its own children do not see them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

__all__ = ["LISTEN_FDS_START", "activated_sockets"]

LISTEN_FDS_START = 3
"""The first descriptor a service manager passes (SD_LISTEN_FDS_START)."""

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_MAX_SOCKETS = 1024


def activated_sockets(environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[socket.socket]:
    """The listening sockets passed to this process by socket activation, in order (from descriptor 3), as
    blocking sockets that are not inherited by children; [] when this process was not socket-activated
    (``LISTEN_PID`` missing or another process's id, as for a child of an activated process).

    ``environ``: where the variables are (os.environ); ``unset``: remove them from it (always, matched or
    not, as sd_listen_fds does), so that programs this one starts are not misled. Raises ValueError for
    variables that are not numbers and OSError naming the descriptor when one is not an open, listening
    stream socket.
    """
    env = os.environ if environ is None else environ
    pid_text, count_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    try:
        if pid_text is None or count_text is None:
            return []
        if _number("LISTEN_PID", pid_text) != os.getpid():
            return []
        count = _number("LISTEN_FDS", count_text)
        if count > _MAX_SOCKETS:
            raise ValueError(f"LISTEN_FDS={count_text}: more than {_MAX_SOCKETS} sockets")
        sockets: list[socket.socket] = []
        try:
            for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
                sockets.append(_listening(fd))
        except BaseException:
            for sock in sockets:
                sock.detach()  # not ours to close: the error is reported, the descriptors stay as passed
            raise
        return sockets
    finally:
        if unset:
            for name in _VARIABLES:
                env.pop(name, None)


def _number(name: str, text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"{name}={text!r} is not a number")
    return int(text)


def _listening(fd: int) -> socket.socket:
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, f"socket activation: descriptor {fd} is not a socket: {exc.strerror}") from None
    try:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(f"socket activation: descriptor {fd} is not a listening stream socket")
    except BaseException:
        sock.detach()
        raise
    sock.setblocking(True)
    return sock
