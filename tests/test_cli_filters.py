"""``nbdproto serve --filter``, run as a subprocess: every filter from the command line, stats at SIGUSR1 and at
exit, the log of a known workload, and every bad filter spec as a one-line error before anything is served."""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from typing import Any

import pytest

import nbdproto_threads as nt
from tests.test_cli import run_cli, serving, sha256
from tests.waiting import wait_until

MIB = 1 << 20
pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "no filter named 'bogus' (filters: cow, readonly, delay, error, log, stats, blocksize)"),
        ("delay:sleep=1s", "unknown key 'sleep' (keys: read, write, zero, trim, flush, extents, cache)"),
        ("delay:read=soon", "read: 'soon' is not a duration"),
        ("delay:read", "read needs a value"),
        ("delay:read=1ms,read=2ms", "read given twice"),
        ("readonly:really=yes", "unknown key 'really' (it takes no keys)"),
        ("error:errno=EBADF", "errno: 'EBADF' is not an NBD error"),
        ("error:rate=150%", "rate: '150%' is not a probability"),
        ("error:rate=often", "rate: 'often' is not a probability"),
        ("error:commands=read+frob", "commands: 'frob' is not a command"),
        ("blocksize:minimum=3000", "minimum: '3000' is not a power of two"),
        ("blocksize:minimum=4K,maximum=6K", "maximum 6144 is not a multiple of minimum 4096"),
        ("blocksize:maximum=8G", "maximum: '8G' is not a size from 1 byte to 4 GiB"),
        ("log:file=/no/such/dir/log", "/no/such/dir is not a directory"),
        ("stats:file=", "a path cannot be empty"),
    ],
)
def test_a_bad_filter_is_one_line_and_status_1_before_serving(spec: str, message: str) -> None:
    result = run_cli("serve", "--port", "0", "--memory", "1M", "--filter", spec, timeout=30)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "serving" not in result.stdout


def test_filter_settings_that_do_not_suit_the_device_are_usage_errors(tmp_path: Any) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"data")
    overlay = tmp_path / "overlay"
    cases = [
        (["--filter", f"cow:overlay={image}"], "is not an empty file"),
        (["--export", "a=memory:1M", "--export", "b=memory:1M", "--filter", f"cow:overlay={overlay}"], "one export"),
        (["--filter", f"log:file={overlay}", "--filter", f"stats:file={overlay}"], "cannot write to one file"),
    ]
    for args, message in cases:
        result = run_cli("serve", "--port", "0", *args, timeout=30)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
    assert image.read_bytes() == b"data" and not overlay.exists()


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_cow_from_the_command_line_keeps_the_file_unchanged(backend: str, tmp_path: Any) -> None:
    image, overlay = tmp_path / "disk.img", tmp_path / "overlay.img"
    image.write_bytes(os.urandom(4 * MIB))
    before = sha256(str(image))
    os.chmod(image, 0o444)  # the source is opened read-only under a cow filter
    args = (str(image), "--filter", f"cow:overlay={overlay}", "--backend", backend)
    with serving(*args) as (_, (uri,)), nt.connect(uri) as client:
        assert not client.export.read_only
        client.pwrite(b"new" * 1000, 12345)
        client.zero(MIB, 2 * MIB)
        assert client.pread(3000, 12345) == b"new" * 1000 and client.pread(10, 2 * MIB) == bytes(10)
    assert sha256(str(image)) == before and overlay.stat().st_size == 4 * MIB


def test_readonly_and_delay_from_the_command_line() -> None:
    args = ("--memory", "4M", "--filter", "readonly", "--filter", "delay:read=100ms")
    with serving(*args) as (_, (uri,)), nt.connect(uri) as client:
        assert client.export.read_only
        start = time.monotonic()
        client.pread(512, 0)
        assert time.monotonic() - start >= 0.1


def test_error_trigger_from_the_command_line(tmp_path: Any) -> None:
    trigger = tmp_path / "fail-now"
    spec = f"error:errno=ENOSPC,commands=write+zero,trigger={trigger}"
    with serving("--memory", "4M", "--filter", spec) as (_, (uri,)), nt.connect(uri) as client:
        client.pwrite(b"ok", 0)
        trigger.touch()
        with pytest.raises(OSError) as info:
            client.pwrite(b"no", 0)
        assert info.value.errno == errno.ENOSPC
        trigger.unlink()
        client.pwrite(b"ok", 2)
        assert client.pread(4, 0) == b"okok"


