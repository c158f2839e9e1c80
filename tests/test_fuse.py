"""``nbdproto fuse``: our server's export as a file in a real FUSE mount, read and written by real programs (cmp,
dd, sha256sum, qemu-img), the server killed under it, and unmounted by SIGINT and SIGTERM.

Every test has a hard timeout, and every mount is taken down in a ``finally`` (fusermount3 -u, else umount -l),
so a failure never leaves a mount behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbdproto_threads as nt
from tests.conftest import PEER_ENV, REQUIRE_PEERS
from tests.threaded import run_threads
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)
MIB = 1 << 20
CLI = [sys.executable, "-m", "nbdproto"]
NBDPROTO = os.path.join(os.path.dirname(sys.executable), "nbdproto")
"""The console script pip installed, as a user runs it."""


@pytest.fixture
def fuse_available() -> None:
    """FUSE for real: /dev/fuse, fusermount3 (Debian's fuse3) and mfusepy (the fuse extra)."""
    missing = [what for what, ok in (("/dev/fuse", os.path.exists("/dev/fuse")),
               ("fusermount3 (Debian fuse3)", shutil.which("fusermount3") is not None),
               ("mfusepy (pip install -e '.[test]')", _importable("mfusepy"))) if not ok]  # fmt: skip
    if missing:
        message = f"FUSE tests need {', '.join(missing)}"
        if REQUIRE_PEERS:
            pytest.fail(f"NBDPROTO_REQUIRE_PEERS=1 but {message}")
        pytest.skip(message)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(mountpoint) for line in mounts)


