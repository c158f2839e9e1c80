"""The command line at its edges (issue 29), each item driven through the installed ``nbdproto`` command as a
user runs it: the exit status of the tool it mirrors, one line on stderr without a traceback, and what it did.

The library side of item 6 (a device advertises what it implements) is tests/test_device_base.py; nbdinfo's
--json schema is compared in tests/test_cli_info.py, copy's options against nbdcopy in tests/test_copy_options.py,
URIs against libnbd in tests/test_uri_libnbd.py, FUSE in tests/test_fuse.py, S3 in tests/test_s3.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import nbdproto
from tests.conftest import PEER_ENV
from tests.remotes import free_port
from tests.serving import make_pki
from tests.test_cli import serving
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20
NBDPROTO = os.path.join(os.path.dirname(sys.executable), "nbdproto")
"""The console script pip installed, as a user runs it."""


def run(*args: str, timeout: float = 60, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NBDPROTO, *args], capture_output=True, text=True, timeout=timeout,
                          env=options.pop("env", PEER_ENV), **options)  # fmt: skip


def ours_only(stderr: str) -> str:
    """What we said on stderr, without what a server started with [ CMD ] said there (it shares our stderr:
    nbdkit 1.32 may fail an assertion of its own when its client closes in the middle of replies)."""
    return "".join(line + "\n" for line in stderr.splitlines() if not line.startswith("nbdkit: "))


def one_line(result: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """The single line ``result`` said on stderr, after checking the status, that it is one line, that no
    traceback is in it, and that it holds every one of ``words`` (what it must name)."""
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- Defects ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "10809x"])
def test_1_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    line = one_line(run("serve", "--memory", "1G", "--port", port), 1, "--port", repr(port))
    assert "from 0 to 65535" in line


def _default_sigint() -> None:
    """In the child, before it runs: Ctrl-C's default, whatever the test runner set (an ignored SIGINT would be
    inherited and never raise KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_after_progress(argv: list[str], stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """Start ``nbdproto copy --progress=FD ARGV`` and send it SIGINT once the copy has made progress (its first
    "N/100" line): a Ctrl-C in the middle of the copy loop."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([NBDPROTO, "copy", f"--progress={write_end}", *argv], stdin=stdin,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=PEER_ENV,
                                pass_fds=[write_end], preexec_fn=_default_sigint)  # fmt: skip
        os.close(write_end)
        ready, _, _ = select.select([read_end], [], [], 30)
        assert ready and os.read(read_end, 64).endswith(b"/100\n"), "the copy made no progress within 30 s"
        proc.send_signal(signal.SIGINT)
        return proc
    finally:
        os.close(read_end)
        with contextlib.suppress(OSError):
            os.close(write_end)


@pytest.mark.parametrize("destination", ["file", "-"])
def test_2_ctrl_c_during_copy_is_silent_and_ends_by_sigint(destination: str, tmp_path: Path, peers: Any) -> None:
    """Ctrl-C in the copy loop (the source a slow nbdkit started with -- [ ... ]): no traceback, no word, and
    the process ends by SIGINT (a shell sees 130), as nbdcopy's does."""
    peers("nbdkit")
    target = str(tmp_path / "out.img") if destination == "file" else "-"
    server = ["--", "[", "nbdkit", "--log=null", "--filter=delay", "random", "2G", "delay-read=200ms", "]"]
    proc = _interrupt_after_progress([*server, target])
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT, stderr
    assert ours_only(stderr) == "", stderr


def test_2_ctrl_c_while_reading_standard_input_is_silent_and_prompt(tmp_path: Path) -> None:
    """A worker thread blocked reading a pipe that has not ended must not hold up Ctrl-C."""
    target = tmp_path / "out.img"
    with subprocess.Popen([NBDPROTO, "copy", "-", str(target)], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=PEER_ENV, preexec_fn=_default_sigint) as proc:  # fmt: skip
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(os.urandom(2 * MIB))  # two chunks; the copy then waits in a read of a third
        proc.stdin.flush()
        wait_until(
            lambda: proc.poll() is not None or (target.exists() and target.stat().st_size >= MIB), "a MiB copied"
        )
        assert proc.poll() is None, "the copy ended before its input did"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == -signal.SIGINT
        assert proc.stderr.read() == b""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--can", "trim"], ["URI"]),
        (["--can", "trim", "--timeout", "x", "nbd://127.0.0.1:1/"], ["--timeout", "'x'"]),
        (["--is", "read-only", "--totals", "nbd://127.0.0.1:1/"], ["--totals", "--map"]),
        (["--can", "fly", "nbd://127.0.0.1:1/"], ["'fly'"]),
        (["--can", "trim", "--bogus", "nbd://127.0.0.1:1/"], ["--bogus"]),
    ],
)
def test_3_usage_errors_of_can_and_is_exit_1_never_2(args: list[str], words: list[str]) -> None:
    """2 means "no" to --can / --is: a usage error must not read as "cannot trim"; nbdinfo exits 1."""
    one_line(run("info", *args), 1, *words)


