"""Our threads client against real servers: nbdkit (memory, data, pattern, sparse-random; error and delay
filters), qemu-nbd (raw and qcow2) and nbd-server. Loopback only, bounded start-up."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import nbdproto as n
import nbdproto.devices
import nbdproto_threads as nt
from tests.capture import nbdkit
from tests.conftest import PEER_ENV
from tests.remotes import free_port
from tests.serving import make_pki
from tests.waiting import tcp_listening, wait_until

MIB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def test_nbdkit_memory_every_command(peers: Any) -> None:
    peers("nbdkit")
    with nbdkit(["memory", "size=8M"]) as port, nt.connect(f"nbd://127.0.0.1:{port}/") as c:
        assert c.size == 8 * MIB and c.handshake is not None and c.handshake.structured_replies
        c.pwrite(b"hello", 4096, fua=True)
        assert c.pread(5, 4096) == b"hello"
        c.flush()
        c.zero(65536, 0, may_trim=False)
        c.trim(65536, 65536)
        c.cache(4096, 0)
        assert c.pread(5, 4096) == bytes(5)
        extents = c.block_status(MIB, 0)["base:allocation"]
        assert sum(e.length for e in extents) >= 1 and extents[0].length > 0
        (one,) = c.block_status(MIB, 0, req_one=True)["base:allocation"]
        assert one.length <= MIB
        with pytest.raises(n.LocalProtocolError, match="past the export size"):
            c.pread(10, 8 * MIB)
        assert c.pread(2, 0) == bytes(2)  # a refused request leaves the connection usable


def test_nbdkit_data_plugin_content_and_df_reads(peers: Any) -> None:
    peers("nbdkit")
    with nbdkit(["data", "data=1 2 3 @0x10000 4 5 6", "size=1M"]) as port, nt.connect(f"nbd://127.0.0.1:{port}/") as c:
        assert c.pread(3, 0) == b"\x01\x02\x03"
        assert c.pread(3, 0x10000, df=True) == b"\x04\x05\x06"
        big = c.pread(0x20000, 0)
        assert big[:3] == b"\x01\x02\x03" and big[0x10000:0x10003] == b"\x04\x05\x06"


def test_nbdkit_sparse_random_block_status_matches_the_data(peers: Any) -> None:
    peers("nbdkit")
    with nbdkit(["sparse-random", "size=16M", "seed=7"]) as port, nt.connect(f"nbd://127.0.0.1:{port}/") as c:
        offset = 0
        checked = 0
        while offset < 4 * MIB:
            extents = c.block_status(4 * MIB - offset, offset)["base:allocation"]
            for extent in extents:
                length = min(extent.length, 4 * MIB - offset)
                if extent.status & n.AllocationState.ZERO:
                    assert c.pread(min(length, 65536), offset) == bytes(min(length, 65536))
                    checked += 1
                offset += length
                if offset >= 4 * MIB:
                    break
        assert checked > 0


def test_many_threads_share_one_connection(peers: Any) -> None:
    peers("nbdkit")
    with nbdkit(["memory", "size=16M"]) as port, nt.connect(f"nbd://127.0.0.1:{port}/") as c:

        def work(i: int) -> bool:
            block = bytes([i]) * 65536
            c.pwrite(block, i * 65536)
            return c.pread(65536, i * 65536) == block

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert all(pool.map(work, range(128)))


def test_nbdkit_error_filter_errors_reach_the_caller(peers: Any) -> None:
    peers("nbdkit")
    args = ["--filter=error", "memory", "size=1M", "error=ENOSPC", "error-pwrite-rate=1", "error-pread-rate=0"]
    with nbdkit(args) as port, nt.connect(f"nbd://127.0.0.1:{port}/") as c:
        with pytest.raises(nbdproto.NBDError) as info:
            c.pwrite(b"x" * 512, 0)
        assert info.value.errno == errno.ENOSPC
        assert c.pread(512, 0) == bytes(512)  # the connection goes on after an error reply


def test_nbdkit_delay_filter_replies_out_of_order(peers: Any) -> None:
    """A write sent while a slow read is in flight is answered first: the client does not serialise requests
    (the order of the replies shows it, not a time: a loaded machine may be slow at anything)."""
    peers("nbdkit")
    args = ["--filter=delay", "memory", "size=1M", "delay-read=3"]
    with nbdkit(args) as port, nt.connect(f"nbd://127.0.0.1:{port}/") as c, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(c.pread, 512, 0)
        wait_until(lambda: c.engine.in_flight == 1, "the slow read sent")
        pool.submit(c.pwrite, b"w" * 512, 4096).result(timeout=10)
        assert not slow.done(), "a write waited behind a slow read on the same connection"
        assert slow.result(timeout=10) == bytes(512)


def test_list_exports_from_nbdkit(peers: Any) -> None:
    peers("nbdkit")
    with nbdkit(["memory", "size=1M"]) as port:
        exports = nt.list_exports(f"nbd://127.0.0.1:{port}/")
    assert [e.name for e in exports] == [""]


@contextlib.contextmanager
def qemu_nbd(image: str, fmt: str, *extra: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", fmt, "-b", "127.0.0.1", "-p", str(port), "-x", "disk", "-t", *extra, image],
        env=PEER_ENV,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_nbd_raw_and_sparse_qcow2(fmt: str, peers: Any, tmp_path: Any) -> None:
    peers("qemu-nbd", "qemu-img", "qemu-io")
    image = str(tmp_path / f"disk.{fmt}")
    subprocess.run(["qemu-img", "create", "-f", fmt, image, "16M"], check=True, capture_output=True, env=PEER_ENV)
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 1M 64k", image], check=True, capture_output=True)
    with qemu_nbd(image, fmt) as port, nt.connect(f"nbd://127.0.0.1:{port}/disk") as c:
        assert c.size == 16 * MIB
        assert c.pread(65536, MIB) == b"\x5a" * 65536
        c.pwrite(b"\xa5" * 4096, 4 * MIB)
        c.flush()
        status = c.block_status(MIB, 8 * MIB)["base:allocation"]
        assert status[0].status & n.AllocationState.ZERO  # never written
        assert not c.block_status(65536, MIB)["base:allocation"][0].status & n.AllocationState.ZERO
    # The write landed: read it back with another tool.
    check = subprocess.run(["qemu-io", "-f", fmt, "-c", "read -P 0xa5 4M 4k", image], capture_output=True, text=True)
    assert "Pattern verification failed" not in check.stdout and check.returncode == 0


def test_qemu_nbd_with_tls(peers: Any, tmp_path: Any) -> None:
    peers("qemu-nbd", "qemu-img")
    image = str(tmp_path / "disk.raw")
    subprocess.run(["qemu-img", "create", "-f", "raw", image, "4M"], check=True, capture_output=True, env=PEER_ENV)
    with make_pki() as pki:
        tls = f"tls-creds-x509,id=tls0,dir={pki.directory},endpoint=server"
        with qemu_nbd(image, "raw", "--object", tls, "--tls-creds", "tls0") as port:
            with nt.connect(f"nbds://127.0.0.1:{port}/disk", tls=pki.client_context) as c:
                assert c.handshake is not None and c.engine.tls_active
                c.pwrite(b"secret", 0)
                assert c.pread(6, 0) == b"secret"
            with pytest.raises(n.NegotiationError, match="TLS"):
                nt.connect(f"nbd://127.0.0.1:{port}/disk")


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the server listens on 127.0.0.1:port, without connecting to it (/proc/net/tcp), or exits."""
    wait_until(lambda: tcp_listening(port) or proc.poll() is not None, f"a server listening on port {port}")
    if proc.poll() is not None:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"the server exited with {proc.returncode} before it listened: {err}")


