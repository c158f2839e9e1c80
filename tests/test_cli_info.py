"""``nbdproto info`` against nbdinfo on the same exports: --map (every layout) on nbdkit's sparse file, qemu-nbd's
dirty bitmap and allocation depth, and our servers; --can / --is exit codes for every feature; --list; --size."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto_threads as nt
from nbdproto import parse_uri
from nbdproto.cli import main
from nbdproto.devices import FileDevice, MemoryDevice
from tests.conftest import PEER_ENV
from tests.remotes import serving_on_socket
from tests.serving import Export, serve_exports
from tests.test_opt_mode import qemu_nbd_with_bitmap

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20
CLI = [sys.executable, "-m", "nbdproto"]
NBDINFO_FEATURES = ["connect", "read", "write", "read-only", "rotational", "flush", "fua", "trim", "zero",
                    "fast-zero", "cache", "df", "multi-conn", "structured-reply", "tls"]  # fmt: skip


def ours(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "info", *args], capture_output=True, text=True, timeout=60, env=PEER_ENV)


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60, env=PEER_ENV)


def sparse_image(path: str) -> None:
    """8 MiB with data at 320K-512K and 3M-3M+4K, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(320 * 1024)
        f.write(os.urandom(192 * 1024))
        f.seek(3 * MIB)
        f.write(b"x" * 4096)


@contextlib.contextmanager
def nbdkit_file() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="nbdproto-map-") as tmp:
        image, sock = os.path.join(tmp, "disk.img"), os.path.join(tmp, "nbd.sock")
        sparse_image(image)
        with serving_on_socket(["nbdkit", "-f", "-U", sock, "file", image], sock, "nbdkit"):
            yield f"nbd+unix:///?socket={sock}"


@contextlib.contextmanager
def our_server(backend: str = "threads") -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="nbdproto-map-") as tmp:
        image = os.path.join(tmp, "disk.img")
        sparse_image(image)
        memory = MemoryDevice(4 * MIB)
        memory.pwrite(b"y" * 70000, 4096)
        exports = {"file": Export(FileDevice(image), "a sparse file"), "mem": Export(memory, read_only=True)}
        with serve_exports(backend, exports) as base:
            yield base


def same_map(uri: str, context: str | None = None) -> None:
    """Every layout of --map (table, JSON, totals, JSON totals) prints what nbdinfo prints, byte for byte."""
    option = "--map" if context is None else f"--map={context}"
    for extra in ([], ["--json"], ["--totals"], ["--json", "--totals"]):
        theirs, mine = nbdinfo(option, *extra, uri), ours(option, *extra, uri)
        assert theirs.returncode == mine.returncode == 0, (theirs.stderr, mine.stderr)
        assert mine.stdout == theirs.stdout, (option, extra)
        if "--json" in extra:
            assert json.loads(mine.stdout) == json.loads(theirs.stdout)


def test_map_equals_nbdinfo_on_nbdkit_sparse_file(peers: Any) -> None:
    peers("nbdkit", "nbdinfo")
    with nbdkit_file() as uri:
        same_map(uri)
        extents = json.loads(ours("--map", "--json", uri).stdout)
    first = [(e["offset"], e["length"], e["description"]) for e in extents][:2]
    assert first == [(0, 320 * 1024, "hole,zero"), (320 * 1024, 192 * 1024, "data")]


def test_map_of_a_dirty_bitmap_equals_nbdinfo_on_qemu_nbd(peers: Any) -> None:
    peers("nbdinfo", "qemu-nbd", "qemu-img", "qemu-io")
    with qemu_nbd_with_bitmap() as uri:
        same_map(uri)
        same_map(uri, "qemu:dirty-bitmap:b0")
        same_map(uri, "qemu:allocation-depth")
        dirty = json.loads(ours("--map=qemu:dirty-bitmap:b0", "--json", uri).stdout)
        missing = ours("--map=qemu:dirty-bitmap:nope", uri)
    dirty_runs = [(e["offset"], e["length"]) for e in dirty if e["description"] == "dirty"]
    assert dirty_runs == [(MIB, 128 * 1024), (3 * MIB, 64 * 1024)]
    assert missing.returncode == 1 and "does not offer meta context" in missing.stderr


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_map_equals_nbdinfo_on_our_server(backend: str, peers: Any) -> None:
    peers("nbdinfo")
    with our_server(backend) as base:
        same_map(base.format("file"))
        same_map(base.format("mem"))


