"""S3Device against a real object store (SeaweedFS, the ``s3_store`` fixture): the layout, sparseness, block
status, read-modify-write, the write-back cache, bad states, concurrency and durability, through the device
and through our servers. The real tools' interop is in test_s3_interop.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

import nbdproto
import nbdproto_threads as nt
from nbdproto.devices import S3Device, S3Settings
from tests.s3server import SeaweedFS, stall_proxy
from tests.serving import Export, serve_exports
from tests.threaded import run_threads

KIB, MIB = 1 << 10, 1 << 20
pytestmark = pytest.mark.timeout(120)
CLI = [sys.executable, "-m", "nbdproto"]


def new_key() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def open_image(store: SeaweedFS, key: str, size: int, object_size: int = 64 * KIB, **kw: Any) -> S3Device:
    return S3Device(
        store.bucket, key, size=size, object_size=object_size, settings=S3Settings(endpoint=store.endpoint), **kw
    )


def read_all(device: S3Device) -> bytes:
    buffer = bytearray(device.size)
    device.pread_into(memoryview(buffer), 0)
    return bytes(buffer)


@pytest.mark.parametrize("write_back", [0, 1 * MIB], ids=["write-through", "write-back"])
def test_random_writes_of_odd_sizes_read_back_like_a_model(s3_store: SeaweedFS, write_back: int) -> None:
    """Seeded writes, zeroes and trims at odd offsets and sizes, spanning objects or inside one (read-modify-
    write), compared with a bytearray after each step and, reopened from the store alone, at the end."""
    size, key = 1 * MIB, new_key()
    model = bytearray(size)
    rng = random.Random(14)
    with open_image(s3_store, key, size, write_back=write_back) as device:
        for step in range(60):
            offset = rng.randrange(size)
            length = rng.randrange(1, min(200 * KIB, size - offset) + 1)
            kind = rng.random()
            if kind < 0.7:
                data = rng.randbytes(length)
                device.pwrite(data, offset, fua=step % 7 == 0)
                model[offset : offset + length] = data
            elif kind < 0.85:
                device.write_zeroes(offset, length, may_trim=rng.random() < 0.5)
                model[offset : offset + length] = bytes(length)
            else:
                # Trim drops only whole objects (the rest is a hint we do not take): the model follows.
                device.trim(offset, length)
                first = -(-offset // (64 * KIB)) * 64 * KIB
                last = (offset + length) // (64 * KIB) * 64 * KIB
                if last > first:
                    model[first:last] = bytes(last - first)
            if step % 10 == 0:
                assert read_all(device) == model, f"step {step}"
        assert read_all(device) == model
    with open_image(s3_store, key, size) as fresh:
        assert read_all(fresh) == model


def test_layout_is_nbdkits_and_only_objects_with_data_exist(s3_store: SeaweedFS) -> None:
    key = new_key()
    with open_image(s3_store, key, 1 * MIB) as device:
        device.pwrite(b"x", 64 * KIB + 5)  # one byte: the whole object is stored
        device.pwrite(b"y" * (128 * KIB), 512 * KIB)
        device.write_zeroes(0, 64 * KIB)  # never written: nothing to delete, nothing stored
    assert s3_store.keys(key + "/") == {
        f"{key}/0000000000000001": 64 * KIB,
        f"{key}/0000000000000008": 64 * KIB,
        f"{key}/0000000000000009": 64 * KIB,
    }
    body = s3_store.client().get_object(Bucket=s3_store.bucket, Key=f"{key}/0000000000000001")["Body"].read()
    assert body == bytes(5) + b"x" + bytes(64 * KIB - 6)


def test_sparse_image_block_status_and_trim_deletes_objects(s3_store: SeaweedFS) -> None:
    """1 GiB image, 10 MiB of data: only the objects holding data exist; block status reports the rest as
    holes, answered from the listing of a freshly opened device; trimming the data deletes its objects."""
    key, size, obj = new_key(), 1 << 30, 1 * MIB
    rng = random.Random(10)
    starts = sorted(rng.sample(range(1024), 10))
    with open_image(s3_store, key, size, obj) as device:
        for start in starts:
            device.pwrite(rng.randbytes(obj), start * obj)
    assert len(s3_store.keys(key + "/")) == 10
    with open_image(s3_store, key, size, obj) as device:
        assert device.stored_objects == 10
        data = []
        offset = 0
        while offset < size:
            for length, flags in device.extents(nbdproto.BASE_ALLOCATION, offset, size - offset):
                if flags == 0:
                    data.append((offset, length))
                else:
                    assert flags == nbdproto.AllocationState.HOLE | nbdproto.AllocationState.ZERO
                offset += length
        assert sum(length for _, length in data) == 10 * MIB
        assert {o // obj for o, length in data for o in range(o, o + length, obj)} == set(starts)
        device.trim(0, size)
        assert device.stored_objects == 0
        assert device.extents(nbdproto.BASE_ALLOCATION, 0, size) == [(size, 3)]
    assert s3_store.keys(key + "/") == {}


def test_single_object_is_a_read_only_image_of_its_size(s3_store: SeaweedFS) -> None:
    key = new_key()
    body = random.Random(1).randbytes(3 * MIB + 123)
    s3_store.client().put_object(Bucket=s3_store.bucket, Key=key, Body=body)
    with S3Device(s3_store.bucket, key, settings=S3Settings(endpoint=s3_store.endpoint)) as device:
        assert device.size == len(body)
        assert not device.capabilities.can_write
        buffer = bytearray(len(body) - 7)
        device.pread_into(memoryview(buffer), 7)
        assert buffer == body[7:]
        with pytest.raises(OSError) as raised:
            device.pwrite(b"x", 0)
        assert raised.value.errno == errno.EROFS
        with pytest.raises(OSError) as raised:
            device.pread_into(memoryview(bytearray(2)), len(body) - 1)
        assert raised.value.errno == errno.EINVAL


def test_missing_bucket_and_refused_credentials_fail_at_open(s3_store: SeaweedFS, monkeypatch: Any) -> None:
    settings = S3Settings(endpoint=s3_store.endpoint)
    with pytest.raises(OSError, match="bucket 'no-such-bucket' does not exist") as raised:
        S3Device("no-such-bucket", "img", size=MIB, object_size=64 * KIB, settings=settings)
    assert raised.value.errno == errno.ENOENT
    with pytest.raises(OSError, match="does not exist"):
        S3Device(s3_store.bucket, new_key(), settings=settings)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(OSError, match="refused the credentials") as raised:
        S3Device(s3_store.bucket, "img", size=MIB, object_size=64 * KIB, settings=settings)
    assert raised.value.errno == errno.EACCES
    assert "\n" not in str(raised.value)


def test_credentials_from_a_profile_in_the_shared_files(
    s3_store: SeaweedFS, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard chain: no keys in the environment, a named profile in a shared credentials file."""
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n"
        f"[nbdproto]\naws_access_key_id = {s3_store.env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {s3_store.env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    with pytest.raises(OSError, match="refused the credentials"):
        open_image(s3_store, new_key(), MIB)  # the default profile's keys are wrong
    monkeypatch.setenv("AWS_PROFILE", "nbdproto")
    with open_image(s3_store, new_key(), MIB) as device:
        device.pwrite(b"profile", 0)


