"""``nbdproto serve`` started by other programs, as processes: by nbdinfo and nbdcopy with socket activation,
with ``--run``, ``--pid-file``, ``--fork`` and ``--exit-with-parent``, and the connection policy options."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

import nbdproto_threads
from tests.activation import ended, spawn_activated, wait_for_exit
from tests.conftest import PEER_ENV
from tests.forkserver import ForkServer
from tests.remotes import free_port
from tests.waiting import unix_listening, wait_until

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20
CLI = [sys.executable, "-m", "nbdproto"]
SERVE = [*CLI, "serve"]
GREETING = 18


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env={**PEER_ENV, **(env or {})})


def sha256(path: Any) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def greeting(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        received = b""
        while len(received) < GREETING and (chunk := sock.recv(GREETING - len(received))):
            received += chunk
        return received


# --- Started by the real tools, with socket activation ------------------------------------------------------


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_nbdinfo_starts_serve_with_socket_activation(backend: str, peers: Any) -> None:
    peers("nbdinfo")
    result = run("nbdinfo", "--json", "--", "[", *SERVE, "--memory", "3M", "--backend", backend, "]")
    assert result.returncode == 0, result.stderr
    # Nothing of serve's on standard output (nbdinfo's): the JSON parses.
    [export] = json.loads(result.stdout)["exports"]
    assert export["export-size"] == 3 * MIB and not export["is_read_only"]


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_nbdcopy_starts_serve_at_either_end(backend: str, peers: Any, tmp_path: Any) -> None:
    peers("nbdcopy")
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(3 * MIB) + bytes(MIB) + os.urandom(MIB))
    out = tmp_path / "out.img"
    result = run("nbdcopy", "--", "[", *SERVE, str(disk), "--backend", backend, "]", str(out))
    assert result.returncode == 0, result.stderr
    assert sha256(out) == sha256(disk)
    result = run("nbdcopy", str(disk), "--", "[", *SERVE, "--memory", "1G", "--backend", backend, "]")
    assert result.returncode == 0, result.stderr
    # Into a file export, to see what arrived.
    target = tmp_path / "target.img"
    target.write_bytes(bytes(5 * MIB))
    result = run("nbdcopy", str(disk), "--", "[", *SERVE, str(target), "--backend", backend, "]")
    assert result.returncode == 0, result.stderr
    assert sha256(target) == sha256(disk)


# --- --run ---------------------------------------------------------------------------------------------------


def test_run_exits_with_the_commands_status_and_leaves_nothing_behind(peers: Any, tmp_path: Any) -> None:
    peers("nbdinfo")
    private = tmp_path / "tmp"
    private.mkdir()
    env = {"TMPDIR": str(private)}
    result = run(*SERVE, "--memory", "1M", "--run", 'nbdinfo --size "$uri"', env=env)
    assert (result.returncode, result.stdout) == (0, f"{MIB}\n"), result.stderr
    # nbdinfo's own status: 2 for "no".
    result = run(*SERVE, "--memory", "1M", "--run", 'nbdinfo --is read-only "$uri"', env=env)
    assert result.returncode == 2, result.stderr
    result = run(
        *SERVE, "--memory", "1M", "--read-only", "--run", 'nbdinfo --is read-only "$uri"', env={**PEER_ENV, **env}
    )
    assert result.returncode == 0, result.stderr
    assert os.listdir(private) == []  # the private socket's directory is gone


def test_run_false_exits_non_zero_and_a_signal_is_reported() -> None:
    result = run(*SERVE, "--memory", "1M", "--run", "false")
    assert result.returncode == 1 and result.stdout == ""
    result = run(*SERVE, "--memory", "1M", "--run", "kill -TERM $$")
    assert result.returncode == 128 + signal.SIGTERM
    assert "the --run command was killed by signal 15" in result.stderr


def test_run_sees_nbdkits_variables(tmp_path: Any) -> None:
    show = 'printf "%s|%s|%s|%s|%s|%s" "$uri" "$nbd" "$port" "$unixsocket" "$exportname" "${tls-unset}"'
    result = run(*SERVE, "--memory", "1M", "--name", "disk", "--run", show)
    uri, nbd, port, unixsocket, exportname, tls = result.stdout.split("|")
    assert uri == nbd == f"nbd+unix:///disk?socket={unixsocket}" and unixsocket.endswith("/socket")
    assert (port, exportname, tls) == ("", "disk", "unset")
    assert not os.path.exists(os.path.dirname(unixsocket))
    result = run(*SERVE, "--memory", "1M", "--port", "0", "--run", show)
    uri, nbd, port, unixsocket, exportname, tls = result.stdout.split("|")
    assert uri == f"nbd://127.0.0.1:{port}/" and int(port) > 0 and (unixsocket, exportname) == ("", "")
    sock = str(tmp_path / "given.sock")
    result = run(*SERVE, "--memory", "1M", "--socket", sock, "--run", show)
    assert result.stdout.split("|")[3] == sock and not os.path.exists(sock)


# --- --pid-file, --fork, --exit-with-parent ------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_pid_file_appears_only_once_a_connect_succeeds(tmp_path: Any) -> None:
    with ForkServer() as forks:
        for i in range(100):
            backend = ("anyio", "threads")[i % 2]
            sock, pid_file = tmp_path / f"{i}.sock", tmp_path / f"{i}.pid"
            argv = ["serve", "--memory", "1M", "--socket", str(sock), "--pid-file", str(pid_file), "--backend", backend]
            pid = forks.start(argv)
            wait_until(pid_file.exists, f"pid file {pid_file} written")
            assert len(greeting(str(sock))) == GREETING, f"serve {backend} #{i}: no greeting"
            assert pid_file.read_text() == f"{pid}\n"
            os.kill(pid, signal.SIGTERM)
            assert forks.wait(pid) == 0
            assert not pid_file.exists() and not sock.exists()


def test_fork_returns_only_once_connectable(tmp_path: Any) -> None:
    sock, pid_file = str(tmp_path / "nbd.sock"), tmp_path / "pid"
    result = run(*SERVE, "--memory", "1M", "--socket", sock, "--fork", "--pid-file", str(pid_file))
    assert result.returncode == 0, result.stderr
    try:
        assert len(greeting(sock)) == GREETING  # at once: no waiting, no retrying
        assert result.stdout == f"serving nbd+unix:///?socket={sock}\n"
        pid = int(pid_file.read_text())
        with nbdproto_threads.connect(f"nbd+unix:///?socket={sock}", timeout=10) as client:
            assert client.export.size == MIB
    finally:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: ended(pid), "the forked server ended")
    wait_until(lambda: not pid_file.exists(), "the pid file removed")


def test_fork_fails_with_the_childs_status_and_error(tmp_path: Any) -> None:
    # The re-exported server refuses the connection: the forked child fails opening its export.
    result = run(*SERVE, f"nbd://127.0.0.1:{free_port()}/", "--socket", str(tmp_path / "s"), "--fork")
    assert result.returncode == 1 and "nbdproto serve:" in result.stderr and result.stdout == ""
    assert not (tmp_path / "s").exists()


def test_exit_with_parent_ends_the_server_when_its_parent_is_killed(tmp_path: Any) -> None:
    sock, pid_file = str(tmp_path / "nbd.sock"), tmp_path / "pid"
    serve = " ".join([*SERVE, "--memory", "1M", "--socket", sock, "--pid-file", str(pid_file), "--exit-with-parent"])
    parent = subprocess.Popen(["sh", "-c", f"{serve} >/dev/null & exec sleep 60"], env=PEER_ENV)
    try:
        wait_until(pid_file.exists, "serving")
        pid = int(pid_file.read_text())
        assert len(greeting(sock)) == GREETING
    finally:
        parent.kill()
        parent.wait()
    # Nothing else ends the server: the parent's death is what does (promptly, by PR_SET_PDEATHSIG; how promptly
    # a loaded machine schedules it is not the rule).
    wait_until(lambda: ended(pid), "the server ended after its parent was killed")
    wait_until(lambda: not os.path.exists(sock) and not pid_file.exists(), "the socket and pid file removed")


def test_exit_with_parent_without_prctl_watches_the_parent(tmp_path: Any) -> None:
    # The fallback for systems without PR_SET_PDEATHSIG: a thread that watches getppid().
    done = tmp_path / "done"
    code = (
        "import os, signal, sys, time\n"
        "from nbdproto.cli._helper import _watch_parent\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(done)!r}, 'w').close(), os._exit(0)))\n"
        "print(os.getpid(), flush=True)\n"
        "_watch_parent(int(sys.argv[1]))\n"
        "time.sleep(120)\n"  # the process under test idles: only the watcher's SIGTERM may end it
    )
    parent = subprocess.Popen(
        ["sh", "-c", '"$0" -c "$1" $$ & exec sleep 60', sys.executable, code], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    wait_until(done.exists, "SIGTERM after the parent died")  # written by the SIGTERM handler alone
    wait_until(lambda: ended(pid), "ended")


# --- Connection policy ---------------------------------------------------------------------------------------


def test_oneshot_serves_one_client_refuses_another_then_exits(tmp_path: Any) -> None:
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen([*SERVE, "--memory", "1M", "--socket", sock, "--oneshot", "-v"], env=PEER_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: unix_listening(sock), "listening")  # a probe would be the one client
        with nbdproto_threads.connect(f"nbd+unix:///?socket={sock}", timeout=10) as first:
            assert greeting(sock) == b""  # the second client: closed before the greeting
            first.pwrite(b"1" * 512, 0)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "refused: this server serves one client only (oneshot)" in err
    assert not os.path.exists(sock)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fork", "--run", "true"], "--fork and --run cannot be combined"),
        (["--fork", "--exit-with-parent"], "--fork and --exit-with-parent cannot be combined"),
        (["--allow-client-dn", "CN=*"], "--allow-client-dn needs --tls-verify-client"),
        (["--allow-address", "10.0.0.0/33"], "--allow-address: '10.0.0.0/33' is not an address or network"),
        (["--max-connections", "-1"], "--max-connections: '-1' must be at least 0"),
        (["--pid-file", "/no/such/dir/pid"], "--pid-file /no/such/dir/pid: no such directory /no/such/dir"),
    ],
)
def test_helper_usage_errors(args: list[str], message: str) -> None:
    result = run(*SERVE, "--memory", "1M", "--port", "0", *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_socket_under_socket_activation_is_a_usage_error(tmp_path: Any) -> None:
    errors = str(tmp_path / "stderr")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as passed:
        passed.bind(str(tmp_path / "passed.sock"))
        passed.listen()
        pid = spawn_activated([*SERVE, "--socket", str(tmp_path / "s")], [passed], stderr=errors)
    assert wait_for_exit(pid) == 1
    with open(errors) as f:
        assert "--socket cannot be used under socket activation" in f.read()
