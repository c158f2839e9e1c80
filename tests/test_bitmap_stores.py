"""Where bitmaps are kept between runs: the sidecar directory beside an image file (modes, atomic records,
order of the durable writes, damage, symlinks, one server at a time) and the objects under an S3 image's key
(SeaweedFS: generations, leftovers, conditional writes against a second writer)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from nbdproto.devices import FileDevice, MemoryDevice, S3Device, S3Settings
from nbdproto.devices.bitmaps import (
    DirtyBitmapFilter,
    MemoryBitmapStore,
    ObjectBitmapStore,
    SidecarBitmapStore,
    bitmap_store_for,
    sidecar_of,
)
from tests.s3server import SeaweedFS
from tests.test_s3 import new_key

pytestmark = pytest.mark.timeout(120)
KIB, MIB = 1 << 10, 1 << 20
CONTEXT = "qemu:dirty-bitmap:"


@pytest.fixture
def image(tmp_path: Any) -> Iterator[str]:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
    yield path


def tracked_file(path: str) -> DirtyBitmapFilter:
    device = FileDevice(path)
    return DirtyBitmapFilter(device, bitmap_store_for(device))


def dirty_runs(tracked: DirtyBitmapFilter, name: str) -> list[tuple[int, int]]:
    out, position = [], 0
    for length, flag in tracked.extents(CONTEXT + name, 0, tracked.size):
        if flag:
            out.append((position, length))
        position += length
    return out


# --- The sidecar directory ------------------------------------------------------------------------------------


def test_sidecar_keeps_bitmaps_across_a_restart_with_private_modes(image: str) -> None:
    with tracked_file(image) as tracked:
        tracked.bitmap_add("daily")
        tracked.bitmap_add("weekly", 4 * KIB)
        tracked.pwrite(b"x" * 10, 100 * KIB)
        tracked.write_zeroes(3 * MIB, 5000)
    directory = sidecar_of(image)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert sorted(os.listdir(directory)) == ["daily.bitmap", "weekly.bitmap"]
    for entry in os.listdir(directory):
        assert stat.S_IMODE(os.stat(os.path.join(directory, entry)).st_mode) == 0o600
    with tracked_file(image) as tracked:
        assert [(i.name, i.granularity) for i in tracked.bitmap_list()] == [("daily", 65536), ("weekly", 4096)]
        assert dirty_runs(tracked, "daily") == [(64 * KIB, 64 * KIB), (3 * MIB, 64 * KIB)]
        assert dirty_runs(tracked, "weekly") == [(100 * KIB, 4 * KIB), (3 * MIB, 8 * KIB)]
        inode = os.stat(os.path.join(directory, "daily.bitmap")).st_ino
        tracked.bitmap_clear("daily")  # a new file renamed over the old one: the old record or the new
        assert os.stat(os.path.join(directory, "daily.bitmap")).st_ino != inode
        tracked.bitmap_remove("weekly")
    with tracked_file(image) as tracked:
        assert [(i.name, i.dirty_bytes) for i in tracked.bitmap_list()] == [("daily", 0)]


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_a_granule_is_synced_to_the_sidecar_before_the_write_reaches_the_image(
    where: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of the system calls: the sidecar's bits written and fdatasynced (on a disk; on tmpfs the
    write alone), then the image written; a second write to the same granule goes straight to the image."""
    if where != "tmp_path" and not os.path.isdir(where):
        pytest.skip(f"no {where} here")
    directory = tempfile.mkdtemp(dir=tmp_path if where == "tmp_path" else where)
    image = os.path.join(directory, "disk.img")
    with open(image, "wb") as f:
        f.truncate(8 * MIB)
    tracked = tracked_file(image)
    tracked.bitmap_add("b")
    source = tracked.inner
    assert isinstance(source, FileDevice)
    calls: list[tuple[str, str]] = []
    names = {source.fileno(): "image"}
    real_pwrite, real_fdatasync = os.pwrite, os.fdatasync

    def name_of(fd: int) -> str:
        return names.get(fd) or os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls.append(("pwrite", name_of(fd)))
        return real_pwrite(fd, data, offset)

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync", name_of(fd)))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    tracked.pwrite(b"x" * 100, 5 * MIB + 3)
    tracked.pwrite(b"y" * 100, 5 * MIB + 4000)
    monkeypatch.undo()
    on_disk = tracked.store.dispatch != "inline"  # the sidecar's directory is not on tmpfs
    tracked.close()
    shutil.rmtree(directory)
    synced = [("fdatasync", "b.bitmap")] if on_disk else []
    assert calls == [("pwrite", "b.bitmap"), *synced, ("pwrite", "image"), ("pwrite", "image")]


def test_temporary_files_a_crash_left_are_removed_and_symlinks_never_followed(image: str, tmp_path: Any) -> None:
    directory = sidecar_of(image)
    os.mkdir(directory, 0o700)
    with open(os.path.join(directory, ".b.0123456789abcdef.tmp"), "wb") as f:
        f.write(b"half a record")
    SidecarBitmapStore(directory).close()
    assert os.listdir(directory) == []
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    os.symlink(target, os.path.join(directory, "b.bitmap"))
    with pytest.raises(OSError) as raised:
        tracked_file(image)
    assert raised.value.errno == errno.ELOOP
    assert target.read_bytes() == b"precious"
    os.unlink(os.path.join(directory, "b.bitmap"))
    os.rmdir(directory)
    os.symlink(tmp_path, directory)  # the directory itself a symlink: not followed either
    with pytest.raises(OSError) as raised:
        tracked_file(image)
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"NOTABMAP" + data[8:], "not a bitmap file"),
        (lambda data: data[:20] + bytes([data[20] ^ 1]) + data[21:], "damaged"),
        (lambda data: data[:-1], "bytes long"),
        (lambda data: data + b"\0", "bytes long"),
    ],
)
def test_a_damaged_sidecar_file_is_an_error_naming_it(image: str, damage: Any, message: str) -> None:
    with tracked_file(image) as tracked:
        tracked.bitmap_add("b")
    path = os.path.join(sidecar_of(image), "b.bitmap")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(OSError, match=message) as raised:
        tracked_file(image)
    assert raised.value.errno == errno.EINVAL and raised.value.filename == path


