"""Incremental backup end to end, as the issue's "Must show" asks: ``nbdproto serve --control``, checkpoints
taken with ``nbdproto control``, backups copied from the views (``EXPORT@NAME``) with ``nbdproto copy`` and
``nbdproto copy --only-dirty``, on both backends:

- point in time: writers keep writing to the live export (some writes big enough to land in place) while a
  backup copies the view; the backup equals the image at the checkpoint, checked against the log of the
  writes each connection had acknowledged before the checkpoint and sent after it;
- an incremental chain: a full copy at checkpoint A, writes and zeroes, ``checkpoint B --since A``,
  ``copy --only-dirty A`` onto the full copy: it equals the image at B, and the copy's own counters say it
  moved no more than the dirty granules' bytes (zero runs as zeroes, never data); then three independent
  chains on one export at once;
- ``copy --only-dirty`` against qemu-nbd ``-B``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto
import nbdproto_threads as nt
from nbdproto.control import control_request
from tests.conftest import PEER_ENV, require_peers
from tests.remotes import CLI, Cli, cli, serving_on_socket

pytestmark = pytest.mark.timeout(240)
KIB, MIB = 1 << 10, 1 << 20
BACKENDS = ("threads", "anyio")


class Served:
    """``nbdproto serve IMAGE --control PATH`` running: its URIs and its control socket."""

    def __init__(self, process: Cli, control: str) -> None:
        self.process = process
        self.control = control
        self.uri = process.uri()  # printed once the exports and the control socket are ready
        self.base = self.uri[: self.uri.rindex("/") + 1]

    def ask(self, command: str, **arguments: Any) -> Any:
        return control_request(self.control, {"command": command, **arguments})

    def view(self, name: str) -> str:
        return f"{self.base}disk@{name}"


@pytest.fixture
def shm_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="nbdproto-backup-") as directory:
        yield directory


def serve(directory: str, backend: str, size: int, *extra: str) -> contextlib.AbstractContextManager[Cli]:
    image = os.path.join(directory, "disk.img")
    with open(image, "wb") as file:
        file.write(os.urandom(size))  # written whole: a tmpfs file without holes takes big writes in place
    control = os.path.join(directory, "ctl")
    return cli("serve", image, "--name", "disk", "--port", "0", "--backend", backend, "--control", control, *extra)


def read_export(uri: str) -> bytes:
    with nt.connect(uri, timeout=60) as client:
        return b"".join(client.pread(min(4 * MIB, client.size - at), at) for at in range(0, client.size, 4 * MIB))


def copy_cli(*args: str) -> None:
    done = subprocess.run([*CLI, "copy", "--no-progress", *args], capture_output=True, text=True, timeout=180,
                          env=PEER_ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr


# --- Point in time -------------------------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Writes (and zeroes) its own region of the export over its own connection, one request at a time, and logs
    each with the moment it was sent and acknowledged (a counter shared by all, bumped around the checkpoint)."""

    def __init__(self, uri: str, region: tuple[int, int], clock: list[int], seed: int) -> None:
        super().__init__(daemon=True)
        self.uri, self.region, self.clock = uri, region, clock
        self.rng = random.Random(seed)
        self.log: list[tuple[int, int, int, bytes]] = []  # (sent at, acknowledged at, offset, data)
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        start, end = self.region
        try:
            with nt.connect(self.uri, timeout=60) as client:
                while not self.stop.is_set():
                    length = self.rng.choice((4 * KIB, 60 * KIB, 256 * KIB, MIB))
                    offset = self.rng.randrange(start, end - length)
                    zero = self.rng.random() < 0.15
                    data = bytes(length) if zero else self.rng.randbytes(length)
                    sent = self.clock[0]
                    if zero:
                        client.zero(length, offset)
                    else:
                        client.pwrite(data, offset)
                    self.log.append((sent, self.clock[0], offset, data))
        except BaseException as exc:
            self.failure = exc