def feature_codes(uri: str) -> tuple[dict[str, int], dict[str, int]]:
    """The exit codes of nbdinfo's and ours for --can and --is of every feature nbdinfo 1.14 knows (ours run in
    this process: the same main() as the command, without a Python start-up each)."""
    theirs, mine = {}, {}
    for feature in NBDINFO_FEATURES:
        for word in ("--can", "--is"):
            theirs[f"{word} {feature}"] = nbdinfo(word, feature, uri).returncode
            mine[f"{word} {feature}"] = main(["info", word, feature, uri])
    return theirs, mine


@pytest.mark.parametrize("server", ["nbdkit", "qemu-nbd", "ours"])
def test_can_and_is_exit_codes_equal_nbdinfo(server: str, peers: Any) -> None:
    peers("nbdinfo", "nbdkit", "qemu-nbd", "qemu-img", "qemu-io")
    with contextlib.ExitStack() as stack:
        if server == "nbdkit":
            uri = stack.enter_context(nbdkit_file())
        elif server == "qemu-nbd":
            uri = stack.enter_context(qemu_nbd_with_bitmap())
        else:
            uri = stack.enter_context(our_server()).format("file")
        theirs, mine = feature_codes(uri)
        # nbdinfo 1.14 has no block-status or extended-headers test; ours answer what the connection agreed.
        extended = main(["info", "--can", "extended-headers", uri])
        block_status = main(["info", "--is", "block-status", uri])
        first = ours("--can", "trim", uri).returncode  # and once as the command itself
    assert mine == theirs
    assert set(theirs.values()) <= {0, 2} and 2 in theirs.values() and 0 in theirs.values()
    assert first == theirs["--can trim"]
    assert block_status == 0
    assert extended == (0 if server == "ours" else 2)


def test_feature_errors_are_not_no(peers: Any) -> None:
    peers("nbdinfo")
    unreachable = "nbd://127.0.0.1:1/"
    assert ours("--can", "connect", unreachable).returncode == nbdinfo("--can", "connect", unreachable).returncode == 1
    with our_server() as base:
        unknown = ours("--can", "fly", base.format("file"))
    assert unknown.returncode == 1 and "unknown --can or --is feature 'fly'" in unknown.stderr


def test_list_shows_every_export_with_details(peers: Any) -> None:
    peers("nbdinfo")
    with our_server() as base:
        uri = base.format("")
        theirs, mine = nbdinfo("--list", uri), ours("--list", uri)
        listed = json.loads(ours("--list", "--json", uri).stdout)
        with nt.connect(base.format("file")) as client:
            assert client.export.description == "a sparse file"
    # The same lines as nbdinfo's but for the protocol line (we speak extended headers; nbdinfo 1.14 cannot).
    assert mine.returncode == theirs.returncode == 0
    assert mine.stdout.splitlines()[1:] == theirs.stdout.splitlines()[1:]
    assert mine.stdout.startswith("protocol: newstyle-fixed without TLS, using extended packets\n")
    assert 'export="file":\n\tdescription: a sparse file\n\texport-size: 8388608 (8M)\n' in mine.stdout
    assert (listed["protocol"], listed["TLS"], listed["structured"], listed["extended"]) == ("newstyle-fixed", False,
                                                                                             True, True)  # fmt: skip
    by_name = {e["export-name"]: e for e in listed["exports"]}
    assert set(by_name) == {"file", "mem"}
    assert by_name["mem"]["export-size"] == 4 * MIB and by_name["mem"]["is_read_only"] is True
    assert by_name["file"]["contexts"] == ["base:allocation"]
    assert by_name["file"]["block_size_minimum"] == 1 and by_name["file"]["uri"].endswith("/file")
    assert "content" not in by_name["file"]  # nbdinfo --list reads no export, unless --content


