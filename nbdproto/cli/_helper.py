"""``nbdproto serve`` as another program's helper: where it listens when started by one (socket activation, a
private socket for ``--run``), and what it does for the program that started it: ``--run``, ``--pid-file``,
``--fork``, ``--exit-with-parent``; and the connection policy options.

The moment that matters to a starter is "ready": the exports are open and the server listens, so a connect
succeeds at once. Only then is the pid file written, the ``--fork`` parent released, and the ``--run`` command
started. What each does follows nbdkit (``--run``'s variables, its exit status, ``--exit-with-parent``) and
qemu-nbd (``--fork`` and ``--pid-file``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field

import nbdproto
from nbdproto.files import PID_FILE_MODE, replace_file
from nbdproto.sockets import activated_sockets, listen_socket

from ._errors import UsageError

__all__ = ["Listening", "listen", "connection_policy", "Helper", "set_parent_death_signal"]

log = logging.getLogger("nbdproto.cli")

PR_SET_PDEATHSIG = 1
"""prctl(2): the signal a process gets when its parent exits."""
PARENT_POLL = 0.5
"""Seconds between looks at the parent where the system cannot signal its death (not Linux)."""
RUN_STOP_TIMEOUT = 10.0
"""Seconds a ``--run`` command has to exit after SIGTERM when the server is stopped under it."""


@dataclass
class Listening:
    """The sockets serve listens on, and what to clean up after them."""

    sockets: list[socket.socket]
    activated: bool = False
    """Passed by socket activation: the starter knows where they are, and owns their paths."""
    remove: list[str] = field(default_factory=list)
    """Our own unix socket (``--socket``) and private directory (``--run`` without an address), removed at exit."""

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for path in self.remove:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def listen(args: argparse.Namespace) -> Listening:
    """Where serve listens: the sockets socket activation passed (LISTEN_PID is ours), else a private unix
    socket in a new directory for ``--run`` without an address, else ``--socket`` or ``--host``/``--port``.
    UsageError when that cannot be done."""
    try:
        passed = activated_sockets()
    except (OSError, ValueError) as exc:
        raise UsageError(f"socket activation: {exc}") from None
    if passed:
        if args.socket:
            for sock in passed:
                sock.detach()
            raise UsageError("--socket cannot be used under socket activation: the sockets are passed")
        return Listening(passed, activated=True)
    if args.run and not args.socket and not args.address_given:
        directory = tempfile.mkdtemp(prefix="nbdproto-")
        try:
            return Listening([listen_socket(os.path.join(directory, "socket"))], remove=[directory])
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise UsageError(f"cannot listen on a private socket in {directory}: {exc.strerror or exc}") from None
    if args.socket and os.path.exists(args.socket):
        raise UsageError(f"{args.socket} already exists")
    try:
        sock = listen_socket(args.socket or (args.host, args.port))
    except OSError as exc:
        where = args.socket or f"{args.host}:{args.port}"
        raise UsageError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return Listening([sock], remove=[args.socket] if args.socket else [])


def connection_policy(args: argparse.Namespace) -> nbdproto.ConnectionPolicy:
    """The ConnectionPolicy of ``--oneshot``, ``--max-connections``, ``--allow-address``, ``--allow-client-dn``."""
    if args.max_connections < 0:
        raise UsageError(f"--max-connections {args.max_connections}: must be 1 or more (0: no limit)")
    if args.allow_client_dn:
        if not args.tls_verify_client:
            raise UsageError("--allow-client-dn needs --tls-verify-client (and --tls-ca): only a verified "
                             "certificate's subject means anything")  # fmt: skip
        if args.tls != "require":
            raise UsageError("--allow-client-dn needs --tls require: with optional TLS a client could skip the "
                             "certificate check by not starting TLS")  # fmt: skip
    for pattern in args.allow_client_dn:
        try:
            nbdproto.serving.SubjectPattern(pattern)
        except ValueError as exc:
            raise UsageError(f"--allow-client-dn: {exc}") from None
    try:
        return nbdproto.ConnectionPolicy(
            oneshot=args.oneshot,
            max_connections=args.max_connections,
            allow_addresses=args.allow_address,
            allow_client_dn=args.allow_client_dn,
        )
    except ValueError as exc:
        raise UsageError(f"--allow-address: {exc}") from None


class Helper:
    """What serve does for the program that started it (see the module docstring), as ``args`` ask.

    In order: ``watch_parent()`` at start-up; ``fork()`` once listening (the parent never returns from it);
    ``ready(uri, stop)`` once the server runs; ``finish()`` after it stopped and the devices were flushed,
    which returns the exit status.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        if args.fork and args.run:
            raise UsageError("--fork and --run cannot be combined: with --run the server lives as long as the "
                             "command, in the foreground")  # fmt: skip
        if args.fork and args.exit_with_parent:
            raise UsageError("--fork and --exit-with-parent cannot be combined: a forked server has left its parent")
        if args.pid_file:
            directory = os.path.dirname(os.path.abspath(args.pid_file))
            if not os.path.isdir(directory):
                raise UsageError(f"--pid-file {args.pid_file}: no such directory {directory}")
        self.run = args.run
        self.pid_file = os.path.abspath(args.pid_file) if args.pid_file else None
        self.fork_wanted = args.fork
        self.exit_with_parent = args.exit_with_parent
        self.verbose = args.verbose
        self._ready_pipe: int | None = None
        self._pid_written = False
        self._command: subprocess.Popen[bytes] | None = None
        self._status = 0

    # --- Start-up -------------------------------------------------------------------------------------------

    def watch_parent(self) -> None:
        """``--exit-with-parent``: SIGTERM (a clean shutdown) when the process that started us exits; on Linux
        the kernel sends it (prctl PR_SET_PDEATHSIG), elsewhere a thread watches getppid()."""
        if not self.exit_with_parent:
            return
        parent = os.getppid()
        if not set_parent_death_signal(signal.SIGTERM):
            threading.Thread(target=_watch_parent, args=(parent,), name="exit-with-parent", daemon=True).start()
        elif os.getppid() != parent:  # it died before the kernel was told to watch it
            os.kill(os.getpid(), signal.SIGTERM)

    def fork(self) -> None:
        """``--fork``: the parent waits until the child (which goes on serving, in a session of its own) is
        ready, then exits 0; or, when the child fails first, exits with its status (its error is on stderr)."""
        if not self.fork_wanted:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.setsid()
            self._ready_pipe = write_end
            return
        os.close(write_end)
        said = b""
        while chunk := os.read(read_end, 64):
            said += chunk
        if said == b"ready":
            os._exit(0)
        _, wait_status = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(wait_status)
        os._exit(status if status > 0 else 1)

    # --- Ready ----------------------------------------------------------------------------------------------

    def ready(
        self, uri: nbdproto.NbdUri, tls_mode: nbdproto.TlsMode | None, stop: threading.Event, *, watch: bool = True
    ) -> None:
        """The server accepts connections at ``uri`` (the first export): write the pid file, release a
        ``--fork`` parent, start the ``--run`` command (a thread sets ``stop`` when it exits; without ``watch``
        no thread is started, and the caller polls ``command``: a process that forks later should have no
        other thread). A failure here stops the server with status 1."""
        try:
            if self.pid_file:
                _write_pid_file(self.pid_file)
                self._pid_written = True
        except OSError as exc:
            print(f"nbdproto serve: cannot write --pid-file {self.pid_file}: {exc.strerror or exc}", file=sys.stderr)
            self._status = 1
            stop.set()
            return
        if self._ready_pipe is not None:
            self._detach()
        if self.run:
            self._start_command(uri, tls_mode, stop, watch)

    @property
    def command(self) -> subprocess.Popen[bytes] | None:
        """The ``--run`` command, once started."""
        return self._command

    def _detach(self) -> None:
        # The forked server's parent exits now: leave its terminal and pipes (a caller reading our output to
        # its end must not wait for the server); the log stays on stderr with --verbose.
        sys.stdout.flush()
        assert self._ready_pipe is not None
        with contextlib.suppress(OSError):  # the parent is gone: nothing to tell
            os.write(self._ready_pipe, b"ready")
        os.close(self._ready_pipe)
        self._ready_pipe = None
        self.leave_output()

    def become_worker(self) -> None:
        """In a process the server forked to serve (``--workers``): the ``--fork`` parent waits to read "ready"
        or the end of its pipe, which the supervisor writes; this process lets its copy go."""
        if self._ready_pipe is not None:
            os.close(self._ready_pipe)
            self._ready_pipe = None

    def leave_output(self) -> None:
        """For a ``--fork`` server, and each process it forks to serve (``--workers``) once it serves: standard
        input and output (and error, without ``--verbose``) become /dev/null, so that a starter reading our
        output to its end is not kept waiting by a server that goes on serving."""
        if not self.fork_wanted:
            return
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1) if self.verbose else (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    def _start_command(
        self, uri: nbdproto.NbdUri, tls_mode: nbdproto.TlsMode | None, stop: threading.Event, watch: bool
    ) -> None:
        env = dict(os.environ)
        env.update(
            uri=str(uri),
            nbd=str(uri),
            port="" if uri.unix else str(uri.port),
            unixsocket=uri.socket if uri.unix else "",
            exportname=uri.export_name,
        )
        if tls_mode is not None and tls_mode is not nbdproto.TlsMode.NOTLS:
            env["tls"] = "2" if tls_mode is nbdproto.TlsMode.FORCEDTLS else "1"
        sys.stdout.flush()
        command = self._command = subprocess.Popen(self.run, shell=True, env=env)
        if not watch:
            return

        def wait() -> None:
            command.wait()
            stop.set()

        threading.Thread(target=wait, name="run-command", daemon=True).start()

    # --- The end --------------------------------------------------------------------------------------------

    def finish(self) -> int:
        """After the server stopped and flushed: remove the pid file; end the ``--run`` command if it still
        runs (the server was stopped under it). The exit status: the command's (128 + the signal's number if
        a signal killed it, as a shell says), else 0 (1 if getting ready failed)."""
        if self._pid_written and self.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pid_file)
        command = self._command
        if command is None:
            return self._status
        if command.poll() is None:
            command.terminate()
            try:
                command.wait(RUN_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                command.kill()
                command.wait()
        status = command.returncode
        if status < 0:
            print(f"nbdproto serve: the --run command was killed by signal {-status}", file=sys.stderr)
            return 128 - status
        return status


def _write_pid_file(path: str) -> None:
    """Write our pid to ``path`` atomically (a reader never sees an empty or partial file), mode 0644, as
    nbdproto.files creates every file: no guessable temporary name, no symlink followed, and an existing pid
    file replaced only if it is ours and no other user can write it."""
    replace_file(path, f"{os.getpid()}\n".encode(), PID_FILE_MODE)


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` when our parent exits; False where that cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # only here: the other commands start without it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    stopped = threading.Event()
    while os.getppid() == parent:
        stopped.wait(PARENT_POLL)
    log.info("the parent process %d exited: shutting down", parent)
    os.kill(os.getpid(), signal.SIGTERM)
