"""The nbdproto command line, run as a subprocess: serve, info, list, copy, and every bad argument."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto as n
import nbdproto_threads as nt
from tests.capture import nbdkit
from tests.conftest import PEER_ENV
from tests.remotes import free_port
from tests.serving import make_pki
from tests.waiting import wait_until

MIB = 1 << 20
pytestmark = pytest.mark.timeout(120)
CLI = [sys.executable, "-m", "nbdproto"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=PEER_ENV)


def cli_json(*args: str, timeout: float = 60) -> Any:
    """The JSON ``nbdproto ARGS`` prints; a failed command fails the test with what it said on stderr."""
    done = run_cli(*args, timeout=timeout)
    assert done.returncode == 0, f"nbdproto {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


@contextlib.contextmanager
def serving(*args: str, startup: float = 15) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    """Run ``nbdproto serve ARGS --port 0``; yields the process and the URIs it printed (bounded start-up)."""
    proc = subprocess.Popen([*CLI, "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=PEER_ENV)  # fmt: skip
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        output = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            # Every export's URI is printed at once, one line each: read until a quiet half second after one.
            while selector.select(startup if b"serving" not in output else 0.5):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                output += chunk
        uris = [line.split()[1] for line in output.decode().splitlines() if line.startswith("serving ")]
        if not uris:
            raise AssertionError(f"nbdproto serve printed no URI within {startup} s: {output!r}")
        yield proc, uris
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_serve_then_query_with_nbdinfo_and_nbdproto_info(backend: str, peers: Any) -> None:
    peers("nbdinfo")
    with serving("--memory", "64M", "--name", "disk", "--description", "cli disk", "--backend", backend) as (_, uris):
        (uri,) = uris
        assert uri.endswith("/disk")
        theirs = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True,
                                           timeout=30, env=PEER_ENV, check=True).stdout)["exports"][0]  # fmt: skip
        ours = cli_json("info", "--json", uri)["exports"][0]
        listed = cli_json("list", "--json", uri)
    # nbdinfo's schema, key by key (tests/test_cli_info.py compares whole documents on several servers).
    assert ours["export-size"] == theirs["export-size"] == 64 * MIB
    assert ours["description"] == theirs["description"] == "cli disk"
    for key in ("is_read_only", "can_flush", "can_trim", "can_zero", "can_fua", "can_cache", "can_multi_conn"):
        assert ours[key] == theirs[key], key
    assert ours["contexts"] == theirs["contexts"] == ["base:allocation"]
    assert listed == {"exports": [{"name": "disk", "description": "cli disk"}]}


def test_default_serve_is_a_1_gib_memory_disk(peers: Any) -> None:
    with serving() as (_, (uri,)):
        assert cli_json("info", "--json", uri)["exports"][0]["export-size"] == 1 << 30


def test_read_only_and_several_exports(tmp_path: Any) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(b"A" * MIB)
    with serving("--read-only", "--export", f"a={image}", "--export", "m=memory:2M") as (_, uris):
        by_name = {u.rsplit("/", 1)[1]: u for u in uris}
        with nt.connect(by_name["a"]) as c:
            assert c.export.read_only and c.pread(1, 0) == b"A"
        with nt.connect(by_name["m"]) as c:
            assert c.size == 2 * MIB


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/file.img"], "no such file"),
        (["--memory", "1Q"], "not a size"),
        (["--memory", "0"], "positive"),
        (["--tls", "require", "--tls-cert", "/no/cert.pem"], "cannot load"),
        (["--tls", "require"], "--tls-cert"),
        (["--export", "nonsense"], "NAME=SOURCE"),
        (["ftp://host/disk"], "cannot serve a ftp:// source"),
        (["--backend", "anyio", "--busy-poll", "50"], "--busy-poll is for --backend threads"),
        (["--backend", "threads", "--busy-poll", "-1"], "must be at least 0"),
    ],
)
def test_bad_arguments_give_a_message_and_status_1(args: list[str], message: str) -> None:
    result = run_cli("serve", "--port", "0", *args, timeout=30)
    assert result.returncode == 1  # nbdkit's status for a usage error
    assert message in result.stderr and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", "--port", str(taken.getsockname()[1]), timeout=30)
    assert result.returncode == 1 and "cannot listen" in result.stderr


def test_unreachable_server_is_one_line() -> None:
    result = run_cli("info", f"nbd://127.0.0.1:{free_port()}/", timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_copy_a_sparse_file_into_an_export_and_back(tmp_path: Any) -> None:
    src, back = str(tmp_path / "src.img"), str(tmp_path / "back.img")
    with open(src, "wb") as f:
        f.truncate(32 * MIB)
        for at in (0, 10 * MIB, 31 * MIB):
            f.seek(at)
            f.write(os.urandom(MIB))
    with serving("--memory", "32M", "--name", "d") as (_, (uri,)):
        assert run_cli("copy", "--no-progress", src, uri).returncode == 0
        with nt.connect(uri) as c:
            extents = c.block_status(32 * MIB, 0)["base:allocation"]
        assert run_cli("copy", "--no-progress", uri, back).returncode == 0
    assert sha256(src) == sha256(back)
    # The holes stayed holes: never sent as data into the export, nor written into the copy.
    data = sum(e.length for e in extents if not e.status & n.AllocationState.ZERO)
    assert data <= 4 * MIB, f"{data} bytes of the export hold data; the source had 3 MiB"
    assert allocated(back) <= 4 * MIB


def test_copy_of_a_file_with_more_runs_than_one_extents_call_returns(tmp_path: Any) -> None:
    # FileDevice.extents answers at most 1024 runs per call; the copy must keep asking until the end.
    src, out = str(tmp_path / "src.img"), str(tmp_path / "out.img")
    with open(src, "wb") as f:
        f.truncate(16 * MIB)
        for at in range(0, 16 * MIB, 8192):  # 2048 data runs, 2048 holes
            f.seek(at)
            f.write(os.urandom(4096))
    assert run_cli("copy", "--no-progress", src, out).returncode == 0
    assert sha256(src) == sha256(out)


def test_copy_over_tls_both_ways(tmp_path: Any) -> None:
    """The copy's non-blocking TLS path: a file into an nbds:// export (served with TLS required) and back."""
    src, back = str(tmp_path / "src.img"), str(tmp_path / "back.img")
    with open(src, "wb") as f:
        f.write(os.urandom(9 * MIB + 4096))
    with make_pki() as pki:
        d = pki.directory
        tls = ["--tls", "require", "--tls-cert", f"{d}/server-cert.pem", "--tls-key", f"{d}/server-key.pem"]
        with serving("--memory", "12M", "--name", "d", *tls) as (_, (uri,)):
            assert uri.startswith("nbds://")
            ca = ["--tls-ca", f"{d}/ca-cert.pem"]
            done = run_cli("copy", "--no-progress", *ca, src, uri)
            assert done.returncode == 0, done.stderr
            done = run_cli("copy", "--no-progress", "--requests", "4", *ca, uri, back)
            assert done.returncode == 0, done.stderr
    with open(src, "rb") as a, open(back, "rb") as b:
        original = a.read()
        assert b.read()[: len(original)] == original