def test_block_sizes_follow_the_object_size(s3_store: SeaweedFS) -> None:
    """Any alignment (the device does the read-modify-write), whole objects preferred, up to the 32 MiB the
    spec allows as a preferred size, and 32 MiB requests."""
    for object_size, preferred in ((4 * KIB, 4 * KIB), (1 * MIB, 1 * MIB), (64 * MIB, 32 * MIB)):
        with open_image(s3_store, new_key(), 128 * MIB, object_size) as device:
            caps = device.capabilities
            assert (caps.minimum_block_size, caps.preferred_block_size, caps.maximum_payload) == (
                1,
                preferred,
                32 * MIB,
            )
    with pytest.raises(ValueError, match="power of two"):
        open_image(s3_store, new_key(), 128 * MIB, 128 * MIB)


def test_object_of_the_wrong_size_fails_that_request_with_eio_and_a_log_line(
    s3_store: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    s3_store.client().put_object(Bucket=s3_store.bucket, Key=f"{key}/0000000000000002", Body=b"short")
    with (
        open_image(s3_store, key, MIB) as device,
        serve_exports("threads", {"": Export(device)}) as uri,
        nt.connect(uri.format("")) as client,
    ):
        caplog.set_level(logging.WARNING, "nbdproto.devices.s3")
        with pytest.raises(nbdproto.NBDError) as raised:
            client.pread(4096, 2 * 64 * KIB)
        assert raised.value.errno == errno.EIO
        with pytest.raises(nbdproto.NBDError) as raised:
            client.pwrite(b"z", 2 * 64 * KIB + 1)  # a read-modify-write of it must not overwrite it either
        assert raised.value.errno == errno.EIO
        # The rest of the image, and the connection, are fine.
        client.pwrite(b"ok", 0)
        assert client.pread(2, 0) == b"ok"
    assert any("has 5 bytes, not 65536" in r.getMessage() for r in caplog.records)
    assert s3_store.keys(f"{key}/0000000000000002") == {f"{key}/0000000000000002": 5}


def test_store_that_stalls_mid_request_gives_eio_in_bounded_time(
    s3_store: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    with stall_proxy(s3_store.endpoint) as proxy:
        # Long enough that a loaded machine's slow answer is not taken for a stall (1 s was, once, for both
        # tries of the first write), short enough that a stalled call, its retry included, ends in about 4 s.
        settings = S3Settings(endpoint=proxy.endpoint, timeout=2.0, retries=1, retry_timeout=3.0)
        with S3Device(s3_store.bucket, key, size=MIB, object_size=64 * KIB, settings=settings) as device:
            device.pwrite(b"a" * 100, 0)
            caplog.set_level(logging.WARNING, "nbdproto.devices.s3")
            proxy.stalled.set()
            for call in (lambda: device.pwrite(b"b" * 100, 64 * KIB), lambda: read_all(device)):
                started = time.monotonic()
                with pytest.raises(OSError) as raised:
                    call()
                assert raised.value.errno == errno.EIO
                assert time.monotonic() - started < 10
            proxy.stalled.clear()
            assert read_all(device)[:101] == b"a" * 100 + b"\0"
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_write_back_with_a_stalled_store_fails_flush_and_full_cache_writes_then_recovers(
    s3_store: SeaweedFS,
) -> None:
    """Uploads that time out leave their objects dirty: FLUSH fails with EIO (in bounded time), a write that
    needs room in a cache full of them fails too rather than waits for ever, and once the store answers
    again the next flush stores everything."""
    key = new_key()
    with stall_proxy(s3_store.endpoint) as proxy:
        settings = S3Settings(endpoint=proxy.endpoint, timeout=2.0, retries=0, retry_timeout=3.0)
        with S3Device(
            s3_store.bucket, key, size=MIB, object_size=64 * KIB, write_back=256 * KIB, settings=settings
        ) as device:
            proxy.stalled.set()
            for i in range(4):  # fills the cache: acknowledged from memory
                device.pwrite(bytes([i + 1]) * 100, i * 64 * KIB)
            started = time.monotonic()
            with pytest.raises(OSError) as raised:
                device.flush()
            assert raised.value.errno == errno.EIO
            with pytest.raises(OSError) as raised:
                device.pwrite(b"x", 5 * 64 * KIB)  # a fifth object: no room, and uploads fail
            assert raised.value.errno == errno.EIO
            assert time.monotonic() - started < 20
            proxy.stalled.clear()
            device.flush()
    with open_image(s3_store, key, MIB) as fresh:
        image = read_all(fresh)
    assert [image[i * 64 * KIB : i * 64 * KIB + 100] for i in range(4)] == [bytes([i + 1]) * 100 for i in range(4)]


@pytest.mark.parametrize("write_back", [0, 1 * MIB], ids=["write-through", "write-back"])
def test_eight_connections_writing_into_the_same_objects_lose_nothing(s3_store: SeaweedFS, write_back: int) -> None:
    """8 clients write small pieces at odd offsets into the same few objects at once (each object is
    read-modify-written by all of them): every byte ends as its last writer left it. Each client owns the
    512-byte cells numbered its number modulo 8, so the final image is known whatever the interleaving."""
    size, cell, clients = 256 * KIB, 512, 8
    key = new_key()
    model = bytearray(size)
    with (
        open_image(s3_store, key, size, write_back=write_back) as device,
        serve_exports("asyncio", {"": Export(device)}) as uri,
    ):
        with nt.connect(uri.format("")) as setup:
            assert setup.can(nbdproto.TransmissionFlags.CAN_MULTI_CONN)

        def work(me: int) -> None:
            rng = random.Random(1400 + me)
            with nt.connect(uri.format("")) as client:
                for _ in range(40):
                    index = rng.randrange(size // cell // clients) * clients + me
                    start = rng.randrange(cell)
                    length = rng.randrange(1, cell - start + 1)
                    data = rng.randbytes(length)
                    client.pwrite(data, index * cell + start)
                    model[index * cell + start : index * cell + start + length] = data

        run_threads(work, clients)
        with nt.connect(uri.format("")) as client:
            assert client.pread(size, 0) == model
    with open_image(s3_store, key, size) as fresh:
        assert read_all(fresh) == model


def serve_s3(store: SeaweedFS, key: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``nbdproto serve s3://...`` in a subprocess; its URI once it listens (bounded start-up)."""
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", f"s3://{store.bucket}/{key}", "--s3-endpoint", store.endpoint, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **store.env},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # the process prints its URI, or exits (EOF) on an error
    if not line.startswith("serving "):
        proc.kill()
        raise AssertionError(f"no URI: {line!r} {proc.stderr.read() if proc.stderr else b''!r}")
    return proc, line.split()[1]


@pytest.mark.parametrize("write_back", [None, "4M"], ids=["write-through", "write-back"])
def test_acknowledged_writes_survive_sigkill(s3_store: SeaweedFS, write_back: str | None) -> None:
    """FUA writes and flushed writes are in the store when the server is killed: a fresh device reads them.
    (Write-through acknowledges every write only once stored, so there every write survives.)"""
    key = new_key()
    proc, uri = serve_s3(s3_store, key, "--size", "4M", "--object-size", "64K",
                         *(["--s3-write-back", write_back] if write_back else []))  # fmt: skip
    try:
        with nt.connect(uri) as client:
            client.pwrite(b"A" * 1000, 100)  # inside one object: a read-modify-write
            client.pwrite(b"B" * (200 * KIB), 300 * KIB)
            client.flush()
            client.pwrite(b"C" * 777, 2 * MIB + 3, fua=True)
            client.pwrite(b"D" * 10, 3 * MIB)  # neither flushed nor FUA
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    with open_image(s3_store, key, 4 * MIB, read_only=True) as fresh:  # a writer would wait for the lease
        image = read_all(fresh)
    assert image[100:1100] == b"A" * 1000
    assert image[300 * KIB : 500 * KIB] == b"B" * (200 * KIB)
    assert image[2 * MIB + 3 : 2 * MIB + 780] == b"C" * 777
    if write_back is None:
        assert image[3 * MIB : 3 * MIB + 10] == b"D" * 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["s3://bucket-only"], "expected s3://BUCKET/KEY"),
        (["s3://b/k", "--size", "1M", "--object-size", "3K"], "must be a power of two"),
        (["s3://b/k", "--size", "1G", "--object-size", "128M"], "at most 64M"),
        (["s3://b/k", "--object-size", "64K"], "--object-size needs --size"),
        (["s3://b/k", "--size", "100K", "--object-size", "64K"], "must be a multiple of the object size"),
        (["s3://b/k", "--s3-write-back", "1M"], "--s3-write-back needs --size"),
        (["--memory", "1M", "--size", "1M"], "--size is for s3:// sources only"),
    ],
)
def test_bad_s3_arguments_are_one_line_usage_errors(args: list[str], message: str) -> None:
    done = subprocess.run([*CLI, "serve", "--port", "0", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_serve_fails_at_start_with_one_line_for_a_missing_bucket_or_refused_credentials(s3_store: SeaweedFS) -> None:
    common = ["--size", "1M", "--s3-endpoint", s3_store.endpoint, "--port", "0"]
    for url, env, message in [
        ("s3://no-such-bucket/img", s3_store.env, "bucket 'no-such-bucket' does not exist"),
        (f"s3://{s3_store.bucket}/img", {**s3_store.env, "AWS_SECRET_ACCESS_KEY": "wrong"}, "refused the credentials"),
    ]:
        done = subprocess.run([*CLI, "serve", url, *common], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})  # fmt: skip
        assert done.returncode == 1
        assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_single_object_offers_base_allocation_all_data(s3_store: SeaweedFS, peers: Any) -> None:
    """``nbdinfo --map`` of ``serve s3://BUCKET/KEY`` (one object): one extent, all data (issue 29)."""
    peers("nbdinfo")
    key = new_key()
    body = random.Random(2).randbytes(MIB + 512)
    s3_store.client().put_object(Bucket=s3_store.bucket, Key=key, Body=body)
    proc, uri = serve_s3(s3_store, key)
    try:
        mapped = subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, timeout=60)
        assert mapped.returncode == 0, mapped.stderr
        assert json.loads(mapped.stdout) == [{"offset": 0, "length": len(body), "type": 0, "description": "data"}]
    finally:
        proc.terminate()
        proc.wait(30)


def test_reopening_with_another_object_size_is_refused_at_start_up(s3_store: SeaweedFS) -> None:
    """An image of 64K objects served with --object-size 1M once served every object as damaged (a warning each,
    reads failing); the objects' sizes say which object size made it, and serve refuses with one line."""
    key = new_key()
    with open_image(s3_store, key, 4 * MIB, 64 * KIB) as device:
        device.pwrite(os.urandom(300 * KIB), 0)
        device.pwrite(b"x" * 10, 3 * MIB)
    nbdproto = os.path.join(os.path.dirname(sys.executable), "nbdproto")  # the command pip installed
    done = subprocess.run([nbdproto, "serve", "--port", "0", f"s3://{s3_store.bucket}/{key}", "--s3-endpoint",
                           s3_store.endpoint, "--size", "4M", "--object-size", "1M"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **s3_store.env})  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    assert key in line and "objects of 65536 bytes" in line and "not 1048576" in line, line
    with open_image(s3_store, key, 4 * MIB, 64 * KIB) as same:  # the size it was made with still opens it
        assert read_all(same)[3 * MIB : 3 * MIB + 10] == b"x" * 10


@pytest.mark.timeout(180)
def test_the_store_starts_again_with_new_ports_when_one_was_taken(
    s3_store: SeaweedFS, tmp_path: Any, monkeypatch: Any
) -> None:
    """tests/s3server.py chooses free ports, then weed binds them: a port another process took meanwhile (CI's
    parallel workers connect out from the same range) makes weed exit, and the start is tried again with new
    ports instead of failing every test of the session (it did, once, in CI)."""
    import socket

    import tests.s3server as s3server

    real, chosen = s3server._free_ports, []
    taken = socket.socket()
    taken.bind(("127.0.0.1", real(1)[0]))  # a port weed could have had (its gRPC port, 10000 above, valid)
    taken.listen()

    def first_taken(count: int) -> list[int]:
        ports = real(count)
        if not chosen:  # the volume server's port (the third), taken
            ports[2] = taken.getsockname()[1]
        chosen.append(ports)
        return ports

    monkeypatch.setattr(s3server, "_free_ports", first_taken)
    try:
        store = SeaweedFS.start(str(tmp_path))
    finally:
        taken.close()
    try:
        assert len(chosen) == 2  # the first start failed on its port, the second served
        assert store.client().list_objects_v2(Bucket=store.bucket)["KeyCount"] == 0
    finally:
        store.stop()
