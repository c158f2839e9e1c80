"""One writer per S3 image, on a real store (SeaweedFS): the lease object beside the image, taken with a
conditional PUT and renewed with If-Match. A second writer is refused with the holder named, readers need no
lease, a clean close gives it back, a dead holder's lease is taken over once it expires, and a holder that
cannot renew (a stalled store, a process stopped past its lease) answers EIO to every write from then on and
never overwrites what the new holder wrote. Through the device and through ``nbdproto serve`` processes; no
traceback in any log."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import time
from typing import Any

import pytest

import nbdproto
import nbdproto_threads as nt
from nbdproto.devices import S3Device, S3LeaseHeld, S3Settings
from tests.s3server import SeaweedFS, stall_proxy
from tests.test_s3 import CLI, new_key, read_all
from tests.waiting import wait_until

KIB, MIB = 1 << 10, 1 << 20
pytestmark = pytest.mark.timeout(180)

LEASE, REMOTE_TIMEOUT = 10, 4
"""The servers' lease and remote timeout here: a writer's window after each renewal is 10 - 4 - 1 = 5 s (a
store call may take 2 s a try on a busy machine without failing a test)."""
SERVE = ["--size", "4M", "--object-size", "64K", "--remote-timeout", str(REMOTE_TIMEOUT), "--s3-lease", str(LEASE)]
REFUSED = "leased to another writer"


def lease_of(store: SeaweedFS, key: str) -> dict[str, Any] | None:
    """The lease object's content, or None when there is none."""
    client = store.client()
    try:
        body = client.get_object(Bucket=store.bucket, Key=f"{key}/lease")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    content: dict[str, Any] = json.loads(body)
    return content


def open_image(store: SeaweedFS, key: str, **kw: Any) -> S3Device:
    kw.setdefault("settings", S3Settings(endpoint=store.endpoint))
    return S3Device(store.bucket, key, size=MIB, object_size=64 * KIB, **kw)