def test_copy_from_nbdkit_to_a_file(tmp_path: Any, peers: Any) -> None:
    peers("nbdkit", "nbdcopy")
    out, reference = str(tmp_path / "out.img"), str(tmp_path / "ref.img")
    with nbdkit(["pattern", "size=48M"]) as port:
        uri = f"nbd://127.0.0.1:{port}/"
        assert run_cli("copy", "--no-progress", "--connections", "2", uri, out).returncode == 0
        subprocess.run(["nbdcopy", uri, reference], check=True, env=PEER_ENV, timeout=60)
    assert sha256(out) == sha256(reference)


def test_sigterm_loses_no_acknowledged_write(tmp_path: Any) -> None:
    image = str(tmp_path / "disk.img")
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    acknowledged: list[int] = []
    with serving(image, "--name", "d") as (proc, (uri,)):
        with nt.connect(uri) as c:
            for i in range(48):
                c.pwrite(bytes([i + 1]) * MIB, i * MIB)
                acknowledged.append(i)
                if i == 40:
                    proc.send_signal(signal.SIGTERM)
                    break
        proc.wait(15)
        assert proc.returncode == 0
    with open(image, "rb") as f:
        for i in acknowledged:
            f.seek(i * MIB)
            assert f.read(MIB) == bytes([i + 1]) * MIB, f"acknowledged write {i} is not in the file"


def signal_a_thread(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to one thread of another process (tgkill): what the kernel may do with a process's signal
    when another thread than the main one has it unblocked."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid})")