def stats_rows(text: str) -> dict[str, tuple[int, str, int]]:
    """command -> (count, bytes, errors) from a stats report."""
    rows = re.findall(r"^\s+(\w+)\s+(\d+)\s+(\d+(?:\.\d+)? \w+)\s+(\d+)\s", text, re.MULTILINE)
    return {command: (int(count), size, int(errors)) for command, count, size, errors in rows}


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_stats_and_log_report_what_a_known_workload_did(backend: str, tmp_path: Any) -> None:
    stats, log = tmp_path / "stats.txt", tmp_path / "log.txt"
    args = ["--memory", "8M", "--backend", backend, "--filter", f"stats:file={stats}", "--filter", f"log:file={log}"]
    with serving(*args) as (proc, (uri,)):
        for _ in range(2):  # two connections, one after the other
            with nt.connect(uri) as client:
                for i in range(5):
                    client.pwrite(b"w" * 4096, i * 4096)
                for _ in range(3):
                    client.pread(8192, 0)
                client.zero(65536, MIB)  # (length, offset), as libnbd orders them
                client.trim(65536, 2 * MIB)
                client.flush()
                client.block_status(MIB, 0)
        # Each connection's end flushes the device too: 2 flushes asked for, 2 at disconnection.
        expected = {
            "read": (6, "48.0 KiB", 0),
            "write": (10, "40.0 KiB", 0),
            "zero": (2, "128.0 KiB", 0),
            "trim": (2, "128.0 KiB", 0),
            "flush": (4, "0 B", 0),
            "extents": (2, "2.0 MiB", 0),
        }

        def counted() -> bool:  # the disconnection flushes happen as the server notices the ends
            shown = stats.exists() and stats_rows(stats.read_text()) == expected
            proc.send_signal(signal.SIGUSR1)  # asks for the file again: seen at the next look
            return shown

        wait_until(counted, "the stats file with every call counted", every=0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    final = stats_rows(stats.read_text())
    assert final["write"] == expected["write"] and final["flush"][0] >= 4  # + the flush at exit
    lines = log.read_text().splitlines()
    requests = [line for line in lines if re.search(r"connection=\d+ [A-Z]", line)]
    replies = [line for line in lines if "..." in line]
    assert len(requests) == len(replies)
    commands = [re.search(r"connection=\d+ (\w+)", line)[1] for line in requests]  # type: ignore[index]
    assert commands.count("Write") == 10 and commands.count("Read") == 6 and commands.count("Zero") == 2
    assert commands.count("Trim") == 2 and commands.count("Extents") == 2
    assert all("result=ok" in line for line in replies)
    # One connection number per connection: the first five writes are one connection's, the last five another's.
    writes = [int(re.search(r"connection=(\d+)", line)[1]) for line in requests if " Write " in line]  # type: ignore[index]
    assert len(set(writes[:5])) == 1 and len(set(writes[5:])) == 1 and writes[0] != writes[5]


def test_stats_without_a_file_go_to_stderr_at_exit() -> None:
    with serving("--memory", "1M", "--filter", "stats") as (proc, (uri,)):
        with nt.connect(uri) as client:
            client.pwrite(b"x", 0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
    assert "stats over" in err and stats_rows(err)["write"] == (1, "1 B", 0)


def test_blocksize_from_the_command_line() -> None:
    args = ("--memory", "4M", "--filter", "blocksize:minimum=4K,maximum=64K")
    with serving(*args) as (_, (uri,)), nt.connect(uri) as client:
        assert client.export.minimum_block_size == 1
        client.pwrite(b"abc", 4094)
        client.pwrite(b"z" * 300_000, 10)
        assert client.pread(3, 4094) == b"zzz" and client.pread(3, 300_010) == bytes(3)


def test_filters_wrap_every_export_and_name_it_in_shared_files(tmp_path: Any) -> None:
    log, stats = tmp_path / "log.txt", tmp_path / "stats.txt"
    args = ["--export", "a=memory:1M", "--export", "b=memory:2M", "--filter", f"log:file={log}"]
    args += ["--filter", f"stats:file={stats}"]
    with serving(*args) as (proc, uris):
        for uri in uris:
            with nt.connect(uri) as client:
                client.pwrite(b"x", 0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    text = log.read_text()
    assert "export='a' Write" in text and "export='b' Write" in text
    report = stats.read_text()
    assert "export 'a': stats over" in report and "export 'b': stats over" in report
