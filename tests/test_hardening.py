"""Issue 34's attacks by a local unprivileged user, run for real: the attacker is uid 65534 (``setpriv``), working
in a fresh sticky world-writable directory under /tmp, with ``fs.protected_symlinks`` and
``fs.protected_regular`` off (set here where the test may, restored after; many containers have them off); the
server is ``nbdproto serve`` run as root, as CI runs. Each attack is refused, or harmless: no file of root's is
written through a planted symlink, no file the attacker made becomes the server's, and nothing the server
creates can be read or written by the attacker. And a FUSE mount with allow_other keeps the file's mode: the
attacker can read the export's file but not write through it."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PEER_ENV, REQUIRE_PEERS
from tests.remotes import Cli
from tests.test_fuse import fuse, fuse_available, server  # noqa: F401 (fuse_available is a fixture)

pytestmark = pytest.mark.timeout(90)
MIB = 1 << 20
NOBODY = 65534
CLI = [sys.executable, "-m", "nbdproto"]
PRECIOUS = b"root's precious file\n"
PROTECTIONS = ("/proc/sys/fs/protected_symlinks", "/proc/sys/fs/protected_regular")


@pytest.fixture(autouse=True)
def as_root() -> None:
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"):
        message = "the attacks need root (to run the server) and setpriv (to be another user): CI has both"
        if REQUIRE_PEERS:
            pytest.fail(f"NBDPROTO_REQUIRE_PEERS=1 but {message}")
        pytest.skip(message)


@pytest.fixture
def protections_off() -> Iterator[None]:
    """fs.protected_symlinks and fs.protected_regular off for the test where they can be set, as before after."""
    saved: dict[str, str] = {}
    for path in PROTECTIONS:
        with contextlib.suppress(OSError):
            saved[path] = Path(path).read_text()
            Path(path).write_text("0\n")
    try:
        yield
    finally:
        for path, value in saved.items():
            with contextlib.suppress(OSError):
                Path(path).write_text(value)


@pytest.fixture
def shared(protections_off: None) -> Iterator[Path]:
    """A fresh sticky world-writable directory under /tmp, as /tmp itself is."""
    directory = Path(tempfile.mkdtemp(prefix="nbdproto-shared-", dir="/tmp"))
    directory.chmod(0o1777)
    try:
        yield directory
    finally:
        subprocess.run(["rm", "-rf", str(directory)], timeout=30, check=False)


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    """A file of root's, out of the attacker's reach, that a planted symlink points at."""
    path = tmp_path / "precious"
    path.write_bytes(PRECIOUS)
    path.chmod(0o644)
    return path


def as_nobody(*command: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """``command`` run as uid and gid 65534 with no other groups, and a umask that leaves files open to all."""
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    result = subprocess.run([*setpriv, "sh", "-c", 'umask 0; exec "$@"', "sh", *command],
                            capture_output=True, timeout=30)  # fmt: skip
    if check:
        assert result.returncode == 0, result
    return result


def serve_fails(*args: str) -> str:
    """Run ``nbdproto serve ARGS`` (as root) expecting it to refuse; its stderr."""
    result = subprocess.run([*CLI, "serve", "--port", "0", *args], capture_output=True, text=True, timeout=60,
                            env=PEER_ENV, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


@contextlib.contextmanager
def serving(*args: str) -> Iterator[Cli]:
    process = Cli("serve", "--port", "0", *args)
    try:
        process.uri()
        yield process
        assert process.stop() == 0, process.err
    finally:
        process.close()


def wait_for_file(path: Path, timeout: float = 30.0) -> None:
    """Until ``path`` exists (the pid file is written once the server is ready, just after it says so)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.01)


def owned_by_root(path: Path, mode: int) -> None:
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode) and info.st_uid == 0 and stat.S_IMODE(info.st_mode) == mode, oct(info.st_mode)


# --- The pid file -------------------------------------------------------------------------------------------------


