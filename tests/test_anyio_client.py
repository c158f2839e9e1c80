"""The anyio client on asyncio and trio: against nbdkit, qemu-nbd with TLS, and our own anyio server."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import nbdproto as n
import nbdproto.devices
import nbdproto_anyio as na
from nbdproto.devices import MemoryDevice
from tests.capture import nbdkit

MIB = 1 << 20
pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_every_command_against_nbdkit(peers: Any) -> None:
    peers("nbdkit")
    with nbdkit(["memory", "size=8M"]) as port:
        async with await na.connect(f"nbd://127.0.0.1:{port}/") as c:
            assert c.size == 8 * MIB
            await c.pwrite(b"hello", 4096, fua=True)
            assert await c.pread(5, 4096) == b"hello"
            await c.flush()
            await c.zero(65536, 0, may_trim=False)
            await c.trim(65536, 65536)
            await c.cache(4096, 0)
            extents = (await c.block_status(MIB, 0))["base:allocation"]
            assert extents and extents[0].length > 0
            with pytest.raises(n.LocalProtocolError):
                await c.pread(10, 8 * MIB)
            assert await c.pread(5, 4096) == bytes(5)
        assert [e.name for e in await na.list_exports(f"nbd://127.0.0.1:{port}/")] == [""]


async def test_errors_and_out_of_order_replies(peers: Any) -> None:
    peers("nbdkit")
    args = ["--filter=delay", "--filter=error", "memory", "size=1M", "delay-read=1000ms", "error=ENOSPC",
            "error-pwrite-rate=1", "error-pread-rate=0"]  # fmt: skip
    with nbdkit(args) as port:
        async with await na.connect(f"nbd://127.0.0.1:{port}/") as c:
            order: list[str] = []

            async def slow() -> None:
                await c.pread(512, 0)
                order.append("read")

            async def failing() -> None:
                while c.engine.in_flight == 0:  # until the slow read has been sent (no time passes here)
                    await anyio.lowlevel.checkpoint()
                with pytest.raises(nbdproto.NBDError) as info:
                    await c.pwrite(b"x" * 512, 0)
                assert info.value.errno == errno.ENOSPC
                order.append("write")

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(slow)
                tasks.start_soon(failing)
            assert order == ["write", "read"]


@contextlib.asynccontextmanager
async def our_server(exports: dict[str, Any], tls: Any = None) -> AsyncIterator[str]:
    """Our anyio server in this test's own event loop (a blocking portal cannot start inside a running loop)."""
    specs = {name: nbdproto.ExportSpec(dev, read_only=False) for name, dev in exports.items()}
    listener = await na.listen(("127.0.0.1", 0))
    scheme = "nbds" if tls else "nbd"
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(na.Server(specs, tls=tls).serve, listener)
        try:
            yield f"{scheme}://127.0.0.1:{listener.address[1]}/{{}}"
        finally:
            tasks.cancel_scope.cancel()


async def test_64_tasks_share_one_connection_and_cancelling_one_is_safe() -> None:
    async with our_server({"d": MemoryDevice(16 * MIB)}) as base, await na.connect(base.format("d")) as c:

        async def work(i: int) -> None:
            block = bytes([i]) * 4096
            await c.pwrite(block, i * 4096)
            assert await c.pread(4096, i * 4096) == block

        async with anyio.create_task_group() as tasks:
            for i in range(64):
                tasks.start_soon(work, i)
        with anyio.move_on_after(0):  # cancelled before its reply can arrive
            await c.pread(4096, 0)
        assert await c.pread(4096, 4096) == bytes([1]) * 4096


async def test_tls_with_our_server() -> None:
    from tests.serving import make_pki

    with make_pki() as pki:
        async with our_server({"d": MemoryDevice(MIB)}, tls=pki.server_context) as base:
            async with await na.connect(base.format("d"), tls=pki.client_context) as c:
                assert c.engine.tls_active
                await c.pwrite(b"secret", 0)
                assert await c.pread(6, 0) == b"secret"
            with pytest.raises(n.NegotiationError, match="TLS"):
                await na.connect(base.format("d").replace("nbds://", "nbd://"))


