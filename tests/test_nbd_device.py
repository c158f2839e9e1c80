"""NbdDevice, and ``nbdproto serve nbd://...`` in front of nbdkit and qemu-nbd: the real clients (nbdinfo,
nbdcopy, qemu-io, qemu-img, nbdsh) see through the proxy what they see at the remote; every capability and
every meta context comes through; a remote that dies costs the requests in flight (EIO) and is reconnected.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto
import nbdproto.serving
from nbdproto.devices import NbdDevice
from tests.hostile_server import CONTENT, SIZE, Case, Parts, good_read, serve_case
from tests.remotes import CLI, cli, free_port, nbdkit, qemu_nbd, serving_on_socket, stopped
from tests.serving import BACKENDS, Export, make_pki, serve_exports
from tests.test_interop_server import NBDSH_EVERY_COMMAND, nbdsh, run, sha256
from tests.threaded import run_threads
from tests.waiting import wait_until

MIB = 1 << 20
pytestmark = pytest.mark.timeout(120)

REMOTES = ("nbdkit", "qemu-nbd")
DEFAULT_BLOCK_SIZES = {"block_size_minimum": 1, "block_size_preferred": 4096, "block_size_maximum": 32 * MIB}


@contextlib.contextmanager
def remote(kind: str, tmp_path: Any, size: int = 8 * MIB) -> Iterator[str]:
    """A writable remote export of ``size`` bytes: nbdkit's memory plugin, or qemu-nbd on a raw file."""
    if kind == "nbdkit":
        with nbdkit("memory", f"size={size}") as (uri, _):
            yield uri
    else:
        image = tmp_path / "remote.img"
        with open(image, "wb") as f:
            f.truncate(size)
        with qemu_nbd(str(image)) as uri:
            yield uri


@contextlib.contextmanager
def proxy(uri: str) -> Iterator[str]:
    """``nbdproto serve URI`` on a free port; yields the proxy's URI."""
    with cli("serve", uri, "--port", "0") as process:
        yield process.uri()
        assert process.stop() == 0


def info(uri: str) -> dict[str, Any]:
    document = json.loads(run("nbdinfo", "--json", uri).stdout)
    export: dict[str, Any] = document["exports"][0]
    export["structured"] = document["structured"]
    return export


CAPABILITY_KEYS = (
    "is_read_only", "is_rotational", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
    "can_df", "content", "structured",
    "can_multi_conn", "export-size", "block_size_minimum", "block_size_preferred", "block_size_maximum",
)  # fmt: skip