def image_at(initial: bytes, writer: Writer, region: tuple[int, int], instant: tuple[int, int]) -> list[bytes]:
    """The writer's region as it may have been at the checkpoint: every write acknowledged before it was asked
    for applied, none sent after its answer, and of those in between (one connection's writes, one at a time)
    the first few, in order: each state a prefix of them gives."""
    start, end = region
    before, after = instant
    state = bytearray(initial[start:end])
    candidates = []
    for sent, acknowledged, offset, data in writer.log:
        if acknowledged <= before:
            state[offset - start : offset - start + len(data)] = data
        elif sent <= after:  # in flight while the checkpoint was taken
            candidates.append((offset, data))
    out = [bytes(state)]
    for offset, data in candidates:
        state[offset - start : offset - start + len(data)] = data
        out.append(bytes(state))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backup_of_a_view_is_the_image_at_its_checkpoint_while_writers_go_on(backend: str, shm_dir: str) -> None:
    size = 64 * MIB
    with serve(shm_dir, backend, size) as process:
        served = Served(process, os.path.join(shm_dir, "ctl"))
        initial = read_export(served.uri)
        clock = [0]
        regions = [(i * 16 * MIB, (i + 1) * 16 * MIB) for i in range(4)]
        writers = [Writer(served.uri, region, clock, seed) for seed, region in enumerate(regions)]
        for writer in writers:
            writer.start()
        while min(len(writer.log) for writer in writers) < 5:  # every writer is under way
            assert not any(writer.failure for writer in writers)
            threading.Event().wait(0.01)
        clock[0] = 1  # from here a write's acknowledgement may come after the checkpoint began
        made = served.ask("checkpoint", name="now")
        clock[0] = 2  # a write sent from here comes after the checkpoint
        assert made["view"] == "disk@now"
        backup = os.path.join(shm_dir, "backup.img")
        copy_cli(served.view("now"), backup)  # while the writers go on
        status = served.ask("status")["exports"][0]["views"][0]
        for writer in writers:
            writer.stop.set()
        for writer in writers:
            writer.join(60)
            assert writer.failure is None
        assert status["state"] == "active" and status["copied_bytes"] > 0
        assert all(len([w for w in writer.log if w[0] == 2]) > 0 for writer in writers)  # they wrote throughout
        with open(backup, "rb") as file:
            copied = file.read()
        for writer, region in zip(writers, regions, strict=True):
            assert copied[region[0] : region[1]] in image_at(initial, writer, region, (0, 1))
        released = served.ask("release", name="now")
        assert released["name"] == "now"
        with pytest.raises(nbdproto.NegotiationError, match="no export named"):
            nt.connect(served.view("now"), timeout=10).close()
        assert process.stop() == 0
    assert "Traceback" not in "\n".join(process.err)


# --- Incremental chains ---------------------------------------------------------------------------------------------


def scribble(uri: str, rng: random.Random, size: int, count: int) -> None:
    """``count`` writes and zeroes at random places."""
    with nt.connect(uri, timeout=60) as client:
        for _ in range(count):
            length = rng.choice((1, 4 * KIB, 70 * KIB, 300 * KIB))
            offset = rng.randrange(size - length)
            if rng.random() < 0.25:
                client.zero(length, offset)
            else:
                client.pwrite(rng.randbytes(length), offset)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_incremental_backup_moves_only_the_dirty_granules_and_equals_the_image(backend: str, shm_dir: str) -> None:
    size = 32 * MIB
    rng = random.Random(7)
    with serve(shm_dir, backend, size) as process:
        served = Served(process, os.path.join(shm_dir, "ctl"))
        served.ask("checkpoint", name="A")
        backup = os.path.join(shm_dir, "backup.img")
        full = nt.copy(served.view("A"), backup, progress=None)
        assert full.copied == size
        served.ask("release", name="A")
        scribble(served.uri, rng, size, 40)
        with nt.connect(served.uri, timeout=60) as client:
            client.zero(3 * MIB, 20 * MIB)  # a large zeroed run: copied as zeroes, never as data
        made = served.ask("checkpoint", name="B", since="A")
        at_b = read_export(served.view("B"))
        scribble(served.uri, rng, size, 20)  # the live export moves on; the view does not
        dirty = made["dirty_bytes"]
        assert 0 < dirty < size
        done = nt.copy(served.view("B"), backup, only_dirty="A", progress=None)
        assert done.copied <= dirty and done.data <= dirty and done.total == done.copied
        assert done.data <= done.copied - 3 * MIB  # the zeroed run went as zeroes
        with open(backup, "rb") as file:
            assert file.read() == at_b
        served.ask("release", name="B")
        served.ask("bitmap-remove", name="A")
        assert [bitmap["name"] for bitmap in served.ask("bitmap-list")] == ["B"]
        assert process.stop() == 0


def test_three_independent_chains_on_one_export(shm_dir: str) -> None:
    size = 16 * MIB
    rng = random.Random(3)
    with serve(shm_dir, "anyio", size) as process:
        served = Served(process, os.path.join(shm_dir, "ctl"))
        backups = {chain: os.path.join(shm_dir, f"{chain}.img") for chain in "xyz"}
        last: dict[str, str] = {}
        for chain in "xyz":  # each chain's full backup, at its own instant, with writes between them
            served.ask("checkpoint", name=f"{chain}1")
            copy_cli(served.view(f"{chain}1"), backups[chain])
            served.ask("release", name=f"{chain}1")
            last[chain] = f"{chain}1"
            scribble(served.uri, rng, size, 10)
        for round_ in (2, 3):
            expected: dict[str, bytes] = {}
            for chain in "xyz":  # every chain's next checkpoint, the views alive together, writes between them
                name = f"{chain}{round_}"
                made = served.ask("checkpoint", name=name, since=last[chain])
                expected[chain] = read_export(served.view(name))
                assert made["since"] == last[chain]
                scribble(served.uri, rng, size, 8)
            assert len(served.ask("status")["exports"][0]["views"]) == 3
            for chain in "xyz":
                name = f"{chain}{round_}"
                copy_cli("--only-dirty", last[chain], served.view(name), backups[chain])
                with open(backups[chain], "rb") as file:
                    assert file.read() == expected[chain], f"chain {chain} at {name}"
                served.ask("release", name=name)
                served.ask("bitmap-remove", name=last[chain])
                last[chain] = name
        assert sorted(bitmap["name"] for bitmap in served.ask("bitmap-list")) == ["x3", "y3", "z3"]
        assert process.stop() == 0