def test_one_server_at_a_time_tracks_an_image(image: str) -> None:
    with tracked_file(image) as tracked:
        tracked.bitmap_add("b")
        with pytest.raises(OSError) as raised:
            tracked_file(image)
        assert raised.value.errno == errno.EBUSY and "in use by another server" in str(raised.value)
    tracked_file(image).close()  # free again once the first is closed


def test_the_image_size_changed_while_nobody_served_it(image: str) -> None:
    with tracked_file(image) as tracked:
        tracked.bitmap_add("b")
    with open(image, "r+b") as f:
        f.truncate(8 * MIB + 100 * KIB)
    with tracked_file(image) as tracked:
        info = tracked.bitmap_info("b")
        assert info.size == 8 * MIB + 100 * KIB
        assert dirty_runs(tracked, "b") == [(8 * MIB, 100 * KIB)]


def test_where_bitmaps_are_kept(image: str, tmp_path: Any) -> None:
    assert isinstance(bitmap_store_for(MemoryDevice(MIB)), MemoryBitmapStore)
    with pytest.raises(ValueError, match="memory export"):
        bitmap_store_for(MemoryDevice(MIB), str(tmp_path / "b"))
    device = FileDevice(image)
    store = bitmap_store_for(device, str(tmp_path / "mine"))
    assert isinstance(store, SidecarBitmapStore) and store.where == str(tmp_path / "mine")
    store.close()
    device.close()


# --- Objects under an S3 image's key --------------------------------------------------------------------------


def s3_tracked(store: SeaweedFS, key: str, *, lease: float | None = None) -> DirtyBitmapFilter:
    device = S3Device(
        store.bucket,
        key,
        size=4 * MIB,
        object_size=64 * KIB,
        settings=S3Settings(endpoint=store.endpoint),
        lease=lease,
    )
    bitmaps = bitmap_store_for(device)
    assert isinstance(bitmaps, ObjectBitmapStore)
    return DirtyBitmapFilter(device, bitmaps)


def test_s3_bitmaps_are_objects_under_the_key_and_survive_a_restart(s3_store: SeaweedFS) -> None:
    key = new_key()
    with s3_tracked(s3_store, key) as tracked:
        tracked.bitmap_add("b")
        tracked.pwrite(b"x" * 10, 100 * KIB)
        tracked.trim(2 * MIB, 1)
        assert tracked.dispatch == "threads"
    objects = s3_store.keys(f"{key}/bitmaps/")
    assert sorted(objects) == [f"{key}/bitmaps/b/00000000/00000000", f"{key}/bitmaps/b/header"]
    with s3_tracked(s3_store, key) as tracked:
        assert dirty_runs(tracked, "b") == [(64 * KIB, 64 * KIB), (2 * MIB, 64 * KIB)]
        tracked.bitmap_clear("b")  # the next generation, made current by the header; the old chunks go
        assert sorted(s3_store.keys(f"{key}/bitmaps/")) == [f"{key}/bitmaps/b/header"]
        tracked.pwrite(b"y", 0)
    with s3_tracked(s3_store, key) as tracked:
        assert dirty_runs(tracked, "b") == [(0, 64 * KIB)]
        tracked.bitmap_remove("b")
    assert s3_store.keys(f"{key}/bitmaps/") == {}


def test_s3_leftovers_of_a_crash_are_removed_when_the_bitmaps_open(s3_store: SeaweedFS) -> None:
    key = new_key()
    with s3_tracked(s3_store, key) as tracked:
        tracked.bitmap_add("b")
        tracked.pwrite(b"x", 0)
    client = s3_store.client()
    for stray in ("b/00000007/00000000", "half/00000000/00000000", "b/00000000/junk"):
        client.put_object(Bucket=s3_store.bucket, Key=f"{key}/bitmaps/{stray}", Body=b"\xff")
    with s3_tracked(s3_store, key) as tracked:
        assert dirty_runs(tracked, "b") == [(0, 64 * KIB)]
    assert sorted(s3_store.keys(f"{key}/bitmaps/")) == [f"{key}/bitmaps/b/00000000/00000000", f"{key}/bitmaps/b/header"]


def test_s3_a_second_writer_of_one_bitmap_is_refused_before_its_write(s3_store: SeaweedFS) -> None:
    """Two servers on one image, each sure it is alone (no lease: the image's lease refuses the second writer
    before this, tests/test_s3_lease.py): the second's marks fail their condition (the first changed the chunk
    since the second read it), so its write fails and never reaches the image."""
    key = new_key()
    first = s3_tracked(s3_store, key, lease=0)
    first.bitmap_add("b")
    second = s3_tracked(s3_store, key, lease=0)
    first.pwrite(b"1", 0)
    with pytest.raises(OSError) as raised:
        second.pwrite(b"2", 64 * KIB)
    assert raised.value.errno == errno.ESTALE and "another writer" in str(raised.value)
    read = bytearray(1)
    second.pread_into(memoryview(read), 64 * KIB)
    assert read == b"\0"
    first.close()
    second.close()
