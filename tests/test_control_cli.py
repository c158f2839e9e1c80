"""``nbdproto serve --control PATH`` (and mirror) with ``nbdproto control PATH COMMAND``: exit statuses, the
views served and listed as ``EXPORT@NAME``, bad options as one-line usage errors, and a server that serves on,
without a traceback, through every kind of bad input on its control socket."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from typing import Any

import pytest

import nbdproto_threads as nt
from nbdproto.control import MAX_LINE
from tests.conftest import PEER_ENV, require_peers
from tests.remotes import CLI, cli

pytestmark = pytest.mark.timeout(120)
KIB, MIB = 1 << 10, 1 << 20


def control(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "control", path, *args], capture_output=True, text=True, timeout=60, env=PEER_ENV)


def test_the_control_command_prints_answers_and_says_errors_in_one_line(tmp_path: Any) -> None:
    path = str(tmp_path / "ctl")
    with cli("serve", "--memory", "16M", "--name", "disk", "--port", "0", "--control", path) as server:
        uri = server.uri()
        added = control(path, "bitmap-add", "a", "--granularity", "4K")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["granularity"] == 4096
        with nt.connect(uri) as client:
            client.pwrite(b"x" * 10_000, 0)
        listed = json.loads(control(path, "bitmap-list").stdout)
        assert [(b["name"], b["granularity"], b["dirty_bytes"]) for b in listed] == [("a", 4096, 12288)]
        made = json.loads(control(path, "checkpoint", "b", "--since", "a", "--limit", "1M").stdout)
        assert made["view"] == "disk@b" and made["dirty_bytes"] == 12288
        require_peers("nbdinfo")
        listing = subprocess.run(["nbdinfo", "--list", "--json", uri[: uri.rindex("/") + 1]], capture_output=True,
                                 text=True, timeout=60, env=PEER_ENV, check=True)  # fmt: skip
        exports = {export["export-name"]: export for export in json.loads(listing.stdout)["exports"]}
        assert set(exports) == {"disk", "disk@b"} and exports["disk@b"]["is_read_only"]
        assert "qemu:dirty-bitmap:a" in exports["disk@b"]["contexts"]
        status = json.loads(control(path, "status").stdout)
        assert status["exports"][0]["views"][0]["limit"] == MIB
        for args, code in (
            (["bitmap-remove", "nope"], "not-found"),
            (["checkpoint", "b"], "exists"),
            (["release", "zz"], "not-found"),
            (["bitmap-add", "x", "--export", "other"], "not-found"),
        ):
            failed = control(path, *args)
            assert failed.returncode == 1 and failed.stdout == ""
            assert failed.stderr.count("\n") == 1 and f"({code})" in failed.stderr
        assert control(path, "release", "b").returncode == 0
        assert control(path, "bitmap-remove", "a").returncode == 0
        assert server.stop() == 0
    assert not os.path.lexists(path)  # removed as the server stopped
    for args in (["frobnicate"], ["bitmap-add"], ["checkpoint", "x", "--limit", "lots"]):
        usage = control(path, *args)
        assert usage.returncode == 1 and "Traceback" not in usage.stderr  # a usage error, as every command's
    gone = control(path, "status")
    assert gone.returncode == 1 and "cannot reach" in gone.stderr and gone.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "needs --workers 1"),
        (["--scratch-dir", "/nonexistent/dir"], "not a directory"),
        (["--checkpoint-limit", "lots"], "not a size"),
    ],
)
def test_bad_control_options_are_one_line_usage_errors(tmp_path: Any, args: list[str], message: str) -> None:
    done = subprocess.run([*CLI, "serve", "--memory", "1M", "--port", "0", "--control", str(tmp_path / "c"), *args],
                          capture_output=True, text=True, timeout=60, env=PEER_ENV)  # fmt: skip
    assert done.returncode == 1 and message in done.stderr, done.stderr  # a usage error
    assert len(done.stderr.strip().splitlines()) == 1 and not os.path.lexists(tmp_path / "c")


def test_a_control_path_that_exists_is_left_alone_and_refused(tmp_path: Any) -> None:
    path = tmp_path / "ctl"
    os.symlink(tmp_path / "elsewhere", path)
    done = subprocess.run([*CLI, "serve", "--memory", "1M", "--port", "0", "--control", str(path)],
                          capture_output=True, text=True, timeout=60, env=PEER_ENV)  # fmt: skip
    assert done.returncode == 1 and "something is there already" in done.stderr
    assert os.readlink(path) == str(tmp_path / "elsewhere") and not (tmp_path / "elsewhere").exists()


def test_mirror_takes_a_control_socket_too(tmp_path: Any) -> None:
    path = str(tmp_path / "ctl")
    with cli("mirror", "memory:8M", str(tmp_path / "copy.img"), "--port", "0", "--control", path) as server:
        server.uri()
        assert control(path, "checkpoint", "m").returncode == 0
        assert json.loads(control(path, "status").stdout)["exports"][0]["views"][0]["name"] == "m"
        assert server.stop() == 0


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


@pytest.mark.parametrize("backend", ["threads", "anyio"])
def test_bad_input_on_the_control_socket_never_stops_the_server(tmp_path: Any, backend: str) -> None:
    path = str(tmp_path / "ctl")
    args = ("serve", "--memory", "16M", "--port", "0", "--backend", backend, "--control", path, "--bitmap", "a")
    with cli(*args) as server:
        uri = server.uri()
        stalled = _raw(path)
        stalled.sendall(b'{"command": "stat')  # and nothing more
        started = time.monotonic()
        with _raw(path) as sock:
            bad = [b"format c:", b'{"command": "rm -rf"}', b'{"command": "bitmap-add", "name": "../x"}',
                   b'{"command": "bitmap-add", "name": "' + b"n" * 1000 + b'"}', b'{"command": "checkpoint"}',
                   b'{"command": "release", "name": 7}', b"\xff" * 100, b"{" * 10000, b"[]", b"null"]  # fmt: skip
            sock.sendall(b"\n".join(bad) + b"\n")
            received = b""
            while received.count(b"\n") < len(bad):
                data = sock.recv(65536)
                assert data
                received += data
            answers = [json.loads(line) for line in received.splitlines()]
            assert [answer["ok"] for answer in answers] == [False] * len(bad)
            sock.sendall(b'{"command": "bitmap-list"}\n')  # and the connection goes on
            assert json.loads(sock.recv(65536))["result"][0]["name"] == "a"
        with _raw(path) as huge:
            with contextlib.suppress(OSError):
                huge.sendall(b"z" * (MAX_LINE + 1000))
            assert json.loads(_until_closed(huge).splitlines()[0])["error"]["code"] == "too-long"
        with nt.connect(uri) as client:  # NBD is served throughout
            client.pwrite(b"still here", 0)
            assert client.pread(10, 0) == b"still here"
        assert control(path, "status").returncode == 0  # with the stalled client still connected
        closing = _until_closed(stalled)  # the line never finished: closed after the line limit (10 s)
        assert json.loads(closing.splitlines()[0])["error"]["code"] == "too-slow"
        assert time.monotonic() - started < 60
        stalled.close()
        assert server.stop() == 0
    assert "Traceback" not in "\n".join(server.err)