def test_only_dirty_refuses_what_cannot_be_an_incremental_copy(shm_dir: str, tmp_path: Any) -> None:
    with serve(shm_dir, "threads", 4 * MIB) as process:
        served = Served(process, os.path.join(shm_dir, "ctl"))
        served.ask("checkpoint", name="A")
        for args, message in (
            (["--only-dirty", "nope", served.view("A"), str(tmp_path / "x")], "must be the previous backup"),
            (["--only-dirty", "A", str(tmp_path / "missing.img"), str(tmp_path / "x")], "not an NBD URI"),
        ):
            done = subprocess.run([*CLI, "copy", *args], capture_output=True, text=True, timeout=60, env=PEER_ENV)
            assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
        (tmp_path / "old.img").write_bytes(bytes(4 * MIB))
        done = subprocess.run([*CLI, "copy", "--only-dirty", "nope", served.view("A"), str(tmp_path / "old.img")],
                              capture_output=True, text=True, timeout=60, env=PEER_ENV)  # fmt: skip
        assert done.returncode == 1 and "qemu:dirty-bitmap:nope" in done.stderr
        contradiction = ["--only-dirty", "A", "--destination-is-zero", served.view("A"), str(tmp_path / "old.img")]
        done = subprocess.run([*CLI, "copy", *contradiction], capture_output=True, text=True, timeout=60, env=PEER_ENV)
        assert done.returncode == 1 and "--destination-is-zero" in done.stderr
        assert process.stop() == 0


# --- Against qemu-nbd -B ---------------------------------------------------------------------------------------------


def test_only_dirty_copies_from_qemu_nbd_with_a_bitmap(tmp_path: Any) -> None:
    require_peers("qemu-nbd", "qemu-img", "qemu-io")
    image, backup, expected = (str(tmp_path / name) for name in ("disk.qcow2", "backup.raw", "expected.raw"))
    run = lambda *args: subprocess.run(args, check=True, capture_output=True, timeout=60, env=PEER_ENV)  # noqa: E731
    run("qemu-img", "create", "-f", "qcow2", image, "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 20M 2M", image)
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, backup)  # the full backup
    run("qemu-img", "bitmap", "--add", image, "b1")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 100k", "-c", "write -z 20M 1M", "-c",
        "write -P 0x44 30M 4k", image)  # fmt: skip
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, expected)
    sock = str(tmp_path / "qemu.sock")
    with serving_on_socket(["qemu-nbd", "-r", "-f", "qcow2", "-B", "b1", "-k", sock, "-t", image], sock, "qemu-nbd"):
        done = nt.copy(f"nbd+unix:///?socket={sock}", backup, only_dirty="b1", progress=None)
    assert done.copied <= 64 * KIB * 2 + MIB + 64 * KIB and done.data <= done.copied - MIB
    with open(backup, "rb") as got, open(expected, "rb") as want:
        assert got.read() == want.read()


def test_the_library_clients_say_what_changed_through_block_status(shm_dir: str) -> None:
    import anyio

    import nbdproto_anyio

    with serve(shm_dir, "threads", 8 * MIB, "--bitmap", "b") as process:
        served = Served(process, os.path.join(shm_dir, "ctl"))
        with nt.connect(served.uri, timeout=30) as client:
            client.pwrite(b"x" * 100, MIB)
            client.zero(2 * MIB, 4 * MIB)
        contexts = ["base:allocation", "qemu:dirty-bitmap:b"]
        with nt.connect(served.uri, meta_contexts=contexts, timeout=30) as client:
            blocking = client.dirty_extents(client.size, 0, bitmap="b")

        async def asynchronous() -> Any:
            async with await nbdproto_anyio.connect(served.uri, meta_contexts=contexts, timeout=30) as client:
                return await client.dirty_extents(8 * MIB, 0, bitmap="b")

        assert anyio.run(asynchronous) == blocking
        dirty = [(e.offset, e.length, e.zero) for e in blocking if e.dirty]
        assert dirty == [(MIB, 64 * KIB, False), (4 * MIB, 2 * MIB, True)]
        assert sum(e.length for e in blocking) == 8 * MIB
        assert process.stop() == 0
    assert shutil.which("true")
