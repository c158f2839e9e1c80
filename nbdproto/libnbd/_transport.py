"""The sockets a handle talks over, and the servers it starts (libnbd(3) "CONNECTING TO LOCAL OR REMOTE NBD
SERVERS"): TCP (every address getaddrinfo gives, tried in turn, without blocking), unix sockets, AF_VSOCK, a
socket the script made, a server on a socket pair as its standard input and output (``connect_command``:
``nbdkit -s``, ``nbd-server`` with port 0), and a server started with systemd socket activation
(``nbdproto.sockets.ActivatedServer``, as ``connect_systemd_socket_activation`` does it: qemu-nbd, nbdkit).

Every socket is non-blocking: the handle's state machine waits with poll, never in a system call.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from nbdproto.sockets import ActivatedServer

from ._errors import Failure

__all__ = ["Subprocess", "tcp_addresses", "begin_connect", "unix_address", "vsock_address", "adopt", "spawn"]

_REAP_TIMEOUT = 10.0
"""Seconds ``close`` waits for a ``connect_command`` server to exit once its socket is closed (libnbd waits
for ever; a server that ignores the closed socket is sent SIGTERM, then SIGKILL, after this long)."""

Address = Any  # what socket.connect takes for the family


def tcp_addresses(host: str, port: str) -> list[tuple[int, Address]]:
    """The addresses to try for ``host``:``port`` (port: a number or a service name, as libnbd takes it)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Failure(0, f"getaddrinfo: {host}:{port}: {exc.strerror}") from None
    return [(family, address) for family, _, _, _, address in found]


def begin_connect(family: int, address: Address) -> tuple[socket.socket, bool]:
    """A non-blocking socket connecting to ``address``: (socket, whether it is connected already). OSError
    when the connection is refused at once."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    code = sock.connect_ex(address)
    if code in (0, errno.EISCONN):
        return sock, True
    if code in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        return sock, False
    sock.close()
    raise OSError(code, os.strerror(code))


def finish_connect(sock: socket.socket) -> None:
    """The outcome of a connect that was in progress once its socket is writable (OSError if it failed)."""
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


def unix_address(path: str) -> tuple[int, Address]:
    return socket.AF_UNIX, path


def vsock_address(cid: int, port: int) -> tuple[int, Address]:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise Failure(errno.ENOTSUP, "AF_VSOCK is not supported on this platform")
    return family, (cid, port)


def adopt(fd: int) -> socket.socket:
    """The script's own connected socket (``connect_socket``): the handle owns it from now on."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise Failure(exc.errno or errno.EBADF, f"connect_socket: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class Subprocess:
    """A server the handle started: reaped when the handle closes, signalled by ``kill_subprocess``."""

    def __init__(self, process: subprocess.Popen[bytes] | None = None, activated: ActivatedServer | None = None):
        self.process = process
        self.activated = activated

    @property
    def pid(self) -> int:
        if self.process is not None:
            return self.process.pid
        assert self.activated is not None
        return self.activated.pid

    def kill(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except OSError as exc:
            raise Failure(exc.errno or errno.ESRCH, "kill") from None

    def close(self) -> None:
        """The handle is closing: its socket is closed already. A socket-activated server gets SIGTERM (it
        would serve on); a server on the socket pair is waited for, as it exits when its socket closes."""
        if self.activated is not None:
            self.activated.stop()
            return
        process = self.process
        assert process is not None
        for send in (None, signal.SIGTERM, signal.SIGKILL):
            if send is not None:
                with contextlib.suppress(OSError):
                    process.send_signal(send)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_REAP_TIMEOUT)
                return


def spawn(argv: Sequence[str]) -> tuple[socket.socket, Subprocess]:
    """``connect_command``: run ``argv`` with one end of a socket pair as its standard input and output; our
    end, non-blocking, and the process. A command that cannot be run is reported on stderr as a forked child
    would report it, and exits with 127: the handshake then finds the connection closed, as under libnbd."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            process = subprocess.Popen(list(argv), stdin=theirs.fileno(), stdout=theirs.fileno(), close_fds=True)
        except OSError as exc:
            print(f"{argv[0]}: {exc.strerror}", file=sys.stderr)
            process = subprocess.Popen(["sh", "-c", "exit 127"], stdin=theirs.fileno(), stdout=theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return ours, Subprocess(process=process)


def activate(argv: Sequence[str]) -> tuple[str, Subprocess]:
    """``connect_systemd_socket_activation``: start ``argv`` listening on a private unix socket; its path,
    and the server."""
    try:
        server = ActivatedServer(argv)
    except ValueError as exc:
        raise Failure(errno.EINVAL, str(exc)) from None
    except OSError as exc:
        raise Failure(exc.errno or 0, f"socket activation: {exc.strerror or exc}") from None
    return server.socket_path, Subprocess(activated=server)