@pytest.mark.parametrize("kind", REMOTES)
def test_proxy_shows_the_remotes_capabilities_and_block_sizes(kind: str, peers: Any, tmp_path: Any) -> None:
    peers("nbdkit", "qemu-nbd", "nbdinfo")
    with remote(kind, tmp_path) as uri, proxy(uri) as proxied:
        theirs, ours = info(uri), info(proxied)
    for key in CAPABILITY_KEYS:
        if key.startswith("block_size") and key not in theirs:
            # A remote that gives no block sizes is served with the ones a client assumes without them.
            assert ours[key] == DEFAULT_BLOCK_SIZES[key], key
        else:
            assert ours.get(key) == theirs.get(key), key
    assert ours["contexts"] == theirs["contexts"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_remote_stays_read_only_on_every_backend(backend: str, peers: Any, tmp_path: Any) -> None:
    peers("nbdkit", "nbdinfo", "nbdcopy")
    out = str(tmp_path / "pattern.img")
    with nbdkit("-r", "pattern", "size=4M") as (uri, _):
        device = NbdDevice(uri)
        assert not device.capabilities.can_write
        with pytest.raises(OSError) as refused:
            device.pwrite(b"x", 0)
        assert refused.value.errno == errno.EROFS  # what every device says; servers send EPERM
        with serve_exports(backend, {"p": Export(device, read_only=False)}) as base:
            ours = info(base.format("p"))
            run("nbdcopy", base.format("p"), out)
        device.close()
    assert ours["is_read_only"] is True
    with open(out, "rb") as f:  # nbdkit's pattern: each 8-byte word is its own offset
        data = f.read()
    assert [int.from_bytes(data[i : i + 8], "big") for i in (0, 8, 4 * MIB - 8)] == [0, 8, 4 * MIB - 8]


def test_every_meta_context_of_qemu_nbd_comes_through(peers: Any, tmp_path: Any) -> None:
    """qemu-nbd with a dirty bitmap and allocation depth: the proxy offers all three contexts and maps each as
    the remote does."""
    peers("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo")
    image = str(tmp_path / "q.qcow2")
    run("qemu-img", "create", "-f", "qcow2", image, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 1M", image)
    run("qemu-img", "bitmap", "--add", image, "dirty")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 3M 64K", "-c", "write -z 5M 1M", image)
    with qemu_nbd(image, "-A", "-B", "dirty", image_format="qcow2") as uri:
        device = NbdDevice(uri)
        contexts = ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:dirty")
        assert device.meta_context_names == contexts
        assert device.capabilities.meta_contexts == contexts
        device.close()
        with proxy(uri) as proxied:
            assert sorted(info(proxied)["contexts"]) == sorted(info(uri)["contexts"])
            for context in contexts:
                theirs = json.loads(run("nbdinfo", "--json", f"--map={context}", uri).stdout)
                ours = json.loads(run("nbdinfo", "--json", f"--map={context}", proxied).stdout)
                assert ours == theirs, context
            dirty = json.loads(run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:dirty", proxied).stdout)
            assert {(m["offset"], m["length"]) for m in dirty if m["type"] == 1} == {
                (3 * MIB, 64 << 10),
                (5 * MIB, MIB),
            }


@pytest.mark.parametrize("kind", REMOTES)
def test_nbdcopy_round_trip_through_the_proxy(kind: str, peers: Any, tmp_path: Any) -> None:
    peers("nbdkit", "qemu-nbd", "nbdcopy")
    src, out = str(tmp_path / "src.img"), str(tmp_path / "out.img")
    with open(src, "wb") as f:
        f.write(os.urandom(6 * MIB))
        f.truncate(8 * MIB)
    with remote(kind, tmp_path) as uri, proxy(uri) as proxied:
        run("nbdcopy", "--connections=4", src, proxied)
        run("nbdcopy", proxied, out)
        map_ours = json.loads(run("nbdinfo", "--json", "--map", proxied).stdout)
        map_theirs = json.loads(run("nbdinfo", "--json", "--map", uri).stdout)
    assert sha256(src) == sha256(out)
    assert map_ours == map_theirs


@pytest.mark.parametrize("kind", REMOTES)
def test_qemu_io_and_qemu_img_through_the_proxy(kind: str, peers: Any, tmp_path: Any) -> None:
    peers("nbdkit", "qemu-nbd", "qemu-io", "qemu-img")
    src = str(tmp_path / "src.img")
    with open(src, "wb") as f:
        f.write(os.urandom(8 * MIB))
    with remote(kind, tmp_path) as uri, proxy(uri) as proxied:
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, proxied)
        assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, proxied).stdout
        io = run(
            "qemu-io", "-f", "raw",
            "-c", "write -P 0xab 1M 2M",
            "-c", "read -P 0xab 1M 2M",
            "-c", "write -z 4M 1M",
            "-c", "read -P 0 4M 1M",
            "-c", "discard 6M 1M",
            "-c", "flush",
            proxied,
        )  # fmt: skip
        assert "Pattern verification failed" not in io.stdout + io.stderr
        # What the proxy's clients wrote is what the remote holds.
        assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, proxied).stdout
        check = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 2M", "-c", "read -P 0 4M 1M", uri)
        assert "Pattern verification failed" not in check.stdout + check.stderr


@pytest.mark.parametrize("kind", REMOTES)
def test_nbdsh_every_command_through_the_proxy(kind: str, peers: Any, tmp_path: Any) -> None:
    peers("nbdkit", "qemu-nbd", "nbdsh")
    with remote(kind, tmp_path) as uri, proxy(uri) as proxied:
        result = nbdsh(proxied, NBDSH_EVERY_COMMAND)
    assert "all commands ok" in result.stdout