def test_a_pid_file_is_not_written_through_a_symlink_at_its_name(shared: Path, precious: Path) -> None:
    as_nobody("ln", "-s", str(precious), str(shared / "nbd.pid"))
    stderr = serve_fails("--memory", "1M", "--pid-file", str(shared / "nbd.pid"))
    assert "cannot write --pid-file" in stderr and "symbolic link" in stderr
    assert precious.read_bytes() == PRECIOUS


def test_a_pid_file_another_user_made_first_is_refused(shared: Path) -> None:
    as_nobody("sh", "-c", f"echo 1 > {shared / 'nbd.pid'}")
    stderr = serve_fails("--memory", "1M", "--pid-file", str(shared / "nbd.pid"))
    assert "belongs to another user" in stderr
    assert (shared / "nbd.pid").read_bytes() == b"1\n" and os.stat(shared / "nbd.pid").st_uid == NOBODY


def test_symlinks_at_the_old_guessable_temporary_names_are_never_followed(shared: Path, precious: Path) -> None:
    # The old temporary name was PATH.<pid>.tmp: plant it for the next few hundred pids.
    # One process plants them all, so that the server's pid is among the next few.
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    names = [str(shared / f"nbd.pid.{pid}.tmp") for pid in range(last + 1, last + 400)]
    as_nobody("/usr/bin/python3", "-c", f"import os\nfor n in {names!r}: os.symlink({str(precious)!r}, n)")
    with serving("--memory", "1M", "--pid-file", str(shared / "nbd.pid")) as process:
        wait_for_file(shared / "nbd.pid")
        owned_by_root(shared / "nbd.pid", 0o644)
        assert (shared / "nbd.pid").read_text() == f"{process.proc.pid}\n"
        assert as_nobody("sh", "-c", f"echo 2 > {shared / 'nbd.pid'}", check=False).returncode != 0
    assert precious.read_bytes() == PRECIOUS
    assert not (shared / "nbd.pid").exists()  # removed at exit


# --- Cow overlays -------------------------------------------------------------------------------------------------


def test_a_cow_overlay_another_user_made_first_is_refused(shared: Path, tmp_path: Path) -> None:
    (tmp_path / "base.img").write_bytes(bytes(MIB))
    as_nobody("touch", str(shared / "overlay.img"))
    assert stat.S_IMODE(os.stat(shared / "overlay.img").st_mode) == 0o666
    stderr = serve_fails(str(tmp_path / "base.img"), "--filter", f"cow:overlay={shared / 'overlay.img'}")
    assert "belongs to another user" in stderr
    assert os.path.getsize(shared / "overlay.img") == 0


def test_a_cow_overlay_is_not_created_through_a_symlink(shared: Path, tmp_path: Path) -> None:
    (tmp_path / "base.img").write_bytes(bytes(MIB))
    empty = tmp_path / "empty"  # an empty file of root's: what an overlay may be, were it not behind a symlink
    empty.touch()
    as_nobody("ln", "-s", str(empty), str(shared / "overlay.img"))
    stderr = serve_fails(str(tmp_path / "base.img"), "--filter", f"cow:overlay={shared / 'overlay.img'}")
    assert "symbolic link" in stderr
    assert os.path.getsize(empty) == 0


def test_a_new_cow_overlay_is_the_servers_alone(shared: Path, tmp_path: Path) -> None:
    import nbdproto_threads as nt

    (tmp_path / "base.img").write_bytes(bytes(MIB))
    overlay = shared / "overlay.img"
    with serving(str(tmp_path / "base.img"), "--filter", f"cow:overlay={overlay}") as process:
        with nt.connect(process.uri(), timeout=30) as client:
            client.pwrite(b"secret data", 0, fua=True)
        owned_by_root(overlay, 0o600)
        assert as_nobody("cat", str(overlay), check=False).returncode != 0  # the attacker cannot read it
    assert overlay.read_bytes()[:11] == b"secret data"


# --- Log and stats files ------------------------------------------------------------------------------------------


def test_a_log_file_is_not_opened_through_a_symlink(shared: Path, precious: Path) -> None:
    as_nobody("ln", "-s", str(precious), str(shared / "requests.log"))
    stderr = serve_fails("--memory", "1M", "--filter", f"log:file={shared / 'requests.log'}")
    assert "symbolic link" in stderr
    assert precious.read_bytes() == PRECIOUS