@contextlib.contextmanager
def nbd_server(image: str, tmp_path: Any) -> Iterator[int]:
    """nbd-server in the foreground (-d), which serves one client and then exits."""
    port = free_port()
    config = tmp_path / f"nbd-server-{port}.conf"
    config.write_text(
        f"[generic]\nlistenaddr = 127.0.0.1\nport = {port}\nallowlist = true\n"
        f"[disk]\nexportname = {image}\nflush = true\nfua = true\n"
    )
    proc = subprocess.Popen(["nbd-server", "-d", "-C", str(config)], env=PEER_ENV, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, proc)  # a probe connection would use up its one client
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_nbd_server(peers: Any, tmp_path: Any) -> None:
    peers("nbd-server")
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MIB))
    with nbd_server(str(image), tmp_path) as port:
        assert [e.name for e in nt.list_exports(f"nbd://127.0.0.1:{port}/")] == ["disk"]
    with nbd_server(str(image), tmp_path) as port, nt.connect(f"nbd://127.0.0.1:{port}/disk") as c:
        assert c.pread(MIB, 0) == image.read_bytes()
        c.pwrite(b"from nbdproto", 512)
        c.flush()
    assert image.read_bytes()[512:525] == b"from nbdproto"


def test_client_leaves_politely_after_eshutdown() -> None:
    """A device failing with ESHUTDOWN makes our server answer NBD_ESHUTDOWN; our client then sends DISC."""
    from tests.serving import Export, serving

    class ShuttingDown(nbdproto.devices.MemoryDevice):
        def pread_into(self, buffer: memoryview, offset: int) -> None:
            raise OSError(errno.ESHUTDOWN, "maintenance")

    with serving("threads", {"d": Export(ShuttingDown(MIB))}) as (base, server), nt.connect(base.format("d")) as c:
        with pytest.raises(nbdproto.NBDError) as info:
            c.pread(512, 0)
        assert info.value.errno == errno.ESHUTDOWN
        # The client's socket stays open: only its NBD_CMD_DISC ends the server's session.
        wait_until(lambda: not server.sessions, "the server's session ended by the client's NBD_CMD_DISC")
        # Refused either way: by the engine (no request after DISC) or, once the server has closed, as closed.
        with pytest.raises((n.LocalProtocolError, ConnectionError)):
            c.pwrite(b"x", 0)
