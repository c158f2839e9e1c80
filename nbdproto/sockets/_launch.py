"""Socket activation, the starter's side: run an NBD server command on a private unix socket, as libnbd's
connect_systemd_socket_activation does (nbdinfo and nbdcopy's ``-- [ CMD ARGS ]``).

The starter makes a directory only it can enter, binds and listens on a unix socket there, and starts the
command with that socket as descriptor 3, ``LISTEN_FDS=1`` and ``LISTEN_PID`` set to the command's own process
id (see _activation for the server's half). A client can connect at once: the socket listens before the server
runs, so there is nothing to wait or retry for. Once the command runs, the starter closes its own copy of the
socket, so if the server dies the client's connect is refused or reset instead of waiting forever.

The process id is only known once the process exists, and it must be in its environment before the command
runs: a two-word shell script does it (``sh -c 'LISTEN_PID=$$ ... exec "$@"'``: the shell's pid is the
command's, since ``exec`` keeps it), started with ``os.posix_spawn``, which also moves the socket to descriptor
3, with no Python code running between fork and exec (unsafe in a process with threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import time
import weakref
from collections.abc import Sequence

from nbdproto.client import NbdUri

from ._activation import LISTEN_FDS_START
from ._listen import listen_socket

__all__ = ["ActivatedServer", "STOP_TIMEOUT"]

STOP_TIMEOUT = 10.0
"""Seconds a stopped server has to exit after SIGTERM (a server flushing its disk) before SIGKILL."""

_SHIM = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


class ActivatedServer:
    """An NBD server ``command`` (argv, searched on PATH) started with socket activation on a private unix
    socket; ``stop()`` (or leaving the ``with`` block) ends it and removes the socket's directory.

    ``socket_path``: where to connect; ``target(uri)`` puts it in a planned NbdUri. The command inherits
    this process's standard input, output and error, as under libnbd. Raises ValueError for an empty command,
    OSError when the socket or the process cannot be made (a command that is not found exits with status 127:
    connecting then fails, and ``explain()`` says why).
    """

    def __init__(self, command: Sequence[str], *, stop_timeout: float = STOP_TIMEOUT) -> None:
        if isinstance(command, str) or not command or not all(isinstance(arg, str) for arg in command):
            raise ValueError(f"a server command is a non-empty list of strings, not {command!r}")
        self.command = list(command)
        self.stop_timeout = stop_timeout
        self.status: int | None = None
        """The exit status once the process has been reaped (negative: the signal that killed it)."""
        self._exited_by_itself = False
        self._reaped = False
        self._stopping = False
        self._stopped = False
        self.directory = tempfile.mkdtemp(prefix="nbdproto-")
        self.socket_path = os.path.join(self.directory, "socket")
        try:
            with listen_socket(self.socket_path) as sock:
                self.pid = _spawn(self.command, sock)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        # Never stopped (a client dropped without close, or still open at interpreter exit): the server must
        # not outlive its user. SIGTERM only: a finalizer does not wait.
        self._finalizer = weakref.finalize(self, _abandon, self.pid, self.directory)

    def target(self, planned: NbdUri | None = None) -> NbdUri:
        """``planned`` (export name, TLS settings) with this server's unix socket as the place to connect."""
        return dataclasses.replace(planned or NbdUri(), unix=True, socket=self.socket_path)

    def poll(self) -> int | None:
        """The exit status if the process has exited (it is then reaped), else None."""
        self._reap(os.WNOHANG)
        return self.status

    def explain(self, failure: BaseException, wait: float = 0.5) -> BaseException:
        """The error to raise when connecting to the server failed with ``failure``: if the command exited by
        itself (waited for up to ``wait`` seconds: a dying process closes its sockets just before it can be
        reaped), a ConnectionError saying so; else ``failure`` itself."""
        self._wait(wait)
        if not self._exited_by_itself or self.status is None:
            return failure
        how = f"was killed by signal {-self.status}" if self.status < 0 else f"exited with status {self.status}"
        return ConnectionError(f"the server command {self.command[0]!r} {how} ({failure})")

    def failed(self, failure: BaseException) -> BaseException:
        """Connecting to the server failed with ``failure``: stop the server, and return the error to raise
        (``explain``'s)."""
        try:
            return self.explain(failure)
        finally:
            self.stop()

    def stop(self) -> int | None:
        """End the server: SIGTERM, then SIGKILL after ``stop_timeout`` seconds; remove the socket's directory.
        Idempotent; returns the exit status (None if it could not be known)."""
        if self._stopped:
            return self.status
        try:
            if self.poll() is None:
                self._stopping = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
                if not self._wait(self.stop_timeout):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    self._reap(0)
        finally:
            self._stopped = True
            self._finalizer.detach()
            shutil.rmtree(self.directory, ignore_errors=True)
        return self.status

    def __enter__(self) -> ActivatedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait(self, timeout: float) -> bool:
        # Polled, with a growing pause: only a stopping server is waited for, and it exits within milliseconds.
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            self._reap(os.WNOHANG)
            if self._reaped or time.monotonic() >= deadline:
                return self._reaped
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _reap(self, options: int) -> None:
        if self._reaped:
            return
        try:
            pid, wait_status = os.waitpid(self.pid, options)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): its status is lost
            self._reaped = True
            return
        if pid == 0:
            return
        self._reaped = True
        self.status = os.waitstatus_to_exitcode(wait_status)
        self._exited_by_itself = not self._stopping


def _abandon(pid: int, directory: str) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    shutil.rmtree(directory, ignore_errors=True)


def _spawn(command: list[str], sock: socket.socket) -> int:
    env = {name: value for name, value in os.environ.items() if name not in ("LISTEN_PID", "LISTEN_FDNAMES")}
    env["LISTEN_FDS"] = "1"
    env["LISTEN_FDNAMES"] = "nbd"
    # posix_spawn's dup2 onto the same number would leave the descriptor close-on-exec: give it another first.
    moved = sock.dup() if sock.fileno() == LISTEN_FDS_START else None
    try:
        source = (moved or sock).fileno()
        return os.posix_spawn(
            "/bin/sh",
            ["sh", "-c", _SHIM, "sh", *command],
            env,
            file_actions=[(os.POSIX_SPAWN_DUP2, source, LISTEN_FDS_START)],
        )
    finally:
        if moved is not None:
            moved.close()
