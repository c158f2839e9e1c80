"""A bitmap never under-reports after a crash: random writes, zeroes and trims from several connections to
``nbdproto serve --bitmap``, SIGKILL of the server at a random moment, a restart, and then every granule that
an acknowledged request touched, and every granule where the image now differs from a copy taken when the
bitmap started, is dirty; and nothing is dirty that no request sent could have touched (the over-report is
bounded by the requests in flight). For an image file (sidecar) and an S3 image (objects), on both backends.

Rounds: NBDPROTO_CRASH_ROUNDS (default 8 for files, half that for S3).
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbdproto_threads as nt
from nbdproto.devices import S3Device, S3Settings
from tests.remotes import Cli
from tests.s3server import SeaweedFS
from tests.test_s3 import new_key

pytestmark = pytest.mark.timeout(600)
KIB, MIB = 1 << 10, 1 << 20
ROUNDS = int(os.environ.get("NBDPROTO_CRASH_ROUNDS", "8"))
CONTEXT = "qemu:dirty-bitmap:b"

Operation = tuple[str, int, int]


def operations(size: int) -> st.SearchStrategy[list[Operation]]:
    one = st.tuples(
        st.sampled_from(("write", "write", "zero", "trim")), st.integers(0, size - 1), st.integers(1, 256 * KIB)
    ).map(lambda op: (op[0], op[1], min(op[2], size - op[1])))
    return st.lists(one, min_size=1, max_size=40)


class Requests:
    """What the clients sent and what was acknowledged, with a wait for the count of acknowledgements."""

    def __init__(self) -> None:
        self.sent: list[Operation] = []
        self.acked: list[Operation] = []
        self.changed = threading.Condition()

    def wait_for_acks(self, count: int, done: Callable[[], bool], timeout: float = 60.0) -> None:
        """Until ``count`` requests were acknowledged, or ``done()`` (every client has finished)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.acked) < count and not done():
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.acked)} of {count} requests acknowledged in {timeout} s"
                self.changed.wait(min(left, 0.5))


def run_client(uri: str, ops: list[Operation], number: int, requests: Requests) -> None:
    try:
        with nt.connect(uri, timeout=20) as client:
            for index, (kind, offset, length) in enumerate(ops):
                with requests.changed:
                    requests.sent.append((kind, offset, length))
                if kind == "write":
                    client.pwrite(bytes([(number * 41 + index) % 255 + 1]) * length, offset)
                elif kind == "zero":
                    client.zero(length, offset)
                else:
                    client.trim(length, offset)
                with requests.changed:
                    requests.acked.append((kind, offset, length))
                    requests.changed.notify_all()
    except Exception:  # the server was killed under it: what was acknowledged is what counts
        pass
    finally:
        with requests.changed:
            requests.changed.notify_all()