def test_multi_conn_remote_gets_several_connections_that_see_each_other(peers: Any, tmp_path: Any) -> None:
    peers("nbdkit", "qemu-nbd")
    with nbdkit("memory", "size=8M") as (uri, _):
        device = NbdDevice(uri, connections=3)
        assert device.capabilities.can_multi_conn and device.connections == 3
        for i in range(12):  # requests go round the connections: each write is read back on another
            device.pwrite(bytes([i]) * 4096, i * 4096)
            buffer = bytearray(4096)
            device.pread_into(memoryview(buffer), i * 4096)
            assert buffer == bytes([i]) * 4096
        device.close()
    image = tmp_path / "one.img"
    image.write_bytes(bytes(MIB))
    with qemu_nbd(str(image), shared=1) as uri:  # qemu-nbd for one client does not promise multi-conn
        device = NbdDevice(uri, connections=3)
        assert not device.capabilities.can_multi_conn and device.connections == 1
        device.close()


def test_remote_errors_pass_through_with_their_errno(peers: Any) -> None:
    peers("nbdkit")
    with nbdkit("--filter=error", "memory", "size=1M", "error=ENOSPC", "error-pwrite-rate=1") as (uri, _):
        device = NbdDevice(uri)
        with pytest.raises(OSError) as failed:
            device.pwrite(b"x", 0)
        assert failed.value.errno == errno.ENOSPC
        buffer = bytearray(8)
        device.pread_into(memoryview(buffer), 0)  # the connection is fine
        with pytest.raises(OSError) as past_end:
            device.pread_into(memoryview(buffer), MIB)
        assert past_end.value.errno == errno.EINVAL
        device.close()


def test_unknown_export_and_unreachable_server(peers: Any, tmp_path: Any) -> None:
    peers("qemu-nbd")
    image = tmp_path / "x.img"
    image.write_bytes(bytes(MIB))
    with qemu_nbd(str(image), "-x", "disk") as uri:
        with pytest.raises(nbdproto.ProtocolError, match="nope"):
            NbdDevice(uri + "nope")
        NbdDevice(uri + "disk").close()
    with pytest.raises(ConnectionRefusedError):
        NbdDevice(f"nbd://127.0.0.1:{free_port()}/")


def test_tls_remote_with_certificates_from_the_uri(peers: Any) -> None:
    peers("nbdkit", "nbdinfo")
    with (
        make_pki() as pki,
        nbdkit("--tls=require", f"--tls-certificates={pki.directory}", "memory", "size=2M") as (uri, _),
    ):
        tls_uri = uri.replace("nbd://", "nbds://") + f"?tls-certificates={pki.directory}"
        device = NbdDevice(tls_uri)
        device.pwrite(b"secret", 100)
        buffer = bytearray(6)
        device.pread_into(memoryview(buffer), 100)
        assert buffer == b"secret"
        device.close()
        with proxy(tls_uri) as proxied:  # a plaintext proxy in front of a TLS-only server
            assert info(proxied)["export-size"] == 2 * MIB


