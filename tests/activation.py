"""Start a process as a service manager does with socket activation, for tests of the server's side."""

from __future__ import annotations

import os
import select
import signal
import socket

from tests.conftest import PEER_ENV

__all__ = ["spawn_activated", "wait_for_exit", "ended"]


def spawn_activated(
    command: list[str], sockets: list[socket.socket], names: str | None = None, stderr: str | None = None
) -> int:
    """Start ``command`` as systemd starts a socket-activated service: the sockets as descriptors 3, 4, ...,
    LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID set to the command's own pid (by a shell that execs it: setting
    it ourselves between fork and exec, as systemd does, would need Python code there). ``stderr``: a file for
    the command's standard error."""
    env = {**PEER_ENV, "LISTEN_FDS": str(len(sockets))}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    # Duplicates first, so that no dup2 onto 3, 4, ... lands on a descriptor still to be moved.
    spare = [sock.dup() for sock in sockets]
    try:
        actions: list[tuple[object, ...]] = [(os.POSIX_SPAWN_DUP2, s.fileno(), 3 + i) for i, s in enumerate(spare)]
        if stderr is not None:
            actions.append((os.POSIX_SPAWN_OPEN, 2, stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        script = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
        return os.posix_spawn("/bin/sh", ["sh", "-c", script, "sh", *command], env, file_actions=actions)
    finally:
        for sock in spare:
            sock.close()


def wait_for_exit(pid: int, timeout: float = 15.0) -> int:
    """The exit status of our child ``pid`` (waited for on its pidfd; killed and an AssertionError after
    ``timeout`` s)."""
    pidfd = os.pidfd_open(pid)
    try:
        exited, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"process {pid} did not exit within {timeout} s")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie its new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
