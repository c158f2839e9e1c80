"""Remotes that stop answering fail in bounded time: nbdkit stopped with SIGSTOP (as a frozen VM or a network
path that drops packets without a reset would leave it) under ``NbdDevice``, ``nbdproto serve nbd://...`` and
``nbdproto mirror``, on both backends. A request that needs the stalled remote fails within the limit
(ETIMEDOUT in the library, EIO over NBD) with one log line naming the remote (and the server's line for the
failed request); requests that do not need it
never wait; after SIGCONT the same proxy serves again. No traceback in any log."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto
import nbdproto_threads as nt
from nbdproto.devices import NbdDevice
from tests.conftest import PEER_ENV
from tests.remotes import Cli, cli, nbdkit, stopped
from tests.serving import make_pki

KIB, MIB = 1 << 10, 1 << 20
pytestmark = pytest.mark.timeout(120)


def no_traceback(lines: list[str]) -> None:
    text = "\n".join(lines)
    assert "Traceback" not in text, text


@contextlib.contextmanager
def remote(tls: bool) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """nbdkit's memory plugin, plaintext or TLS-only; its URI (with the certificates) and process."""
    if not tls:
        with nbdkit("memory", "size=8M") as served:
            yield served
        return
    with (
        make_pki() as pki,
        nbdkit("--tls=require", f"--tls-certificates={pki.directory}", "memory", "size=8M") as (uri, proc),
    ):
        yield uri.replace("nbd://", "nbds://") + f"?tls-certificates={pki.directory}", proc


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_nbd_device_times_out_every_request_together_then_reconnects(
    tls: bool, peers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Six requests in flight over the device's connections when nbdkit stops: all fail with ETIMEDOUT within
    the limit, and the device says so once. A request made while it stays stopped fails in bounded time too
    (its reconnect is the request's), and once it continues the next request reconnects and succeeds."""
    peers("nbdkit")
    caplog.set_level(logging.WARNING, "nbdproto.devices.nbd")
    with remote(tls) as (uri, proc):
        device = NbdDevice(uri, timeout=2)
        try:
            device.pwrite(b"before", 0)
            failures: list[tuple[float, BaseException]] = []

            def read(started: float) -> None:
                try:
                    device.pread_into(memoryview(bytearray(4 * KIB)), 0)
                except OSError as exc:
                    failures.append((time.monotonic() - started, exc))

            with stopped(proc) as since:
                threads = [threading.Thread(target=read, args=(since,)) for _ in range(6)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30)
                assert len(failures) == 6, failures
                for took, exc in failures:
                    assert isinstance(exc, TimeoutError) and exc.errno == errno.ETIMEDOUT, exc
                    assert uri in str(exc) and took < 8, (took, exc)
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    device.pread_into(memoryview(bytearray(10)), 0)
                assert time.monotonic() - started < 8
            buffer = bytearray(6)
            device.pread_into(memoryview(buffer), 0)
            assert buffer == b"before"
        finally:
            device.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and uri in said[0] and "did not answer within 2 s" in said[0], said


def test_nbd_device_write_to_a_remote_that_stopped_reading_fails_in_bounded_time(peers: Any) -> None:
    """A 16 MiB write does not fit in the sockets' buffers: its send waits for a remote that reads nothing,
    and gives up after the limit."""
    peers("nbdkit")
    with nbdkit("memory", "size=64M") as (uri, proc):
        device = NbdDevice(uri, timeout=2, connections=1)
        try:
            with stopped(proc) as since:
                with pytest.raises(TimeoutError) as raised:
                    device.pwrite(bytes(16 * MIB), 0)
                assert time.monotonic() - since < 8
                assert raised.value.errno == errno.ETIMEDOUT
            device.pwrite(b"after", 0)
        finally:
            device.close()


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_serve_nbd_with_a_stalled_upstream_fails_a_read_in_bounded_time_then_serves_again(
    backend: str, peers: Any
) -> None:
    """``serve nbd://... --remote-timeout 5`` in front of nbdkit: SIGSTOP the upstream and a client's 4 KiB read
    gets EIO within 10 s, one log line names the upstream; after SIGCONT the same proxy (never restarted)
    serves the next requests, the data written before the stall included."""
    peers("nbdkit")
    with (
        nbdkit("memory", "size=8M") as (upstream, proc),
        cli("serve", upstream, "--port", "0", "--remote-timeout", "5", "--backend", backend) as proxy,
    ):
        with nt.connect(proxy.uri(), timeout=60) as client:
            client.pwrite(b"written before the stall", 0, fua=True)
            with stopped(proc) as since:
                with pytest.raises(nbdproto.NBDError) as raised:
                    client.pread(4 * KIB, 0)
                assert time.monotonic() - since < 10
                assert raised.value.errno == errno.EIO
                proxy.wait_for("err", lambda line: upstream in line, 10)
            assert client.pread(24, 0) == b"written before the stall"
            client.pwrite(b"and after", 100, fua=True)
            assert client.pread(9, 100) == b"and after"
        assert proxy.stop() == 0
    # One line from the device about the remote, and the server's line for the request that failed (its client
    # was told EIO alone).
    naming = [line for line in proxy.err if upstream in line and "nbdproto.devices" in line]
    assert len(naming) == 1 and "did not answer within 5 s" in naming[0], proxy.err
    (request,) = [line for line in proxy.err if "READ of 4096 bytes at 0 failed" in line]
    assert upstream in request, proxy.err
    no_traceback(proxy.err)


def make_primary(path: str, size: int, data: int) -> None:
    with open(path, "wb") as file:
        file.truncate(size)
        file.write(os.urandom(data))


def read_whole(client: nt.Client, size: int) -> bytes:
    return b"".join(client.pread(MIB, offset) for offset in range(0, size, MIB))


@pytest.mark.parametrize(
    ("backend", "phase"),
    [("anyio", "synchronised"), ("threads", "synchronised"), ("anyio", "copying"), ("threads", "copying")],
)
def test_mirror_with_a_stalled_secondary_fails_writes_in_bounded_time_and_keeps_reads(
    backend: str, phase: str, peers: Any, tmp_path: Any
) -> None:
    """``mirror PRIMARY nbd://... --remote-timeout 5`` with the secondary (nbdkit) stopped, once the two are in
    step or while the copy runs: the client's FUA write completes or fails within 10 s, ``mirror failed`` is
    printed, the client reads the whole primary and disconnects within 15 s, and every write the client saw
    acknowledged is in the primary. Later writes get EIO at once; the mirror exits 1."""
    peers("nbdkit")
    size = 32 * MIB
    primary = str(tmp_path / "primary.img")
    make_primary(primary, size, 8 * MIB)
    acknowledged: dict[int, bytes] = {}
    copying = ["--copy-rate", "1M"] if phase == "copying" else []
    args = ("--port", "0", "--remote-timeout", "5", "--backend", backend, *copying)
    with nbdkit("memory", f"size={size}") as (secondary, proc), cli("mirror", primary, secondary, *args) as mirror:
        uri = mirror.uri()
        if phase == "synchronised":
            mirror.wait_for("err", lambda line: line == "mirror synchronised", 60)
        with nt.connect(uri, timeout=60) as client:
            for offset in (0, 3 * MIB + 17, 20 * MIB):
                client.pwrite(b"A" * 4000, offset, fua=True)
                acknowledged[offset] = b"A" * 4000
            with stopped(proc) as since:
                try:
                    client.pwrite(b"B" * 4000, 10 * MIB, fua=True)
                    acknowledged[10 * MIB] = b"B" * 4000
                except nbdproto.NBDError as exc:
                    assert exc.errno == errno.EIO
                assert time.monotonic() - since < 10
                mirror.wait_for("err", lambda line: line.startswith("mirror failed: "), 10)
                started = time.monotonic()
                with pytest.raises(nbdproto.NBDError) as refused:
                    client.pwrite(b"C" * 10, 30 * MIB)
                assert refused.value.errno == errno.EIO and time.monotonic() - started < 2
                image = read_whole(client, size)
                client.close()
                assert time.monotonic() - since < 15
        status = mirror.stop()
    assert status == 1
    for offset, data in acknowledged.items():
        assert image[offset : offset + len(data)] == data
    with open(primary, "rb") as file:
        stored = file.read()
    assert stored == image
    (failed,) = [line for line in mirror.err if line.startswith("mirror failed: ")]
    assert secondary in failed and "did not answer within 5 s" in failed
    assert ("mirror synchronised" in mirror.err) == (phase == "synchronised")  # (copying: stalled mid-copy)
    no_traceback(mirror.err)


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_mirror_flush_at_a_readers_disconnect_is_bounded_by_the_remote_timeout(
    backend: str, peers: Any, tmp_path: Any
) -> None:
    """A client that only reads (nbdcopy of the whole export) while the secondary is stopped: the flush the
    server makes as its connections end waits at most the limit, so nbdcopy is done within 15 s; the mirror
    then fails (the secondary could not make its copy durable), and the server says so in one line naming the
    secondary and the errno."""
    peers("nbdkit", "nbdcopy")
    size = 16 * MIB
    primary = str(tmp_path / "primary.img")
    make_primary(primary, size, 4 * MIB)
    args = ("--port", "0", "--remote-timeout", "5", "--backend", backend)
    with nbdkit("memory", f"size={size}") as (secondary, proc), cli("mirror", primary, secondary, *args) as mirror:
        uri = mirror.uri()
        mirror.wait_for("err", lambda line: line == "mirror synchronised", 60)
        with stopped(proc) as since:
            copy = subprocess.run(
                ["nbdcopy", uri, str(tmp_path / "copy.img")], env=PEER_ENV, capture_output=True, timeout=60
            )
            assert copy.returncode == 0, copy.stderr
            assert time.monotonic() - since < 15
            mirror.wait_for("err", lambda line: line.startswith("mirror failed: "), 10)
            flushed = mirror.wait_for("err", lambda line: "flushing export" in line, 10)
        assert mirror.stop() == 1
    with open(primary, "rb") as one, open(tmp_path / "copy.img", "rb") as other:
        assert one.read() == other.read()
    assert secondary in flushed and "EIO" in flushed and "did not answer within 5 s" in flushed
    no_traceback(mirror.err)


def test_remote_timeout_must_be_positive() -> None:
    for command in (["serve", "nbd://127.0.0.1:1/"], ["mirror", "memory:1M", "nbd://127.0.0.1:1/"]):
        process = Cli(*command, "--port", "0", "--remote-timeout", "0")
        try:
            assert process.proc.wait(60) == 1
            process.wait_for("err", lambda line: "--remote-timeout 0 must be positive" in line, 10)
        finally:
            process.close()