def test_a_log_file_another_user_made_first_is_refused(shared: Path) -> None:
    as_nobody("touch", str(shared / "requests.log"))
    stderr = serve_fails("--memory", "1M", "--filter", f"log:file={shared / 'requests.log'}")
    assert "belongs to another user" in stderr
    assert os.path.getsize(shared / "requests.log") == 0


def test_a_stats_file_is_not_written_through_a_symlink_planted_while_serving(shared: Path, precious: Path) -> None:
    stats = shared / "stats.txt"
    with serving("--memory", "1M", "--filter", f"stats:file={stats}") as process:
        as_nobody("ln", "-s", str(precious), str(stats))
    assert precious.read_bytes() == PRECIOUS
    assert any("cannot write the stats" in line and "symbolic link" in line for line in process.err), process.err


def test_log_and_stats_files_are_created_for_the_server_alone(shared: Path) -> None:
    log, stats = shared / "requests.log", shared / "stats.txt"
    with serving("--memory", "1M", "--filter", f"log:file={log}", "--filter", f"stats:file={stats}"):
        owned_by_root(log, 0o600)
    owned_by_root(stats, 0o600)
    assert stats.read_text().startswith("stats over")
    assert as_nobody("cat", str(log), check=False).returncode != 0


# --- A mirror's secondary and the bitmaps' sidecar ------------------------------------------------------------------


def test_a_mirrors_secondary_is_not_written_through_another_users_symlink(
    shared: Path, tmp_path: Path, precious: Path
) -> None:
    (tmp_path / "primary.img").write_bytes(b"p" * MIB)
    as_nobody("ln", "-s", str(precious), str(shared / "copy.img"))
    result = subprocess.run([*CLI, "mirror", str(tmp_path / "primary.img"), str(shared / "copy.img"), "--port", "0"],
                            capture_output=True, text=True, timeout=60, env=PEER_ENV)  # fmt: skip
    assert result.returncode != 0 and "symbolic link" in result.stderr, result
    assert precious.read_bytes() == PRECIOUS


def test_a_bitmap_directory_another_user_made_first_is_refused(shared: Path) -> None:
    image = shared / "disk.img"
    image.write_bytes(bytes(MIB))
    as_nobody("mkdir", "-m", "777", str(shared / "disk.img.bitmaps"))
    stderr = serve_fails(str(image), "--bitmap", "backup")
    assert "belongs to another user" in stderr
    assert os.listdir(shared / "disk.img.bitmaps") == []


# --- FUSE ---------------------------------------------------------------------------------------------------------


def test_another_user_cannot_write_through_an_allow_other_mount(fuse_available: None, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "disk.img"
    image.write_bytes(b"a" * MIB)
    # The mount point must be reachable by the other user: not under pytest's private tmp_path.
    top = Path(tempfile.mkdtemp(prefix="nbdproto-fuse-", dir="/tmp"))
    top.chmod(0o755)
    mountpoint = top / "mnt"
    mountpoint.mkdir()
    try:
        with server(image) as (_, uri), fuse(uri, mountpoint, "-o", "allow_other"):
            disk = mountpoint / "nbd"  # nbdfuse's default name
            assert stat.S_IMODE(disk.stat().st_mode) == 0o644 and disk.stat().st_uid == 0
            assert as_nobody("head", "-c", "4", str(disk)).stdout == b"aaaa"  # the mount is open to others
            refused = as_nobody("dd", "if=/dev/zero", f"of={disk}", "bs=4096", "count=1", "conv=notrunc", check=False)
            assert refused.returncode != 0 and b"Permission denied" in refused.stderr, refused
            with open(disk, "r+b") as f:  # root may: the mode says so
                f.write(b"root")
        assert image.read_bytes()[:8] == b"rootaaaa"
    finally:
        subprocess.run(["rm", "-rf", str(top)], timeout=30, check=False)