@pytest.mark.parametrize("backend", ["threads", "anyio:asyncio", "anyio:trio", "anyio:uvloop"])
def test_sigterm_delivered_to_another_thread_than_the_main_one_stops_the_server(backend: str) -> None:
    # A Python handler runs on the main thread, which the signal did not wake: it must look by itself.
    backend, _, loop = backend.partition(":")
    with serving("--memory", "1M", "--backend", backend, *(["--loop", loop] if loop else [])) as (proc, (uri,)):
        with nt.connect(uri) as client:  # a session thread (threads) or a worker thread (anyio) exists
            assert client.pread(512, 0) == bytes(512)

            def other_threads() -> list[int]:
                return [int(tid) for tid in os.listdir(f"/proc/{proc.pid}/task") if int(tid) != proc.pid]

            # anyio's is the one the main task waits for a stop in, SIGNAL_CHECK at a time: on trio it is
            # started when the task first runs, which on a loaded machine may come after the read.
            others = wait_until(other_threads, "a thread beside the main one", timeout=10)
            signal_a_thread(proc.pid, others[0], signal.SIGTERM)
            proc.wait(10)
        assert proc.returncode == 0


def test_sigterm_during_nbdproto_copy_into_a_file_export(tmp_path: Any) -> None:
    """The server stops mid-copy: the copy fails saying how far it got (one request in flight, so a prefix),
    and every byte it saw acknowledged is in the file."""
    source, image = str(tmp_path / "src.img"), str(tmp_path / "disk.img")
    size = 256 * MIB
    with open(source, "wb") as f:
        for i in range(size // MIB):
            f.write(bytes([i % 251 + 1]) * MIB)
    with open(image, "wb") as f:
        f.truncate(size)
    with serving(image, "--name", "d") as (server, (uri,)):
        copy = subprocess.Popen([*CLI, "copy", "--no-progress", "--connections", "1", "--requests", "1", source, uri],
                                stderr=subprocess.PIPE, text=True, env=PEER_ENV)  # fmt: skip
        fd = os.open(image, os.O_RDONLY)
        try:  # stop the server once the copy's second MiB has landed
            wait_until(lambda: os.pread(fd, 1, MIB) != b"\0" or copy.poll() is not None, "the second MiB copied",
                       every=0.005)  # fmt: skip
        finally:
            os.close(fd)
        server.send_signal(signal.SIGTERM)
        _, errors = copy.communicate(timeout=30)
        server.wait(15)
        assert server.returncode == 0
    assert copy.returncode == 1, f"the copy finished before the server stopped: {errors}"
    match = re.search(r"\((\d+) of (\d+) bytes copied\)", errors)
    assert match, errors
    copied, total = int(match[1]), int(match[2])
    assert MIB <= copied < total == size
    with open(source, "rb") as a, open(image, "rb") as b:
        for at in range(0, copied, MIB):
            assert a.read(MIB)[: copied - at] == b.read(MIB)[: copied - at], f"acknowledged MiB at {at} lost"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "trio"])
def test_serve_on_each_event_loop(loop: str) -> None:
    with serving("--memory", "4M", "--loop", loop) as (_, (uri,)), nt.connect(uri) as c:
        c.pwrite(b"loop", 0)
        assert c.pread(4, 0) == b"loop"


def _all_asleep(pid: int) -> bool:
    """Whether every thread of process ``pid`` sleeps (state S in /proc: none running or ready to run)."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            states.append(stat.read().rsplit(")", 1)[1].split()[0])
    return all(state == "S" for state in states)


def test_busy_poll_serves_one_request_at_a_time_and_pipelined(peers: Any) -> None:
    """--busy-poll spins on the connection between requests: requests that arrive while it spins, one at a time
    or many at once and with payloads, are served as without it; a client that goes quiet is slept on."""
    with serving("--memory", "4M", "--backend", "threads", "--busy-poll", "200") as (server, (uri,)):
        with nt.connect(uri) as c:
            for i in range(200):
                c.pwrite(bytes([i]) * 4096, i * 4096)
                assert c.pread(4096, i * 4096) == bytes([i]) * 4096
            big = os.urandom(2 * MIB)  # a payload larger than one receive: the spin receives into its buffer
            c.pwrite(big, MIB)
            assert c.pread(2 * MIB, MIB) == big
            for i in range(200):
                c.pwrite(bytes([i]) * 4096, i * 4096)
            # Quiet for longer than the spin: the server stops spinning and sleeps until the next request.
            wait_until(lambda: _all_asleep(server.pid), "every server thread asleep")
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                got = list(pool.map(lambda i: c.pread(4096, i * 4096), range(64)))
            assert got == [bytes([i]) * 4096 for i in range(64)]
        result = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == str(4 * MIB)


@pytest.mark.parametrize(
    ("installed", "expected"),
    [({"uvloop", "trio"}, "uvloop"), ({"trio"}, "trio"), (set(), "asyncio")],
)
def test_serve_defaults_to_the_fastest_event_loop_installed(
    installed: set[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from nbdproto.cli import _serve

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert _serve.default_loop() == expected