def test_info_text_and_size_equal_nbdinfo_on_qemu_nbd(peers: Any) -> None:
    peers("nbdinfo", "qemu-nbd", "qemu-img", "qemu-io")
    with qemu_nbd_with_bitmap() as uri:
        theirs, mine = nbdinfo(uri).stdout, ours(uri).stdout
        bare, mine_bare = nbdinfo("--no-content", uri).stdout, ours("--no-content", uri).stdout
        size, their_size = ours("--size", uri).stdout, nbdinfo("--size", uri).stdout
        document = json.loads(ours("--json", uri).stdout)
    # qemu-nbd speaks no extended headers: every line is the same, contexts and content (file(1)) included.
    assert mine == theirs and "\tcontent: " in mine
    assert mine_bare == bare and "content" not in mine_bare
    assert size == their_size == "8388608\n"
    assert document["exports"][0]["contexts"] == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]


OURS_ONLY = {"extended", "can_resize", "can_block_status_payload"}
"""Keys of our --json that nbdinfo 1.14 does not print: what we know of the export besides (newer nbdinfo prints
"extended" too)."""


def same_document(theirs: dict[str, Any], mine: dict[str, Any], where: str) -> None:
    """nbdinfo's --json document and ours, key by key: the same keys but OURS_ONLY, the same values but the
    URI, compared as what it points at (nbdinfo prints libnbd's rendering of it, we the one we were given)."""
    assert set(mine) - OURS_ONLY == set(theirs), where
    for key in theirs:
        if key != "exports":
            assert mine[key] == theirs[key], (where, key)
    assert len(mine["exports"]) == len(theirs["exports"]), where
    for their_export, my_export in zip(theirs["exports"], mine["exports"], strict=True):
        assert set(my_export) - OURS_ONLY == set(their_export), (where, set(my_export) ^ set(their_export))
        for key, value in their_export.items():
            if key == "uri":
                assert parse_uri(my_export[key]) == parse_uri(value), (where, key)
            else:
                assert my_export[key] == value, (where, their_export["export-name"], key)


@contextlib.contextmanager
def nbdkit_exports() -> Iterator[str]:
    """nbdkit serving two exports (file and memory) with descriptions, on a unix socket; the base URI."""
    with tempfile.TemporaryDirectory(prefix="nbdproto-json-") as tmp:
        image, sock = os.path.join(tmp, "disk.img"), os.path.join(tmp, "nbd.sock")
        sparse_image(image)
        command = ["nbdkit", "-f", "-U", sock, "--filter=exportname", "file", image, "exportname=a",
                   "exportname=b", "exportname-list=explicit", "exportdesc=fixed:an nbdkit export"]  # fmt: skip
        with serving_on_socket(command, sock, "nbdkit"):
            yield f"nbd+unix:///{{}}?socket={sock}"


@pytest.mark.parametrize("server", ["nbdkit", "qemu-nbd", "threads", "asyncio"])
def test_json_is_nbdinfos_document_on_every_server(server: str, peers: Any) -> None:
    """``info --json`` and ``info --list --json`` against ``nbdinfo --json`` on the same servers (nbdkit,
    qemu-nbd, both our backends), parsed and compared key by key: the schema is nbdinfo's."""
    peers("nbdinfo", "nbdkit", "qemu-nbd", "qemu-img", "qemu-io")
    with contextlib.ExitStack() as stack:
        if server == "nbdkit":
            uris = [stack.enter_context(nbdkit_exports()).format("a")]
        elif server == "qemu-nbd":
            uris = [stack.enter_context(qemu_nbd_with_bitmap())]
        else:
            base = stack.enter_context(our_server(server))
            uris = [base.format("file"), base.format("mem")]
        for uri in uris:
            for args in (["--json"], ["--json", "--no-content"], ["--json", "--list"], ["--json", "--list",
                                                                                         "--content"]):  # fmt: skip
                theirs, mine = nbdinfo(*args, uri), ours(*args, uri)
                assert theirs.returncode == mine.returncode == 0, (args, theirs.stderr, mine.stderr)
                same_document(json.loads(theirs.stdout), json.loads(mine.stdout), f"{server} {uri} {args}")