def test_remote_that_dies_fails_the_request_in_flight_then_reconnects(peers: Any, tmp_path: Any) -> None:
    """nbdkit (file plugin, so the data outlives it) is killed while a read waits in its delay filter: that read
    gets EIO; while it is down, requests fail quickly after the bounded retries; once it is back, the next
    request reconnects and succeeds."""
    peers("nbdkit")
    image = tmp_path / "data.img"
    image.write_bytes(b"persistent" + bytes(MIB - 10))
    log = tmp_path / "nbdkit.log"
    port = free_port()
    args = ("--filter=log", "--filter=delay", "file", str(image), f"logfile={log}", "delay-read=30")
    with nbdkit(*args, port=port) as (uri, proc):
        device = NbdDevice(uri, retries=2, retry_delay=0.05)
        failures: list[BaseException] = []

        def slow_read() -> None:
            try:
                device.pread_into(memoryview(bytearray(10)), 0)
            except BaseException as exc:
                failures.append(exc)

        reader = threading.Thread(target=slow_read)
        reader.start()
        wait_until(lambda: log.exists() and "Read id=" in log.read_text(), "the read reaching nbdkit (its log)")
        proc.send_signal(signal.SIGKILL)
        reader.join(15)
        assert not reader.is_alive()
        (failure,) = failures
        assert isinstance(failure, OSError) and failure.errno == errno.EIO
        # Every other connection of the device sees the remote's end of stream (checked without blocking).
        wait_until(
            lambda: not any(slot.wire is not None and slot.wire.usable for slot in device._slots),
            "the device's idle connections seeing the remote go",
        )
    started = time.monotonic()
    with pytest.raises(OSError) as down:
        device.pread_into(memoryview(bytearray(10)), 0)
    assert down.value.errno == errno.EIO and "cannot reconnect" in str(down.value)
    assert time.monotonic() - started < 5, "the retries are bounded"
    with nbdkit("file", str(image), port=port):
        buffer = bytearray(10)
        device.pread_into(memoryview(buffer), 0)
        assert buffer == b"persistent"
        device.pwrite(b"again", 20, fua=True)
        device.close()
    assert image.read_bytes()[20:25] == b"again"


