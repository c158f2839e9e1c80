"""A proxy keeps many requests in flight upstream: ``nbdproto serve nbd://...`` on both backends, in front of an
nbdkit python plugin that answers no read until READS of them are in flight at once (it counts the reads that
reach it and lets them all go together). The client sends its reads one at a time, each only once the one before
it reached the remote, so a proxy that waited for a reply before sending the next request would never get there
(the remote would give up after its limit and fail the reads)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

import nbdproto_threads as nt
from tests.conftest import PEER_ENV
from tests.remotes import cli, nbdkit
from tests.serving import make_pki
from tests.threaded import run_threads
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

READS = 8
KIB = 1 << 10
MIB = 1 << 20

# The remote: every read waits until READS reads have arrived (each noted as a line in the ARRIVALS file), at
# most 30 s; a read that waited in vain fails (EIO), naming how many it saw.
PLUGIN = """
import builtins
import contextlib
import subprocess
import threading

import nbdkit

API_VERSION = 2
settings = {}
arrived = 0
changed = threading.Condition()


def config(key, value):
    settings[key] = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return 1 << 20


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    global arrived
    needed = int(settings["needed"])
    with changed:
        arrived += 1
        with builtins.open(settings["arrivals"], "a") as file:
            file.write(f"{offset}\\n")
        changed.notify_all()
        if not changed.wait_for(lambda: arrived >= needed, timeout=30):
            raise RuntimeError(f"only {arrived} of {needed} reads were in flight")
    buf[:] = bytes([offset // 4096]) * len(buf)
"""


def arrivals(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_arrivals(path: Path, count: int, timeout: float = 20.0) -> None:
    """Until the remote has seen ``count`` reads (polled, bounded: the remote's file is the only sign)."""
    wait_until(
        lambda: arrivals(path) >= count, f"read {count} reaching the remote while {count - 1} were unanswered", timeout
    )


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_serve_nbd_sends_reads_upstream_before_the_first_reply(
    backend: str, tls: bool, peers: Any, tmp_path: Path
) -> None:
    """Over TLS too (the proxy's replies then go out through the TLS connection its reading side shares)."""
    peers("nbdkit")
    plugin, log = tmp_path / "counting.py", tmp_path / "arrivals"
    plugin.write_text(PLUGIN)
    with contextlib.ExitStack() as stack:
        pki = stack.enter_context(make_pki()) if tls else None
        certificates = [] if pki is None else ["--tls", "require", "--tls-cert", f"{pki.directory}/server-cert.pem"]
        certificates += [] if pki is None else ["--tls-key", f"{pki.directory}/server-key.pem"]
        upstream, _ = stack.enter_context(nbdkit("python", str(plugin), f"arrivals={log}", f"needed={READS}"))
        proxy = stack.enter_context(cli("serve", upstream, "--port", "0", "--backend", backend, *certificates))
        uri = proxy.uri()
        client = stack.enter_context(
            nt.connect(uri, timeout=60) if pki is None else nt.connect(uri, tls=pki.client_context, timeout=60)
        )
        results: dict[int, bytes | BaseException] = {}

        def read(index: int) -> None:
            try:
                results[index] = client.pread(4 * KIB, index * 4 * KIB)
            except BaseException as exc:  # reported by the assertion below
                results[index] = exc

        readers = [threading.Thread(target=read, args=(index,)) for index in range(READS)]
        for count, reader in enumerate(readers, 1):
            reader.start()
            wait_for_arrivals(log, count)
        for reader in readers:
            reader.join(60)
        assert results == {index: bytes([index]) * 4 * KIB for index in range(READS)}
        assert sorted(int(line) for line in log.read_text().split()) == [index * 4 * KIB for index in range(READS)]
        assert client.pread(4 * KIB, 0) == bytes(4 * KIB)  # the remote answers at once now


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_serve_nbd_answers_every_request_of_sixteen_clients_threads_at_once(backend: str, peers: Any) -> None:
    """Sixteen threads writing and reading back 4 KiB blocks of their own through one proxy connection: every
    request answered with the right data, whichever of the proxy's threads or tasks sends each reply (a reply
    left behind would hang a thread; the test's timeout says so)."""
    peers("nbdkit")
    with (
        nbdkit("memory", "size=16M") as (upstream, _),
        cli("serve", upstream, "--port", "0", "--backend", backend) as proxy,
        nt.connect(proxy.uri(), timeout=60) as client,
    ):

        def work(index: int) -> None:
            for round_ in range(150):
                offset = (index * 150 + round_) * 4 * KIB
                data = bytes([index, round_ % 256]) * 2 * KIB
                client.pwrite(data, offset)
                assert client.pread(4 * KIB, offset) == data

        run_threads(work, 16, timeout=90)  # a reply left behind leaves a thread waiting: a failure, not a hang


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_serve_nbd_keeps_up_with_fio_at_queue_depth_16(backend: str, peers: Any) -> None:
    """fio's nbd engine (libnbd, 16 requests in flight on one connection, random 4 KiB reads and writes)
    through the proxy for two seconds: it finishes, every request answered (a reply left behind leaves fio
    waiting for it forever: it is killed after 60 s and the test fails)."""
    peers("nbdkit", "fio")
    with (
        nbdkit("memory", "size=64M") as (upstream, _),
        cli("serve", upstream, "--port", "0", "--backend", backend) as proxy,
    ):
        command = ["fio", "--name=proxy", "--ioengine=nbd", f"--uri={proxy.uri()}", "--size=64m", "--rw=randrw"]
        command += ["--thread", "--bs=4k", "--iodepth=16", "--runtime=2", "--time_based", "--output-format=terse"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=PEER_ENV)
        except subprocess.TimeoutExpired:
            pytest.fail("fio was still waiting for replies after 60 s")
        assert done.returncode == 0, done.stderr
        fields = done.stdout.strip().splitlines()[-1].split(";")
        assert int(fields[7]) > 0 and int(fields[48]) > 0, done.stdout  # read and write IOPS (terse v3)


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_serve_nbd_passes_large_writes_to_a_slow_remote(backend: str, peers: Any) -> None:
    """Writes of 1 MiB (the largest the proxy does not stream), sixteen in flight, to a remote with two threads
    that takes 50 ms over each: the proxy's sends upstream meet a remote that reads slowly; every byte arrives
    where it was written."""
    peers("nbdkit")
    with (
        nbdkit("-t", "2", "--filter=delay", "memory", "size=64M", "delay-write=50ms") as (upstream, _),
        cli("serve", upstream, "--port", "0", "--backend", backend) as proxy,
        nt.connect(proxy.uri(), timeout=60) as client,
    ):

        def write(index: int) -> None:
            for round_ in range(4):
                client.pwrite(bytes([index, round_]) * (MIB // 2), (index * 4 + round_) * MIB)

        run_threads(write, 16)
        for index in range(16):
            for round_ in range(4):
                assert client.pread(MIB, (index * 4 + round_) * MIB) == bytes([index, round_]) * (MIB // 2)


def test_the_async_proxy_starts_on_its_loop_and_finishes_off_it() -> None:
    """nbdproto_anyio's start of a batch: on the loop when the device takes it without waiting, the rest of its
    send on the starter thread; on the starter thread when it would wait, and every batch after it too while
    the thread has work (so that none overtakes an earlier one)."""
    import anyio

    from nbdproto.serving import StartRequests
    from nbdproto_anyio import _pipelined

    seen: list[tuple[str, object, str]] = []
    release = threading.Event()

    class Device:
        def start_nowait(self, requests: list[Any], costs: list[int]) -> Any:
            if requests == ["busy"]:
                raise BlockingIOError
            seen.append(("loop", requests, threading.current_thread().name))
            return (
                (lambda: seen.append(("rest", requests, threading.current_thread().name)))
                if requests == ["big"]
                else None
            )

        def start(self, requests: list[Any], costs: list[int]) -> None:
            release.wait(10)
            seen.append(("thread", requests, threading.current_thread().name))

    async def main() -> None:
        wake = _pipelined._Wake()
        device = Device()
        starter = _pipelined._Starter(device, wake)  # type: ignore[arg-type]
        try:
            for batch in (["small"], ["big"]):
                _pipelined._start(device, starter, StartRequests(batch, [1]))  # type: ignore[arg-type]
            wait_until(lambda: starter.idle, "the rest of the big send")
            for batch in (["busy"], ["after"]):
                _pipelined._start(device, starter, StartRequests(batch, [1]))  # type: ignore[arg-type]
            assert not starter.idle
            release.set()
            wait_until(lambda: starter.idle, "the starter thread's batches")
        finally:
            starter.stop()
            wake.close()

    anyio.run(main)
    loop = threading.current_thread().name
    assert seen == [
        ("loop", ["small"], loop),
        ("loop", ["big"], loop),
        ("rest", ["big"], "nbd-submit"),
        ("thread", ["busy"], "nbd-submit"),
        ("thread", ["after"], "nbd-submit"),
    ]