def test_4_a_malformed_uri_is_refused_before_anything_connects() -> None:
    """``nbd:/127.0.0.1:PORT/big`` (one slash) once connected to 127.0.0.1:10809 asking for an export named
    "127.0.0.1:PORT/big"; now it is refused, and the server it names sees no connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for command in (["info"], ["copy"], ["list"]):
            uri = f"nbd:/127.0.0.1:{port}/big"
            argv = [*command, uri, "null:"] if command == ["copy"] else [*command, uri]
            one_line(run(*argv), 1, uri, "must begin with nbd://")
        with pytest.raises(BlockingIOError):
            listener.accept()
    for bad, words in (
        ("nbd://127.0.0.1:99999/", ["from 0 to 65535"]),
        ("NBD://127.0.0.1/", ["lower case"]),
        ("nbd://127.0.0.1/a b", ["' '", "percent-encode"]),
        ("nbd://127.0.0.1/%zz", ["starts no escape"]),
        ("nbd://127.0.0.1/?socket=/s", ["socket=", "nbd+unix"]),
        ("nbd+unix:///disk", ["socket="]),
    ):
        one_line(run("info", bad), 1, *words)


@pytest.mark.parametrize("option", [["--tls-verify-client"], ["--tls-ca", "CA"], ["--tls-key", "KEY"],
                                    ["--tls-cert", "CERT"], ["--tls-psk", "KEY"]])  # fmt: skip
def test_5_every_tls_only_option_without_tls_is_refused(option: list[str]) -> None:
    one_line(run("serve", "--memory", "1M", "--port", "0", *option), 1, option[0], "--tls require")


def test_7_copying_onto_a_bigger_file_cuts_it_to_the_sources_size(tmp_path: Path, peers: Any) -> None:
    """As nbdcopy does: a 64M image copied onto a 100M file leaves a 64M file with the image's checksum."""
    peers("nbdcopy")
    source = tmp_path / "64M.img"
    source.write_bytes(os.urandom(MIB) + bytes(62 * MIB) + os.urandom(MIB))
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    for target in (ours, theirs):
        with open(target, "wb") as f:
            f.write(os.urandom(MIB))
            f.truncate(100 * MIB)
    assert run("copy", str(source), str(ours)).returncode == 0
    subprocess.run(["nbdcopy", str(source), str(theirs)], check=True, timeout=60, env=PEER_ENV)
    assert ours.stat().st_size == theirs.stat().st_size == 64 * MIB
    assert sha256(ours) == sha256(theirs) == sha256(source)
    with serving("--memory", "64M") as (_, (uri,)):  # and from an export
        with open(ours, "ab") as f:
            f.truncate(100 * MIB)
        assert run("copy", uri, str(ours)).returncode == 0
    assert ours.stat().st_size == 64 * MIB and ours.read_bytes() == bytes(64 * MIB)


# --- Friction ---------------------------------------------------------------------------------------------


def test_version_everywhere() -> None:
    expected = f"nbdproto {nbdproto.__version__}\n"
    for argv in (["--version"], ["-V"], *[[command, "--version"] for command in ("serve", "mirror", "info", "list",
                                                                                  "copy", "fuse")]):  # fmt: skip
        done = run(*argv)
        assert (done.returncode, done.stdout, done.stderr) == (0, expected, ""), argv