def test_serve_nbd_uri_with_a_bad_remote_is_a_usage_error(peers: Any) -> None:
    for uri, message in [
        (f"nbd://127.0.0.1:{free_port()}/", "Connection refused"),
        ("nbd+unix:///disk", "needs a socket= query parameter"),
    ]:
        result = subprocess.run([*CLI, "serve", uri, "--port", "0"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and not result.stdout


def test_unix_socket_remote(peers: Any, tmp_path: Any) -> None:
    peers("nbdkit")
    sock = str(tmp_path / "nbdkit.sock")
    with serving_on_socket(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "memory", "size=1M"], sock, "nbdkit"):
        device = NbdDevice(f"nbd+unix:///?socket={sock}")
        device.pwrite(b"unix", 0)
        buffer = bytearray(4)
        device.pread_into(memoryview(buffer), 0)
        assert buffer == b"unix" and device.size == MIB
        device.close()


def test_call_batch_pipelines_and_reports_each_result(peers: Any) -> None:
    """Every call of a batch gets its own result: values, the remote's errors, range errors, emulations."""
    peers("nbdkit")
    from nbdproto import DeviceCall

    with nbdkit("memory", "size=1M") as (uri, _):
        device = NbdDevice(uri)
        buffers = [memoryview(bytearray(4096)) for _ in range(3)]
        results = device.call_batch(
            [
                DeviceCall("pwrite", (b"a" * 4096, 0, False)),
                DeviceCall("pwrite", (b"b" * 4096, 4096, True)),
                DeviceCall("write_zeroes", (8192, 4096), {"may_trim": False, "fast": False, "fua": False}),
                DeviceCall("pread_into", (buffers[0], MIB)),  # past the end
                DeviceCall("flush", ()),
                DeviceCall("cache", (0, 8192)),
                DeviceCall("extents", ("base:allocation", 0, 65536)),
            ]
        )
        assert results[:3] == [None, None, None]
        assert isinstance(results[3], OSError) and results[3].errno == errno.EINVAL
        assert results[4:6] == [None, None]
        assert isinstance(results[6], list) and sum(length for length, _ in results[6]) == 65536
        reads = device.call_batch([DeviceCall("pread_into", (buffers[i], i * 4096)) for i in range(3)])
        assert reads == [None] * 3
        assert [bytes(b[:1]) for b in buffers] == [b"a", b"b", b"\0"]
        device.close()
    with nbdkit("--filter=error", "memory", "size=1M", "error=ENOSPC", "error-pwrite-rate=1") as (uri, _):
        device = NbdDevice(uri)
        (failed,) = device.call_batch([DeviceCall("pwrite", (b"x", 0, False))])
        assert isinstance(failed, OSError) and failed.errno == errno.ENOSPC
        device.close()


def test_carry_out_all_hands_the_whole_batch_to_call_batch() -> None:
    calls_seen: list[list[Any]] = []

    class Batching:
        def call_batch(self, calls: Any) -> list[object]:
            calls_seen.append([call.method for call in calls])
            return [OSError(errno.ENOSPC, "full") if call.method == "pwrite" else None for call in calls]

    requests = [
        nbdproto.ReadRequest(1, 0, 10),
        nbdproto.WriteRequest(2, 0, b"x"),
        nbdproto.FlushRequest(3),
    ]
    replies = nbdproto.serving.carry_out_all(Batching(), requests, {})
    assert calls_seen == [["pread_into", "pwrite", "flush"]]
    assert [type(r).__name__ for r in replies] == ["ReadData", "ErrorReply", "SuccessReply"]
    assert replies[1].error == nbdproto.Errno.ENOSPC  # type: ignore[union-attr]


def test_many_threads_share_one_connection(peers: Any, tmp_path: Any) -> None:
    """Leader/follower on one wire: eight threads with requests in flight together, each reading back its own
    writes, and batches mixed in."""
    peers("qemu-nbd")
    from nbdproto import DeviceCall

    image = tmp_path / "shared.img"
    image.write_bytes(bytes(4 * MIB))
    with qemu_nbd(str(image), shared=1) as uri:
        device = NbdDevice(uri)
        assert device.connections == 1

        def worker(n: int) -> None:
            base = n * 512 * 1024
            for i in range(60):
                data = bytes([n * 16 + i % 16]) * 4096
                offset = base + (i % 64) * 4096
                if i % 3:
                    device.pwrite(data, offset)
                else:
                    assert device.call_batch([DeviceCall("pwrite", (data, offset, False))]) == [None]
                buffer = bytearray(4096)
                device.pread_into(memoryview(buffer), offset)
                assert buffer == data, (n, i)

        try:
            run_threads(worker, 8)
        finally:
            device.close()


class _Results:
    """The Completions of a test: every result by token, and an event once ``count`` are in."""

    def __init__(self, count: int) -> None:
        self.results: dict[Any, object] = {}
        self.count = count
        self.done = threading.Event()

    def complete(self, token: Any, result: object) -> None:
        self.results[token] = result

    def completed(self) -> None:
        if len(self.results) >= self.count:
            self.done.set()


def test_submit_nowait_starts_what_needs_no_wait_and_refuses_the_rest_untouched(peers: Any) -> None:
    """An event loop's start: single requests go out at once, their results as ``submit``'s; a batch with a call
    that is not one request (block status, a call carried out here) raises BlockingIOError with nothing started
    or reported; a range error is the call's result; a write larger than the socket takes at once leaves a
    callable that sends the rest, after which its reply comes."""
    peers("nbdkit")
    from nbdproto import DeviceCall

    with nbdkit("memory", "size=64M") as (uri, _):
        device = NbdDevice(uri, connections=1)
        try:
            buffer = memoryview(bytearray(4096))
            sink = _Results(3)
            calls = [
                DeviceCall("pwrite", (b"a" * 4096, 0, False)),
                DeviceCall("pread_into", (buffer, 64 * MIB)),  # past the end
                DeviceCall("flush", ()),
            ]
            assert device.submit_nowait(calls, ["w", "r", "f"], sink) is None
            assert sink.done.wait(10)
            assert sink.results["w"] is None and sink.results["f"] is None
            assert isinstance(sink.results["r"], OSError) and sink.results["r"].errno == errno.EINVAL

            untouched = _Results(1)
            for call in (
                DeviceCall("extents", ("base:allocation", 0, 4096)),
                DeviceCall("resize", (MIB,)),  # not a request the remote takes: carried out here
            ):
                with pytest.raises(BlockingIOError):
                    device.submit_nowait([DeviceCall("pread_into", (buffer, 0)), call], ["a", "b"], untouched)
            assert untouched.results == {}

            big = os.urandom(24 * MIB)  # more than a loopback socket's buffer takes without waiting
            sink = _Results(1)
            rest = device.submit_nowait([DeviceCall("pwrite", (big, 4096, False))], ["big"], sink)
            assert rest is not None
            with pytest.raises(BlockingIOError):  # the connection is still sending: nothing more starts here
                device.submit_nowait([DeviceCall("pread_into", (buffer, 0))], ["x"], _Results(1))
            rest()
            assert sink.done.wait(20) and sink.results == {"big": None}
            back = memoryview(bytearray(24 * MIB))
            assert device.call_batch([DeviceCall("pread_into", (back, 4096))]) == [None]
            assert back == big
            assert device.call_batch([DeviceCall("pread_into", (buffer, 0))]) == [None] and bytes(buffer) == b"a" * 4096
        finally:
            device.close()


def test_a_pipeline_on_a_device_without_submit_nowait_starts_nothing_on_the_loop() -> None:
    class Submitting:
        def submit(self, calls: Any, tokens: Any, completions: Any) -> None:
            raise AssertionError("start_nowait must not fall back to submit")

    pipeline = nbdproto.serving.Pipeline(Submitting(), {}, None, lambda: None)
    with pytest.raises(BlockingIOError):
        pipeline.start_nowait([nbdproto.ReadRequest(1, 0, 10)], [10])
    assert pipeline.replies() == ([], 0)


def test_submit_nowait_on_a_connection_that_broke_fails_its_requests_and_the_next_reconnect(peers: Any) -> None:
    """A send that fails at once (the connection is shut for writing) fails the requests it carried, through
    their results, not an exception on the loop; the next ``submit`` makes a new connection. (The remote is
    stopped meanwhile, so that it does not close the connection first: then nothing would be sent at all.)"""
    peers("nbdkit")
    from nbdproto import DeviceCall

    with nbdkit("memory", "size=1M") as (uri, proc):
        device = NbdDevice(uri, connections=1)
        try:
            wire = device._slots[0].wire
            assert wire is not None
            buffer = memoryview(bytearray(512))
            sink = _Results(1)
            with stopped(proc):
                wire.sock.shutdown(socket.SHUT_WR)
                assert device.submit_nowait([DeviceCall("pwrite", (b"x" * 512, 0, False))], ["w"], sink) is None
                assert sink.done.wait(10)
                assert isinstance(sink.results["w"], OSError) and sink.results["w"].errno == errno.EIO
                with pytest.raises(BlockingIOError):  # the broken connection is not used again here
                    device.submit_nowait([DeviceCall("pread_into", (buffer, 0))], ["r"], _Results(1))
            assert device.call_batch([DeviceCall("pread_into", (buffer, 0))]) == [None]  # reconnected
        finally:
            device.close()


def test_a_client_connections_small_requests_stay_on_one_connection_and_big_ones_spread(peers: Any) -> None:
    """Pipelines (one per client connection of a proxy) get lanes in turn; NbdDevice sends a pipeline's batches
    of less than SPREAD_AT bytes on its lane's connection, so that one reader thread answers a client's burst,
    and bigger batches, and those of submitters without a lane, on each connection in turn."""
    peers("nbdkit")
    from nbdproto.devices._nbdrequests import SPREAD_AT

    with nbdkit("memory", "size=8M") as (uri, _):
        device = NbdDevice(uri, connections=4)
        try:
            used: list[int] = []
            for index, slot in enumerate(device._slots):
                wire = slot.wire
                assert wire is not None
                original = wire.submit

                def submit(*args: Any, _original: Any = original, _index: int = index) -> None:
                    used.append(_index)
                    _original(*args)

                wire.submit = submit  # type: ignore[method-assign]
            first, second = (nbdproto.serving.Pipeline(device, {}, None, lambda: None) for _ in range(2))
            assert second.lane == first.lane + 1

            def read(pipeline: Any, cookie: int, length: int) -> None:
                pipeline.start([nbdproto.ReadRequest(cookie, 0, length)], [length])
                wait_until(lambda: pipeline.replies()[0] or None, "the read's reply")

            for cookie in range(8):
                read(first if cookie % 2 else second, cookie, 4096)
            assert used[1::2] == [first.lane % 4] * 4 and used[0::2] == [second.lane % 4] * 4
            used.clear()
            for cookie in range(8):
                read(first, cookie, SPREAD_AT)
            assert sorted(used) == [0, 0, 1, 1, 2, 2, 3, 3]  # in turn
            used.clear()
            for offset in range(0, 8 * 4096, 4096):  # call_batch has no lane: in turn
                device.call_batch([nbdproto.serving.DeviceCall("pread_into", (memoryview(bytearray(4096)), offset))])
            assert sorted(used) == [0, 0, 1, 1, 2, 2, 3, 3]
        finally:
            device.close()


def test_a_read_reply_that_arrives_in_parts_is_received_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader thread waits for the rest of a read's payload with one receive (MSG_WAITALL), not one for each
    part that arrives: a 256 KiB reply came in as several receives, each a hand-over of the interpreter lock and
    a turn of the reader's loop (nbdcopy through a proxy: bench/bench_proxy.sh). Here the remote sends its reply
    in four parts, 0.2 s apart: the payload after the first part is taken in one receive."""
    counts: list[int] = []
    real = nbdproto.ClientConnection.received_into

    def counted(engine: Any, count: int) -> None:
        counts.append(count)
        real(engine, count)

    monkeypatch.setattr(nbdproto.ClientConnection, "received_into", counted)
    case = Case("parts", None, read=lambda wire, request: Parts(good_read(wire, request)))
    with serve_case(case) as uri:
        device = NbdDevice(uri, connections=1, timeout=30)
        try:
            buffer = memoryview(bytearray(SIZE))
            assert device.call_batch([nbdproto.DeviceCall("pread_into", (buffer, 0))]) == [None]
            assert buffer == CONTENT
        finally:
            device.close()
    assert len(counts) == 1 and counts[0] > SIZE // 2, counts


@pytest.mark.parametrize(("count", "size", "most"), [(8, 72 << 10, 12), (32, 4096, 8)])
def test_replies_after_a_read_payload_are_taken_in_the_same_turn(
    count: int, size: int, most: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the payload of a read bigger than a receive is in, the reader thread takes what has arrived after it
    (the next reply's header, at most AFTER_PAYLOAD bytes) in the same turn, without waiting: each big read in a
    burst was two turns of the reader's loop (locks, a pass of the engine, a hand-over), the header's and the
    payload's (bench/bench_proxy.sh, nbdcopy through a proxy). Here the remote sends eight replies of 72 KiB
    (each payload received in place) with one send: a receive each, and the first, where it took 17. Small
    replies keep their receives of RECV_SIZE, dozens each: a burst of 32 replies of 4 KiB takes a few, where a
    small receive after the one that arrived in parts made each of them a turn of its own (19 receives)."""
    turns: list[int] = []
    real = nbdproto.devices._nbdwire.Wire._receive

    def counted(wire: Any, target: Any) -> Any:
        got = real(wire, target)
        if got is not None:
            turns.append(0 if target is None else len(target))
        return got

    monkeypatch.setattr(nbdproto.devices._nbdwire.Wire, "_receive", counted)
    content = bytes(range(251)) * (count * size // 251 + 1)  # (251: no two reads alike)

    def read(wire: Any, request: Any) -> bytes:
        data = content[request.offset : request.offset + request.length]
        return wire.data(request, request.offset, data) if wire.structured else wire.simple(request, data=data)

    case = Case("burst", None, size=count * size, read=read, replies_together=count)
    with serve_case(case) as uri:
        device = NbdDevice(uri, connections=1, timeout=30)
        try:
            buffers = [memoryview(bytearray(size)) for _ in range(count)]
            calls = [nbdproto.DeviceCall("pread_into", (buffer, i * size)) for i, buffer in enumerate(buffers)]
            assert device.call_batch(calls) == [None] * count
            for i, buffer in enumerate(buffers):
                assert buffer == content[i * size : (i + 1) * size]
        finally:
            device.close()
    assert len(turns) <= most, turns