def test_a_second_writable_device_is_refused_and_a_reader_is_not(s3_store: SeaweedFS) -> None:
    """The lease names this process and expires a lease's length after its last renewal; a second writable
    device is refused with the holder and the expiry named; a read-only one opens and reads; closing the
    writer deletes the lease, and the next writer opens at once."""
    key = new_key()
    with open_image(s3_store, key) as writer:
        writer.pwrite(b"first writer", 0)
        lease = lease_of(s3_store, key)
        assert lease is not None
        assert lease["holder"]["pid"] == os.getpid() and lease["holder"]["host"] == socket.gethostname()
        assert 0 < lease["expires"] - time.time() <= 60
        with pytest.raises(S3LeaseHeld) as refused:
            open_image(s3_store, key)
        assert refused.value.errno == errno.EBUSY
        message = str(refused.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "until" in message, message
        with open_image(s3_store, key, read_only=True) as reader:
            assert read_all(reader)[:12] == b"first writer"
    assert lease_of(s3_store, key) is None
    with open_image(s3_store, key) as next_writer:
        assert read_all(next_writer)[:12] == b"first writer"


def test_the_lease_is_renewed_with_if_match_well_before_it_expires(s3_store: SeaweedFS) -> None:
    """With an 8 s lease for calls of up to 4 s, the holder rewrites the lease every second (a third of its
    3 s write window): its expiry moves on while the holder writes on."""
    key = new_key()
    settings = S3Settings.within(4, endpoint=s3_store.endpoint)
    with open_image(s3_store, key, settings=settings, lease=8) as writer:
        first = lease_of(s3_store, key)
        assert first is not None

        def renewed() -> bool:
            writer.pwrite(b"x", 0)  # writes go on all the while
            return bool((lease_of(s3_store, key) or {}).get("expires", 0) >= first["expires"] + 1)

        wait_until(renewed, "the lease renewed", timeout=20, every=0.1)


def test_a_lease_too_short_for_the_store_timeout_is_refused(s3_store: SeaweedFS) -> None:
    with pytest.raises(ValueError, match="too short for store calls of up to 30 s"):
        open_image(s3_store, new_key(), lease=20)
    assert open_image(s3_store, new_key(), lease=0).stored_objects == 0  # no lease: nothing asked


def test_an_object_in_the_leases_place_that_is_not_a_lease_is_refused(s3_store: SeaweedFS) -> None:
    key = new_key()
    s3_store.client().put_object(Bucket=s3_store.bucket, Key=f"{key}/lease", Body=b"someone else's")
    with pytest.raises(S3LeaseHeld, match="is not a lease this server can read"):
        open_image(s3_store, key)


def test_a_holder_whose_store_stalls_stops_writing_for_good(
    s3_store: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    """The store stops answering: renewals fail, the write window closes, and from then on every write gets
    EIO at once and says why, even after the store answers again (a writer that lost its lease never writes
    again, since another may have taken over meanwhile)."""
    key = new_key()
    caplog.set_level(logging.WARNING, "nbdproto.devices.s3")
    with stall_proxy(s3_store.endpoint) as proxy:
        settings = S3Settings.within(4, endpoint=proxy.endpoint)
        with open_image(s3_store, key, settings=settings, lease=8) as writer:
            writer.pwrite(b"stored", 0)
            proxy.stalled.set()
            deadline = time.monotonic() + 30
            while True:  # the write window (8 - 4 - 1 = 3 s from the last renewal) closes
                with pytest.raises(OSError) as failed:
                    writer.pwrite(b"lost", 64 * KIB)
                assert failed.value.errno == errno.EIO
                if "no longer holds the image's lease" in str(failed.value):
                    break
                assert time.monotonic() < deadline, failed.value
            proxy.stalled.clear()
            for offset in (0, 128 * KIB):
                started = time.monotonic()
                with pytest.raises(OSError, match="no longer holds the image's lease") as refused:
                    writer.pwrite(b"never", offset)
                assert refused.value.errno == errno.EIO and time.monotonic() - started < 1
    lost = [r.getMessage() for r in caplog.records if "lost the lease" in r.getMessage()]
    assert len(lost) == 1 and ("could not be renewed" in lost[0] or "not renewed in time" in lost[0]), lost
    assert not any(r.exc_info for r in caplog.records)


# --- nbdproto serve ----------------------------------------------------------------------------------------------


class Serving:
    """``nbdproto serve s3://...`` in a subprocess: its process, its URI, and its stderr once it ended."""

    def __init__(self, store: SeaweedFS, key: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [*CLI, "serve", "--port", "0", f"s3://{store.bucket}/{key}", "--s3-endpoint", store.endpoint, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **store.env},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()  # the URI, or EOF when it could not start
        self.uri = line.split()[1] if line.startswith("serving ") else None
        self.err = ""

    def finish(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        _, err = self.process.communicate(timeout=60)
        self.err = err.decode()
        assert "Traceback" not in self.err, self.err
        return self.process.returncode


def writer_when_free(store: SeaweedFS, key: str, within: float, *args: str) -> Serving:
    """A writable server on ``key`` as a failover script starts one: tried again while it is refused for the
    lease (exit 2, the holder named), for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        server = Serving(store, key, *args)
        if server.uri is not None:
            return server
        assert server.finish() == 2 and REFUSED in server.err, server.err
        assert time.monotonic() < deadline, f"still refused after {within} s: {server.err}"
        time.sleep(0.5)  # a retry interval, as a failover script's (the lease's expiry is the state awaited)


def test_a_second_writable_server_exits_2_naming_the_holder_while_read_only_ones_start(s3_store: SeaweedFS) -> None:
    key = new_key()
    holder = Serving(s3_store, key, *SERVE)
    try:
        assert holder.uri is not None, holder.finish()
        with nt.connect(holder.uri) as client:
            client.pwrite(b"the holder's", 0, fua=True)
        started = time.monotonic()
        second = Serving(s3_store, key, *SERVE)
        assert second.uri is None and second.finish() == 2
        assert time.monotonic() - started < 30
        (line,) = second.err.splitlines()
        assert REFUSED in line and f"pid {holder.process.pid} on {socket.gethostname()}" in line, line
        assert re.search(r"until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", line), line
        reader = Serving(s3_store, key, "--size", "4M", "--object-size", "64K", "--read-only")
        assert reader.uri is not None, reader.finish()
        with nt.connect(reader.uri) as client:
            assert client.pread(12, 0) == b"the holder's"
        assert reader.finish() == 0
    finally:
        assert holder.finish() == 0
    assert lease_of(s3_store, key) is None  # a clean exit gave it back: the next writer starts at once
    after = Serving(s3_store, key, *SERVE)
    assert after.uri is not None, after.finish()
    assert after.finish() == 0


def test_after_sigkill_a_new_writer_takes_over_once_the_lease_expires_with_every_flushed_write(
    s3_store: SeaweedFS,
) -> None:
    """The holder (write-back cache) is killed: its lease stays, so writers are refused until it expires, and
    one starts within the lease's length plus a few seconds; it reads every write the dead one had flushed or
    made with FUA."""
    key = new_key()
    holder = Serving(s3_store, key, *SERVE, "--s3-write-back", "1M")
    assert holder.uri is not None, holder.finish()
    rng = random.Random(28)
    model = bytearray(4 * MIB)
    with nt.connect(holder.uri) as client:
        for _ in range(20):
            offset, data = rng.randrange(4 * MIB - 5000), rng.randbytes(rng.randrange(1, 5000))
            client.pwrite(data, offset)
            model[offset : offset + len(data)] = data
        client.flush()
        client.pwrite(b"FUA" * 100, 3 * MIB, fua=True)
        model[3 * MIB : 3 * MIB + 300] = b"FUA" * 100
        killed = time.monotonic()
        holder.process.send_signal(signal.SIGKILL)
        holder.process.wait(30)
    assert lease_of(s3_store, key) is not None
    successor = writer_when_free(s3_store, key, LEASE + 15, *SERVE)
    try:
        assert time.monotonic() - killed < LEASE + 8
        assert successor.uri is not None
        with nt.connect(successor.uri) as client:
            assert client.pread(4 * MIB, 0) == model
            client.pwrite(b"successor", 0, fua=True)
    finally:
        assert successor.finish() == 0


def test_a_holder_stopped_past_its_lease_answers_eio_after_sigcont_and_never_overwrites_the_new_holder(
    s3_store: SeaweedFS,
) -> None:
    """The holder is stopped (SIGSTOP) with a client connected; another server takes the image over once the
    lease expires and writes into the objects the first one wrote. After SIGCONT the first answers EIO to
    every write, says it lost the lease, and the store holds exactly the acknowledged writes: the first
    server's before it stopped, overwritten by the new holder's."""
    key = new_key()
    first = Serving(s3_store, key, *SERVE)
    assert first.uri is not None, first.finish()
    model = bytearray(4 * MIB)
    rng = random.Random(29)
    objects = [rng.randrange(64) for _ in range(12)]
    first_client = nt.connect(first.uri, timeout=60)
    try:
        for index in objects:  # part of each object: read-modify-writes
            offset = index * 64 * KIB + 1000
            first_client.pwrite(b"1" * 3000, offset, fua=True)
            model[offset : offset + 3000] = b"1" * 3000
        first.process.send_signal(signal.SIGSTOP)
        try:
            second = writer_when_free(s3_store, key, LEASE + 15, *SERVE)
            assert second.uri is not None
            with nt.connect(second.uri) as client:
                for index in objects[::2]:
                    offset = index * 64 * KIB + 2000
                    client.pwrite(b"2" * 3000, offset, fua=True)
                    model[offset : offset + 3000] = b"2" * 3000
        finally:
            first.process.send_signal(signal.SIGCONT)
        for index in [*objects, 63]:  # the new holder's objects, the first's, and the last one
            offset = index * 64 * KIB + 7
            with pytest.raises(nbdproto.NBDError) as refused:
                first_client.pwrite(b"3" * 5000, offset, fua=True)
            assert refused.value.errno == errno.EIO
        with pytest.raises(nbdproto.NBDError):
            first_client.trim(64 * KIB, 64 * KIB)
        assert first_client.pread(3000, objects[0] * 64 * KIB + 1000) is not None  # reads go on
    finally:
        first_client.close()
    with nt.connect(second.uri) as client:
        assert client.pread(4 * MIB, 0) == model
    assert second.finish() == 0
    assert first.finish() == 0
    assert "lost the lease" in first.err and first.err.count("lost the lease") == 1, first.err
    with S3Device(
        s3_store.bucket, key, size=4 * MIB, object_size=64 * KIB, read_only=True,
        settings=S3Settings(endpoint=s3_store.endpoint),
    ) as image:  # fmt: skip
        assert read_all(image) == model


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["s3://b/k", "--s3-lease", "30"], "--s3-lease needs --size"),
        (["s3://b/k", "--size", "1M", "--s3-lease", "0"], "--s3-lease 0 must be positive"),
    ],
)
def test_bad_lease_arguments_are_one_line_usage_errors(args: list[str], message: str) -> None:
    done = subprocess.run([*CLI, "serve", "--port", "0", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1  # a usage error, as nbdkit's
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_lease_too_short_for_the_remote_timeout_is_one_line(s3_store: SeaweedFS) -> None:
    server = Serving(s3_store, new_key(), "--size", "1M", "--s3-lease", "10")
    assert server.uri is None and server.finish() == 1  # a usage error (a held lease is 2)
    assert "too short for store calls of up to 30 s" in server.err and server.err.count("\n") == 1, server.err