def test_copy_to_a_closed_pipe_is_silent_and_ends_by_sigpipe(peers: Any) -> None:
    """``nbdproto copy URI - | head -c 10``: nbdcopy is killed by SIGPIPE, silently (141 in a shell); so are we."""
    peers("nbdkit")
    command = [NBDPROTO, "copy", "--", "[", "nbdkit", "--log=null", "random", "2G", "]", "-"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=PEER_ENV) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert len(proc.stdout.read(10)) == 10
        proc.stdout.close()
        assert proc.wait(30) == -signal.SIGPIPE
        assert ours_only(proc.stderr.read().decode()) == ""
    shell = subprocess.run(["bash", "-c", f"'{NBDPROTO}' copy -- [ nbdkit --log=null random 2G ] - | head -c 10 "
                            ">/dev/null; echo ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=60,
                           env=PEER_ENV)  # fmt: skip
    assert shell.stdout == "141\n" and ours_only(shell.stderr) == "", shell.stderr
    with subprocess.Popen([NBDPROTO, "info", "--map", "--", "[", "nbdkit", "--log=null", "sparse-random", "1G", "]"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=PEER_ENV) as mapping:  # fmt: skip
        assert mapping.stdout is not None and mapping.stderr is not None
        mapping.stdout.readline()
        mapping.stdout.close()
        status = mapping.wait(60)
        assert status in (0, -signal.SIGPIPE) and mapping.stderr.read() == b""  # done already, or cut short


def test_errors_name_what_they_are_about(tmp_path: Path) -> None:
    port = free_port()
    one_line(run("info", f"nbd://127.0.0.1:{port}/"), 1, f"127.0.0.1:{port}", "Connection refused")
    one_line(run("list", f"nbd://127.0.0.1:{port}/"), 1, f"127.0.0.1:{port}")
    one_line(run("copy", f"nbd://127.0.0.1:{port}/", "null:"), 1, f"127.0.0.1:{port}")
    missing = str(tmp_path / "no.sock")
    one_line(run("info", f"nbd+unix:///?socket={missing}"), 1, missing, "No such file")
    one_line(run("copy", str(tmp_path / "no.img"), "null:"), 1, str(tmp_path / "no.img"))
    one_line(run("serve", str(tmp_path / "no.img")), 1, str(tmp_path / "no.img"))
    with make_pki() as pki:
        cert, key = f"{pki.directory}/server-cert.pem", f"{pki.directory}/server-key.pem"
        tls = ["serve", "--memory", "1M", "--port", "0", "--tls", "require"]
        one_line(run(*tls, "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", key), 1, str(tmp_path / "c.pem"))
        one_line(run(*tls, "--tls-cert", key, "--tls-key", cert), 1, key, cert, "swapped")
        one_line(run(*tls, "--tls-cert", cert), 1, cert, "no private key")
        one_line(run(*tls, "--tls-cert", cert, "--tls-key", key, "--tls-ca", key, "--tls-verify-client"), 1, key,
                 "no certificate")  # fmt: skip
        one_line(run("info", "--tls-ca", str(tmp_path / "ca.pem"), "nbds://127.0.0.1:1/"), 1, str(tmp_path / "ca.pem"))
    with serving("--memory", "1M", "--name", "disk") as (_, (uri,)):
        one_line(run("info", uri.replace("/disk", "/nope")), 1, "'nope'", "nbdproto list")
        listed = run("list", uri)
        assert listed.stdout == "disk\n"  # a name a line, as a script wants it: not Python's 'disk'


def test_a_file_that_cannot_be_opened_writable_suggests_read_only(tmp_path: Path) -> None:
    if os.getuid() == 0:
        # Root may write any file it owns: but not a sysfs attribute the kernel gives no write to (EACCES).
        image = Path("/sys/kernel/notes")
        assert image.is_file(), "no /sys/kernel/notes: sysfs is not mounted"
    else:
        image = tmp_path / "ro.img"
        image.write_bytes(bytes(MIB))
        image.chmod(0o444)
    one_line(run("serve", str(image), "--port", "0"), 1, str(image), "Permission denied", "--read-only")


def test_mirror_help_lists_only_what_mirror_takes() -> None:
    shown = run("mirror", "--help").stdout
    assert "--memory-limit" in shown and "--memory " not in shown and "--memory SIZE" not in shown
    assert "--export" not in shown
    one_line(run("mirror", "memory:1M", "s.img", "--memory", "1M"), 1, "unrecognized arguments: --memory")


def test_options_are_never_taken_by_abbreviation() -> None:
    """``mirror --memory 1M`` was once read as --memory-limit; an option is its whole name, or refused."""
    one_line(run("serve", "--memory", "1M", "--port", "0", "--read"), 1, "--read")
    one_line(run("copy", "--conn", "2", "a", "b"), 1, "--conn")
