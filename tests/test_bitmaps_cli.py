"""``nbdproto serve --bitmap NAME[:GRANULARITY]`` and ``--bitmap-dir``: bitmaps served from the start, kept
across restarts (and tracked whenever an image has them, asked for or not), one server per image, and bad
options as one-line usage errors before anything is served."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

import nbdproto_threads as nt
from tests.conftest import PEER_ENV
from tests.remotes import CLI, cli

pytestmark = pytest.mark.timeout(120)
KIB, MIB = 1 << 10, 1 << 20
CONTEXT = "qemu:dirty-bitmap:"


def serve_fails(*args: str) -> str:
    done = subprocess.run([*CLI, "serve", "--port", "0", *args], capture_output=True, text=True, timeout=60,
                          env=PEER_ENV)  # fmt: skip
    assert done.returncode == 1, done.stderr  # a usage error, as nbdkit's
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


@pytest.fixture
def image(tmp_path: Any) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
    return path


def dirty(uri: str, name: str) -> list[tuple[int, int]]:
    with nt.connect(uri, meta_contexts=[CONTEXT + name]) as client:
        runs = client.block_status(client.size, 0, context=CONTEXT + name)
    out, position = [], 0
    for extent in runs:
        if extent.status:
            out.append((position, extent.length))
        position += extent.length
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "1M", "--bitmap", ".x"], "bitmap name"),
        (["--memory", "1M", "--bitmap", "a:3K"], "power of two from 4K"),
        (["--memory", "1M", "--bitmap", "a:lots"], "is not a size"),
        (["--memory", "1M", "--bitmap", "a", "--bitmap", "a:4K"], "names must differ"),
        (["--memory", "1M", "--bitmap", "a", "--workers", "2"], "need --workers 1"),
        (["--memory", "1M", "--bitmap-dir", "{tmp}/b"], "memory export"),
        (["--memory", "1M", "--bitmap", "a", "--bitmap-dir", "{image}"], "not a directory"),
        (["--export", "a b=memory:1M", "--export", "c=memory:1M", "--bitmap-dir", "{tmp}/b"], "DIR/EXPORTNAME"),
    ],
)
def test_bad_bitmap_options_are_one_line_usage_errors(args: list[str], message: str, image: str) -> None:
    tmp = os.path.dirname(image)
    assert message in serve_fails(*(arg.format(tmp=tmp, image=image) for arg in args))


def test_bitmaps_survive_a_restart_and_are_tracked_without_asking(image: str) -> None:
    with cli("serve", image, "--port", "0", "--bitmap", "daily", "--bitmap", "fine:4K") as server:
        uri = server.uri()
        assert nt.list_meta_contexts(uri) == ["base:allocation", CONTEXT + "daily", CONTEXT + "fine"]
        with nt.connect(uri) as client:
            client.pwrite(b"x" * 100, 70 * KIB)
        assert server.stop() == 0
    assert "has granularity 4096" in serve_fails(image, "--bitmap", "fine:64K")
    with cli("serve", image, "--port", "0") as server:  # no --bitmap: IMAGE.bitmaps/ is tracked all the same
        uri = server.uri()
        assert dirty(uri, "daily") == [(64 * KIB, 64 * KIB)]
        assert dirty(uri, "fine") == [(68 * KIB, 4 * KIB)]
        with nt.connect(uri) as client:
            client.trim(4096, 3 * MIB)
        assert "in use by another server" in serve_fails(image)
        assert server.stop() == 0
    with cli("serve", image, "--port", "0", "--read-only") as server:
        assert dirty(server.uri(), "daily") == [(64 * KIB, 64 * KIB), (3 * MIB, 64 * KIB)]


def test_bitmap_dir_keeps_each_exports_bitmaps_in_a_directory_of_its_own(image: str, tmp_path: Any) -> None:
    other = str(tmp_path / "other.img")
    with open(other, "wb") as f:
        f.truncate(MIB)
    keep = str(tmp_path / "keep")
    args = ["--export", f"a={image}", "--export", f"b={other}", "--bitmap", "x", "--bitmap-dir", keep]
    with cli("serve", "--port", "0", *args) as server:
        uri = server.uri().rsplit("/", 1)[0] + "/{}"
        with nt.connect(uri.format("b")) as client:
            client.pwrite(b"y", 0)
        assert dirty(uri.format("b"), "x") == [(0, 64 * KIB)] and dirty(uri.format("a"), "x") == []
        assert server.stop() == 0
    assert sorted(os.listdir(keep)) == ["a", "b"] and os.listdir(os.path.join(keep, "b")) == ["x.bitmap"]
    assert not os.path.exists(image + ".bitmaps")


@pytest.mark.parametrize("backend", ["threads", "anyio"])
def test_memory_bitmaps_are_served_and_counted(backend: str) -> None:
    with cli("serve", "--memory", "8M", "--port", "0", "--backend", backend, "--bitmap", "b:4K", "-v") as server:
        uri = server.uri()
        with nt.connect(uri) as client:
            client.zero(20000, 10000)
        assert dirty(uri, "b") == [(8 * KIB, 24 * KIB)]
        assert server.stop() == 0
    assert any("bitmap b (granularity 4096, 0 bytes dirty) in memory" in line for line in server.err)


def test_a_proxied_export_has_bitmaps_too() -> None:
    with (
        cli("serve", "--memory", "4M", "--port", "0") as upstream,
        cli("serve", upstream.uri(), "--port", "0", "--bitmap", "b:4K") as proxy,
    ):
        uri = proxy.uri()
        with nt.connect(uri) as client:
            client.pwrite(b"z" * 5000, 8192)
            client.pwrite(b"z", 4 * MIB - 1)
        assert dirty(uri, "b") == [(8 * KIB, 8 * KIB), (4 * MIB - 4 * KIB, 4 * KIB)]


def test_a_mirrors_bitmaps_are_kept_beside_its_primary(image: str, tmp_path: Any) -> None:
    with cli("mirror", image, str(tmp_path / "copy.img"), "--port", "0", "--bitmap", "b") as mirror:
        uri = mirror.uri()
        with nt.connect(uri) as client:
            client.pwrite(b"m", MIB)
        assert dirty(uri, "b") == [(MIB, 64 * KIB)]
        assert mirror.stop() == 0
    assert os.listdir(image + ".bitmaps") == ["b.bitmap"]
