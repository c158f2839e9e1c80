"""Socket activation, both sides: a server taking the sockets passed to it (nbdproto.sockets.activated_sockets,
``nbdproto serve`` started as systemd starts a service), and clients starting a server command on a private
socket (ActivatedServer, ``connect(command=[...])`` in both client libraries, ``-- [ CMD ]`` on the client
commands' command lines), with nbdkit, qemu-nbd and our own serve as the commands."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import anyio
import pytest

import nbdproto as n
import nbdproto.client
import nbdproto_anyio
import nbdproto_threads
from nbdproto.cli import main
from nbdproto.sockets import ActivatedServer, activated_sockets
from tests.activation import ended, spawn_activated, wait_for_exit
from tests.conftest import PEER_ENV
from tests.remotes import free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20
SERVE = [sys.executable, "-m", "nbdproto", "serve"]


# --- The server's side ---------------------------------------------------------------------------------------


def test_activated_sockets_are_taken_only_by_the_process_they_were_passed_to() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "nbd", "OTHER": "x"}
    assert activated_sockets(environ) == []
    assert environ == {"OTHER": "x"}  # unset all the same: children must not see them
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert activated_sockets(environ) == []
    assert activated_sockets({}) == []
    with pytest.raises(ValueError, match="LISTEN_FDS='two' is not a number"):
        activated_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})
    with pytest.raises(ValueError, match="LISTEN_PID"):
        activated_sockets({"LISTEN_PID": "-1", "LISTEN_FDS": "1"})


def test_activated_sockets_in_a_process_started_with_one(tmp_path: Any) -> None:
    report = tmp_path / "report.json"
    script = (
        "import json, os, socket, sys\n"
        "from nbdproto.sockets import activated_sockets\n"
        "socks = activated_sockets()\n"
        "json.dump({'families': [s.family == socket.AF_UNIX for s in socks],\n"
        "           'blocking': [s.getblocking() for s in socks],\n"
        "           'inheritable': [s.get_inheritable() for s in socks],\n"
        "           'env': sorted(k for k in os.environ if k.startswith('LISTEN_')),\n"
        "           'again': len(activated_sockets())}, open(sys.argv[1], 'w'))\n"
    )
    with ActivatedServer([sys.executable, "-c", script, str(report)]) as server:
        wait_until(lambda: server.poll() is not None, "the activated script exited")
        assert server.status == 0
    assert json.loads(report.read_text()) == {
        "families": [True],
        "blocking": [True],
        "inheritable": [False],
        "env": [],
        "again": 0,
    }


def test_a_descriptor_that_is_not_a_listening_socket_is_named(tmp_path: Any) -> None:
    script = (
        "import os, sys\n"
        "from nbdproto.sockets import activated_sockets\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "r, w = os.pipe(); os.dup2(r, 3)\n"
        "try:\n    activated_sockets()\nexcept OSError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert "socket activation: descriptor 3 is not a socket" in result.stdout, result


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_serve_takes_the_sockets_systemd_passes(backend: str, tmp_path: Any, peers: Any) -> None:
    # systemd's own implementation of a .socket unit with a TCP and a unix ListenStream=: it listens, and on the
    # first connection execs the service with the sockets as descriptors 3 and 4.
    peers("systemd-socket-activate")
    port = free_port()
    path = str(tmp_path / "nbd.sock")
    manager = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-l", path, "--fdname=tcp:unix",
         *SERVE, "--memory", "1M", "--backend", backend],
        env=PEER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert manager.stderr is not None
        listening = [manager.stderr.readline() for _ in range(2)]
        assert all(line.startswith("Listening on ") for line in listening), listening
        with nbdproto_threads.connect(f"nbd://127.0.0.1:{port}/", timeout=20) as over_tcp:
            over_tcp.pwrite(b"passed" * 100, 4096)
            over_tcp.flush()
        with nbdproto_threads.connect(f"nbd+unix:///?socket={path}", timeout=20) as over_unix:
            assert over_unix.pread(600, 4096) == b"passed" * 100
    finally:
        manager.terminate()
        stdout, _ = manager.communicate(timeout=15)
    assert manager.returncode == 0
    assert stdout == ""  # under socket activation standard output is the starter's


def test_serve_takes_a_socket_passed_by_a_starter_of_our_own(tmp_path: Any) -> None:
    path = str(tmp_path / "nbd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as passed:
        passed.bind(path)
        passed.listen()
        pid = spawn_activated([*SERVE, "--memory", "1M", "--backend", "threads"], [passed])
    try:
        with nbdproto_threads.connect(f"nbd+unix:///?socket={path}", timeout=20) as client:
            assert client.export.size == MIB
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_for_exit(pid) == 0
    assert os.path.exists(path)  # the starter's socket, not serve's to remove


# --- The starter's side --------------------------------------------------------------------------------------


def test_a_server_command_that_ignores_sigterm_is_killed_and_its_directory_removed(tmp_path: Any) -> None:
    started = tmp_path / "started"
    server = ActivatedServer(
        ["sh", "-c", f"trap '' TERM; touch {started}; while :; do sleep 1; done"],
        stop_timeout=0.2,  # ignores SIGTERM
    )
    assert os.path.exists(server.socket_path)
    wait_until(started.exists, "the server command started (its trap set)")
    assert server.stop() == -signal.SIGKILL
    assert not os.path.exists(server.directory)
    assert server.stop() == -signal.SIGKILL  # idempotent


def test_a_server_command_never_stopped_ends_with_the_program(tmp_path: Any) -> None:
    code = (
        "import sys\n"
        "from nbdproto.sockets import ActivatedServer\n"
        "server = ActivatedServer(['sleep', '30'])\n"
        "print(server.pid, server.directory, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid, directory = result.stdout.split()
    wait_until(lambda: ended(int(pid)), "the server command ended with the program that started it")
    assert not os.path.exists(directory)


def test_a_server_command_that_is_not_found_is_named_in_the_error() -> None:
    with pytest.raises(ConnectionError, match="the server command 'no-such-nbd-server' exited with status 127"):
        nbdproto_threads.connect(command=["no-such-nbd-server"], timeout=10)
    with pytest.raises(ValueError, match="a URI or start a server command, not both"):
        nbdproto_threads.connect("nbd://localhost/", command=["nbdkit", "memory", "1M"])
    with pytest.raises(ValueError, match="non-empty list"):
        nbdproto_threads.connect(command="nbdkit memory 1M")  # type: ignore[arg-type]


def test_the_threads_client_starts_nbdkit_and_stops_it(peers: Any) -> None:
    peers("nbdkit")
    with nbdproto_threads.connect(command=["nbdkit", "memory", "1G"], timeout=20) as client:
        assert client.export.size == 1 << 30
        client.pwrite(b"nbdkit" * 1000, 1 << 29)
        assert client.pread(6000, 1 << 29) == b"nbdkit" * 1000
        server = client.server
        assert server is not None and os.path.exists(server.socket_path)
    assert server.status is not None and not os.path.exists(server.directory)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_anyio_client_starts_nbdkit_and_stops_it(backend: str, peers: Any) -> None:
    peers("nbdkit")

    async def main() -> ActivatedServer:
        async with await nbdproto_anyio.connect(
            command=["nbdkit", "-e", "disk", "memory", "64M"], export_name="disk"
        ) as client:
            assert client.export.size == 64 * MIB
            await client.pwrite(b"anyio" * 1000, 12345)
            assert await client.pread(5000, 12345) == b"anyio" * 1000
            assert client.server is not None
            return client.server

    server = anyio.run(main, backend=backend)
    assert server.status is not None and not os.path.exists(server.directory)


def test_both_clients_start_qemu_nbd(peers: Any, tmp_path: Any) -> None:
    peers("qemu-nbd")
    image = tmp_path / "disk.img"
    data = os.urandom(MIB)
    image.write_bytes(data)
    command = ["qemu-nbd", "-f", "raw", str(image)]
    with nbdproto_threads.connect(command=command, timeout=20) as client:
        assert client.pread(MIB, 0) == data
        client.pwrite(b"q" * 4096, 0)
        client.flush()

    async def main() -> bytes:
        async with await nbdproto_anyio.connect(command=command, timeout=20) as client:
            return await client.pread(8192, 0)

    assert anyio.run(main) == b"q" * 4096 + data[4096:8192]


def test_both_clients_list_the_exports_of_a_started_nbdproto_serve() -> None:
    command = [*SERVE, "--export", "a=memory:1M", "--export", "b=memory:2M", "--description", "d"]
    names = [e.name for e in nbdproto_threads.list_exports(command=command, timeout=20)]
    assert names == ["a", "b"]

    async def main() -> list[str]:
        return [e.name for e in await nbdproto_anyio.list_exports(command=command, timeout=20)]

    assert anyio.run(main) == ["a", "b"]


def test_plan_connection_takes_a_command_for_a_unix_socket_filled_in_later() -> None:
    target, plan = n.client.plan_connection(None, {"command": ["nbdkit", "memory", "1M"], "export_name": "x"})
    assert target.unix and target.socket == "" and target.export_name == "x" and plan.export_name == "x"
    with ActivatedServer(["true"]) as server:
        assert server.target(target) == n.NbdUri("x", False, True, socket=server.socket_path)


# --- The client commands: -- [ CMD ARGS ] ---------------------------------------------------------------------


def test_info_and_list_of_a_server_command(peers: Any, capsys: Any) -> None:
    peers("nbdkit")
    assert main(["info", "--json", "--", "[", "nbdkit", "memory", "1G", "]"]) == 0
    (export,) = json.loads(capsys.readouterr().out)["exports"]
    # nbdinfo's document, without the URI of the private socket, which is gone once info has printed.
    assert export["export-size"] == 1 << 30 and "uri" not in export
    assert main(["list", "[", *SERVE, "--export", "one=memory:1M", "]"]) == 0
    assert capsys.readouterr().out.splitlines() == ["one"]


def test_copy_to_and_from_server_commands(peers: Any, tmp_path: Any, capsys: Any) -> None:
    peers("nbdkit", "qemu-nbd")
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(2 * MIB) + bytes(2 * MIB))
    target = tmp_path / "out.img"
    target.write_bytes(bytes(4 * MIB))
    # Our serve writes the file the copy goes into; then qemu-nbd serves it back to a copy out of it.
    assert main(["copy", "--no-progress", str(source), "--", "[", *SERVE, str(target), "]"]) == 0
    back = tmp_path / "back.img"
    assert main(["copy", "--no-progress", "--", "[", "qemu-nbd", "-f", "raw", str(target), "]", str(back)]) == 0
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert main(["copy", "--no-progress", str(source), "--", "[", "nbdkit", "memory", "1G", "]"]) == 0


def test_bad_brackets_are_usage_errors(capsys: Any) -> None:
    for argv, message in (
        (["info", "--", "[", "nbdkit", "memory", "1G"], "'[' without a matching ']'"),
        (["copy", "[", "]", "out.img"], "'[ ]' names no server command"),
    ):
        assert main(argv) == 1  # nbdinfo's and nbdcopy's status for a usage error
        assert message in capsys.readouterr().err
    assert main(["info", "[", "no-such-nbd-server", "]"]) == 1
    assert "the server command 'no-such-nbd-server' exited with status 127" in capsys.readouterr().err