@contextlib.contextmanager
def server(image: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--name", "disk", str(image)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=PEER_ENV)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("serving "), line
        yield proc, line.split()[1]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


@contextlib.contextmanager
def fuse(uri: str, mountpoint: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([*CLI, "fuse", *args, uri, str(mountpoint)], stderr=subprocess.PIPE, env=PEER_ENV)
    try:
        wait_until(lambda: is_mounted(mountpoint) or proc.poll() is not None, "the mount")
        assert is_mounted(mountpoint), proc.stderr.read() if proc.stderr else b""
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        unmount = ["fusermount3", "-u", str(mountpoint)]
        if is_mounted(mountpoint) and subprocess.run(unmount, capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


def make_image(path: Path, size: int = 16 * MIB) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(3 * MIB))
        f.seek(9 * MIB)
        f.write(b"tail data" * 1000)
    return path.read_bytes()


def test_the_mounted_file_is_the_export(tmp_path: Path, fuse_available: None, peers: Any) -> None:
    peers("qemu-img")
    image_bytes = make_image(tmp_path / "src.img")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with server(tmp_path / "src.img") as (_, uri), fuse(uri, mountpoint):
        disk = mountpoint / "nbd"  # nbdfuse's default name
        assert sorted(os.listdir(mountpoint)) == ["nbd"] and disk.stat().st_size == len(image_bytes)
        assert subprocess.run(["cmp", str(disk), str(tmp_path / "src.img")], timeout=30).returncode == 0
        sha = subprocess.run(["sha256sum", str(disk)], capture_output=True, text=True, timeout=30).stdout.split()[0]
        assert sha == hashlib.sha256(image_bytes).hexdigest()
        info = subprocess.run(["qemu-img", "info", "-f", "raw", str(disk)], capture_output=True, text=True,
                              timeout=30, env=PEER_ENV)  # fmt: skip
        assert info.returncode == 0 and "virtual size: 16 MiB (16777216 bytes)" in info.stdout
        # Writes through the file reach the export: dd without truncating, 1 MiB blocks and 1-byte ones (each
        # its own request), at an odd offset, then fsync.
        for block, payload in (("1M", os.urandom(MIB + 3)), ("1", os.urandom(4099))):
            (tmp_path / "patch").write_bytes(payload)
            command = ["dd", f"if={tmp_path / 'patch'}", f"of={disk}", f"bs={block}", "seek=5", "oflag=seek_bytes"]
            dd = subprocess.run([*command, "conv=notrunc,fsync"], capture_output=True, timeout=60)
            assert dd.returncode == 0, dd.stderr
            with nt.connect(uri) as client:
                assert client.pread(len(payload), 5) == payload
        assert (tmp_path / "src.img").read_bytes()[5 : 5 + len(payload)] == payload  # and the server's file
    assert not is_mounted(mountpoint)


def test_parallel_reads_and_writes(tmp_path: Path, fuse_available: None) -> None:
    make_image(tmp_path / "src.img")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with server(tmp_path / "src.img") as (_, uri), fuse(uri, mountpoint):
        fd = os.open(mountpoint / "nbd", os.O_RDWR)

        def worker(n: int) -> None:
            for i in range(20):
                offset = (n * 20 + i) * 65536
                data = bytes([n]) * 65536
                os.pwrite(fd, data, offset)
                assert os.pread(fd, 65536, offset) == data

        try:
            run_threads(worker, 8)
            os.fsync(fd)
        finally:
            os.close(fd)
        with nt.connect(uri) as client:
            for n in range(8):
                assert client.pread(65536, n * 20 * 65536) == bytes([n]) * 65536


def test_read_only_refuses_writes(tmp_path: Path, fuse_available: None) -> None:
    make_image(tmp_path / "src.img")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with server(tmp_path / "src.img") as (_, uri), fuse(uri, mountpoint, "--read-only"):
        assert (mountpoint / "nbd").stat().st_mode & 0o222 == 0
        with pytest.raises(OSError) as refused:
            os.open(mountpoint / "nbd", os.O_WRONLY)
        assert refused.value.errno in (30, 13)  # EROFS (or EACCES from the kernel's own check)
        assert (mountpoint / "nbd").read_bytes()[:4] == (tmp_path / "src.img").read_bytes()[:4]


def test_killing_the_server_gives_eio_then_unmounts(tmp_path: Path, fuse_available: None) -> None:
    make_image(tmp_path / "src.img")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with server(tmp_path / "src.img") as (serve, uri), fuse(uri, mountpoint) as mounted:
        fd = os.open(mountpoint / "nbd", os.O_RDONLY)
        try:
            assert len(os.pread(fd, 65536, 0)) == 65536
            serve.kill()
            serve.wait(10)
            started = time.monotonic()
            for offset in (0, 4 * MIB):  # the client side learns at once: no read waits for a timeout
                with pytest.raises(OSError) as failed:
                    os.pread(fd, 65536, offset)
                assert failed.value.errno == 5  # EIO
            assert time.monotonic() - started < 10
            assert is_mounted(mountpoint)  # while the file is open, it answers EIO
        finally:
            os.close(fd)
        wait_until(lambda: mounted.poll() is not None, "fuse to exit once the file was closed")
        assert mounted.returncode == 1
        assert mounted.stderr is not None
        said = mounted.stderr.read().decode()
        # Said once while the open file kept the mount, once when it went: not once per connection.
        assert said.count("connection to the server was lost") == 2, said
        assert "Traceback" not in said and "Ignoring invalid max threads value" not in said, said
    assert not is_mounted(mountpoint)


def test_a_lost_server_with_the_file_closed_is_one_line(tmp_path: Path, fuse_available: None) -> None:
    make_image(tmp_path / "src.img")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with server(tmp_path / "src.img") as (serve, uri), fuse(uri, mountpoint) as mounted:
        serve.kill()
        serve.wait(10)
        wait_until(lambda: mounted.poll() is not None, "fuse to exit: nothing has the file open")
        assert mounted.returncode == 1 and mounted.stderr is not None
        (line,) = mounted.stderr.read().decode().splitlines()
        assert line.startswith("nbdproto fuse: the connection to the server was lost") and "unmounted" in line
    assert not is_mounted(mountpoint)


def test_nbdfuses_argument_order_and_file_name(tmp_path: Path, fuse_available: None) -> None:
    """``nbdproto fuse MOUNTPOINT[/FILENAME] URI`` as nbdfuse takes it; libfuse says nothing on the way."""
    image_bytes = make_image(tmp_path / "src.img")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with server(tmp_path / "src.img") as (_, uri):
        for target, name in ((mountpoint, "nbd"), (mountpoint / "disk.raw", "disk.raw")):
            proc = subprocess.Popen([NBDPROTO, "fuse", str(target), uri], stderr=subprocess.PIPE, env=PEER_ENV)
            try:
                wait_until(lambda p=proc: is_mounted(mountpoint) or p.poll() is not None, "the mount")  # type: ignore[misc]
                assert os.listdir(mountpoint) == [name]
                assert (mountpoint / name).read_bytes() == image_bytes
            finally:
                proc.send_signal(signal.SIGINT)
                assert proc.wait(20) == 0
                assert proc.stderr is not None and proc.stderr.read() == b""  # no "Ignoring invalid max threads"
            assert not is_mounted(mountpoint)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_unmounts(tmp_path: Path, sig: int, fuse_available: None) -> None:
    make_image(tmp_path / "src.img")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with server(tmp_path / "src.img") as (_, uri), fuse(uri, mountpoint) as mounted:
        assert (mountpoint / "nbd").stat().st_size == 16 * MIB
        mounted.send_signal(sig)
        assert mounted.wait(20) == 0
        assert not is_mounted(mountpoint)
    assert not is_mounted(mountpoint)


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["nbd://127.0.0.1:1/", str(tmp_path / "nowhere")], "not a directory"),  # our order: a directory only
        ([str(tmp_path / "no" / "such" / "file"), "nbd://127.0.0.1:1/"], "not a directory"),
        ([str(tmp_path), str(tmp_path)], "is an NBD URI"),
        ([str(tmp_path / "f"), "nbd://127.0.0.1:1/", "--name", "g"], "names the file already"),
        (["nbd://127.0.0.1:1/", str(tmp_path), "-C", "0"], "must be at least 1"),
    ):
        result = subprocess.run([NBDPROTO, "fuse", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([*CLI, "fuse", "nbd://127.0.0.1:1/", str(tmp_path / "mnt")], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr and not is_mounted(tmp_path / "mnt")