async def test_qemu_nbd_plain_and_tls(peers: Any, tmp_path: Any) -> None:
    peers("qemu-nbd", "qemu-img")
    import subprocess

    from tests.conftest import PEER_ENV
    from tests.serving import make_pki
    from tests.test_interop_client import qemu_nbd

    image = str(tmp_path / "disk.raw")
    subprocess.run(["qemu-img", "create", "-f", "raw", image, "4M"], check=True, capture_output=True, env=PEER_ENV)
    with qemu_nbd(image, "raw") as port:
        async with await na.connect(f"nbd://127.0.0.1:{port}/disk") as c:
            await c.pwrite(b"plain", 0)
            assert await c.pread(5, 0) == b"plain"
    with make_pki() as pki:
        tls = f"tls-creds-x509,id=tls0,dir={pki.directory},endpoint=server"
        with qemu_nbd(image, "raw", "--object", tls, "--tls-creds", "tls0") as port:
            async with await na.connect(f"nbds://127.0.0.1:{port}/disk", tls=pki.client_context) as c:
                assert c.engine.tls_active and await c.pread(5, 0) == b"plain"


async def test_nbd_server(peers: Any, tmp_path: Any) -> None:
    peers("nbd-server")
    import os

    from tests.test_interop_client import nbd_server

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MIB))
    with nbd_server(str(image), tmp_path) as port:
        async with await na.connect(f"nbd://127.0.0.1:{port}/disk") as c:
            assert await c.pread(MIB, 0) == image.read_bytes()
            await c.pwrite(b"async write", 100)
            await c.flush()
    assert image.read_bytes()[100:111] == b"async write"


@pytest.mark.parametrize("where", ["127.0.0.1", "::1", "unix"])
async def test_large_reads_land_in_the_callers_buffers_over_tcp_v4_v6_and_unix(where: str, tmp_path: Any) -> None:
    # Read data is received straight into each caller's buffer (ClientConnection.read_buffer) while other
    # tasks' replies interleave with it; every buffer must hold exactly its own range.
    import os

    data = os.urandom(16 * MIB)
    device = MemoryDevice(16 * MIB)
    device.pwrite(data, 0)
    specs = {"d": nbdproto.ExportSpec(device, read_only=False)}
    address: Any = str(tmp_path / "nbd.sock") if where == "unix" else (where, 0)
    listener = await na.listen(address)
    if where == "unix":
        uri = f"nbd+unix:///d?socket={address}"
    else:
        host = f"[{where}]" if ":" in where else where
        uri = f"nbd://{host}:{listener.address[1]}/d"
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(na.Server(specs).serve, listener)
        async with await na.connect(uri) as c:
            results: dict[int, bytes] = {}

            async def read(i: int) -> None:
                buffer = bytearray(MIB + 4096 * i)
                offset = i * 512 * 1024
                view = await c.pread_into(buffer, offset)
                assert view.obj is buffer
                results[i] = bytes(buffer)

            async with anyio.create_task_group() as readers:
                for i in range(16):
                    readers.start_soon(read, i)
                    readers.start_soon(c.pwrite, b"x" * 4096, 15 * MIB + 4096 * i)  # replies in between
            assert sorted(results) == list(range(16))
            for i, got in results.items():
                assert got == data[i * 512 * 1024 : i * 512 * 1024 + MIB + 4096 * i]
        tasks.cancel_scope.cancel()


async def test_connecting_to_nothing_is_connection_refused() -> None:
    from tests.remotes import free_port

    with pytest.raises(ConnectionRefusedError):
        await na.connect(f"nbd://127.0.0.1:{free_port()}/")