def granules(ops: list[Operation], granularity: int) -> set[int]:
    out: set[int] = set()
    for _, offset, length in ops:
        out.update(range(offset // granularity, (offset + length - 1) // granularity + 1))
    return out


def differing(before: bytes, after: bytes, granularity: int) -> set[int]:
    return {g for g in range(-(-len(before) // granularity)) if before[g * granularity : (g + 1) * granularity]
            != after[g * granularity : (g + 1) * granularity]}  # fmt: skip


def dirty_granules(uri: str, granularity: int) -> set[int]:
    with nt.connect(uri, meta_contexts=[CONTEXT], timeout=20) as client:
        runs = client.block_status(client.size, 0, context=CONTEXT)
    out, position = set(), 0
    for extent in runs:
        if extent.status:
            out |= set(range(position // granularity, (position + extent.length - 1) // granularity + 1))
        position += extent.length
    assert position == client.size
    return out


@contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[Cli]:
    server = Cli("serve", "--port", "0", *args, env=env)
    try:
        yield server
    finally:
        server.close()


@contextmanager
def restarted(args: list[str], env: dict[str, str] | None) -> Iterator[Cli]:
    """The server started again on the image of the one killed. An S3 image stays leased to the dead server
    until its lease expires (a short one here, --s3-lease): until then serve refuses to start (exit 2, naming
    the holder), and it is started again until it starts, for that long at most."""
    deadline = time.monotonic() + _LEASE + 30
    while True:
        server = Cli("serve", "--port", "0", *args, env=env)
        try:
            server.uri()
        except AssertionError:
            server.close()
            if not any("leased to another writer" in line for line in server.err) or time.monotonic() > deadline:
                raise
            continue
        try:
            yield server
        finally:
            server.close()
        return


def crash_round(
    data: Any, size: int, serve_args: list[str], read_image: Callable[[], bytes], env: dict[str, str] | None = None
) -> None:
    """One round: the server started with a new bitmap, clients, SIGKILL at a random moment, a restart, the
    checks of the module docstring."""
    granularity = data.draw(st.sampled_from((4 * KIB, 64 * KIB)), label="granularity")
    backend = data.draw(st.sampled_from(("threads", "anyio")), label="backend")
    clients = data.draw(st.lists(operations(size), min_size=1, max_size=4), label="clients")
    total = sum(len(ops) for ops in clients)
    kill_after = data.draw(st.integers(0, total), label="kill after this many acknowledged requests")
    before = read_image()
    requests = Requests()
    args = [*serve_args, "--backend", backend, "--bitmap", f"b:{granularity}"]
    with serving(*args, env=env) as server:
        uri = server.uri()
        threads = [
            threading.Thread(target=run_client, args=(uri, ops, number, requests), daemon=True)
            for number, ops in enumerate(clients)
        ]
        for thread in threads:
            thread.start()
        requests.wait_for_acks(kill_after, lambda: not any(t.is_alive() for t in threads))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive()
    after = read_image()
    with restarted(args, env) as server:
        dirty = dirty_granules(server.uri(), granularity)
        server.stop()
    assert granules(requests.acked, granularity) <= dirty, "an acknowledged request's granule is clean"
    assert differing(before, after, granularity) <= dirty, "a granule that changed is clean"
    assert dirty <= granules(requests.sent, granularity), "a granule no request touched is dirty"


_LEASE = 6  # seconds: a killed server's S3 image is taken over this long after its last renewal


@settings(max_examples=ROUNDS, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_file_bitmap_never_under_reports_after_sigkill(data: Any) -> None:
    size = 8 * MIB
    with tempfile.TemporaryDirectory(prefix="nbdproto-crash-") as tmp:
        image = os.path.join(tmp, "disk.img")
        contents = random.Random(data.draw(st.integers(0, 1 << 30), label="contents")).randbytes(size)
        with open(image, "wb") as f:
            f.write(contents)

        def read_image() -> bytes:
            with open(image, "rb") as f:
                return f.read()

        crash_round(data, size, [image], read_image)


@settings(max_examples=max(1, ROUNDS // 2), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_s3_bitmap_never_under_reports_after_sigkill(s3_store: SeaweedFS, data: Any) -> None:
    size, key = 4 * MIB, new_key()
    settings_ = S3Settings(endpoint=s3_store.endpoint)

    def read_image() -> bytes:  # read-only: the image may still be leased to a server that was killed
        with S3Device(
            s3_store.bucket, key, size=size, object_size=64 * KIB, settings=settings_, read_only=True
        ) as device:
            buffer = bytearray(size)
            device.pread_into(memoryview(buffer), 0)
            return bytes(buffer)

    with S3Device(s3_store.bucket, key, size=size, object_size=64 * KIB, settings=settings_) as device:
        device.pwrite(b"\x77" * (MIB + 1000), 500 * KIB)  # something for zeroes and trims to change
    serve_args = [f"s3://{s3_store.bucket}/{key}", "--size", "4M", "--object-size", "64K",
                  "--s3-endpoint", s3_store.endpoint, "--remote-timeout", "3", "--s3-lease", str(_LEASE)]  # fmt: skip
    crash_round(data, size, serve_args, read_image, s3_store.env)
