"""Our server, on every backend, against the real clients: nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io.

Loopback and unix sockets only. Each test asks for its tools with the ``peers`` fixture (conftest.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import textwrap
from typing import Any

import pytest

import nbdproto
from nbdproto.devices import FileDevice, MemoryDevice
from tests.conftest import PEER_ENV
from tests.serving import BACKENDS, Export, make_pki, serve_exports

MIB = 1 << 20
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=PEER_ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def nbdsh(uri: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("nbdsh", "--base-allocation", "-u", uri, "-c", textwrap.dedent(script), check=check)


@pytest.fixture(params=["memory", "file"])
def blank_device(request: pytest.FixtureRequest) -> Any:
    """Makes a zeroed device of a given size: a MemoryDevice, or a FileDevice on tmpfs (the file whose reads
    the servers answer with views of its mapping)."""
    devices: list[Any] = []

    def make(size: int) -> Any:
        if request.param == "memory":
            device: Any = MemoryDevice(size)
        else:
            path = f"/dev/shm/nbdproto-test-{os.getpid()}-{len(devices)}.img"
            with open(path, "wb") as f:
                f.truncate(size)
            device = FileDevice(path)
            os.unlink(path)  # the open descriptor keeps it alive
        devices.append(device)
        return device

    yield make
    for device in devices:
        device.close()


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_nbdinfo_reports_size_capabilities_contexts_and_block_sizes(backend: str, peers: Any) -> None:
    peers("nbdinfo")
    exports = {"disk": Export(MemoryDevice(64 * MIB), "a test disk")}
    with serve_exports(backend, exports) as base:
        info = json.loads(run("nbdinfo", "--json", base.format("disk")).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == 64 * MIB
    assert export["description"] == "a test disk"
    assert export["contexts"] == ["base:allocation"]
    for capability in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df"):
        assert export[capability] is True, capability
    assert export["can_multi_conn"] is True
    assert export["is_read_only"] is False and export["is_rotational"] is False
    assert (export["block_size_minimum"], export["block_size_preferred"]) == (1, 4096)
    assert export["block_size_maximum"] == 32 * MIB


def test_nbdinfo_lists_exports_with_descriptions(backend: str, peers: Any) -> None:
    peers("nbdinfo")
    exports = {"one": Export(MemoryDevice(MIB), "first"), "two": Export(MemoryDevice(2 * MIB), "second")}
    with serve_exports(backend, exports) as base:
        listing = json.loads(run("nbdinfo", "--list", "--json", base.format("")).stdout)
    got = {e["export-name"]: (e.get("description"), e["export-size"]) for e in listing["exports"]}
    assert got == {"one": ("first", MIB), "two": ("second", 2 * MIB)}


def test_nbdinfo_map_reports_holes_and_data(backend: str, peers: Any, tmp_path: Any) -> None:
    peers("nbdinfo")
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(4 * MIB)
        f.write(os.urandom(MIB))
    device = FileDevice(path)
    with serve_exports(backend, {"f": Export(device)}) as base:
        mapping = json.loads(run("nbdinfo", "--map", "--json", base.format("f")).stdout)
    device.close()
    runs = [(m["offset"], m["length"], m["type"]) for m in mapping]
    assert runs == [(0, 4 * MIB, 3), (4 * MIB, MIB, 0), (5 * MIB, 11 * MIB, 3)]


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_nbdcopy_round_trip_keeps_every_byte(
    backend: str, unix: bool, peers: Any, tmp_path: Any, blank_device: Any
) -> None:
    peers("nbdcopy")
    src, out = str(tmp_path / "src.img"), str(tmp_path / "out.img")
    with open(src, "wb") as f:
        f.write(os.urandom(24 * MIB))
    device = blank_device(24 * MIB)
    with serve_exports(backend, {"disk": Export(device)}, unix=unix) as base:
        run("nbdcopy", src, base.format("disk"))
        run("nbdcopy", base.format("disk"), out)
    assert sha256(src) == sha256(out)


def test_qemu_img_compare_and_qemu_io_patterns(backend: str, peers: Any, tmp_path: Any, blank_device: Any) -> None:
    peers("qemu-img", "qemu-io")
    src = str(tmp_path / "src.img")
    with open(src, "wb") as f:
        f.write(os.urandom(8 * MIB))
    device = blank_device(8 * MIB)
    with open(src, "rb") as f:
        device.pwrite(f.read(), 0)
    with serve_exports(backend, {"disk": Export(device)}) as base:
        uri = base.format("disk")
        assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri).stdout
        io = run(
            "qemu-io", "-f", "raw",
            "-c", "write -P 0xab 1M 2M",
            "-c", "read -P 0xab 1M 2M",
            "-c", "write -z 4M 1M",
            "-c", "read -P 0 4M 1M",
            "-c", "discard 6M 1M",
            "-c", "flush",
            uri,
        )  # fmt: skip
        assert "Pattern verification failed" not in io.stdout + io.stderr
        assert io.stdout.count("read 2097152/2097152") == 1
        differs = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri, check=False)
        assert differs.returncode == 1 and "Content mismatch" in differs.stdout


NBDSH_EVERY_COMMAND = """
    import errno
    assert h.get_structured_replies_negotiated()
    size = h.get_size()
    assert size == 8 * 1024 * 1024
    h.pwrite(b"a" * 65536, 0)
    h.pwrite(b"b" * 65536, 65536, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 0) == b"a" * 65536
    assert h.pread(4096, 65536) == b"b" * 4096
    h.flush()
    h.trim(65536, 65536)
    # libnbd's argument order is (count, offset).
    h.zero(65536, 131072)
    h.zero(65536, 196608, nbd.CMD_FLAG_NO_HOLE)
    h.zero(65536, 262144, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 262144) == bytes(65536)
    h.cache(1048576, 0)
    # Reads across holes, with and without DF: every chunk lands where it belongs.
    h.pwrite(b"c" * 4096, 1048576 + 65536)
    for flags in (0, nbd.CMD_FLAG_DF):
        chunks = []
        def chunk(buf, offset, status, err):
            chunks.append((offset, len(buf), status))
        data = h.pread_structured(1048576, 1048576, chunk, flags)
        assert data == bytes(65536) + b"c" * 4096 + bytes(1048576 - 65536 - 4096)
        assert sum(n for _, n, _ in chunks) == 1048576
        if flags:
            assert len(chunks) == 1
    # Block status, whole and REQ_ONE.
    seen = []
    def extents(context, offset, entries, err):
        seen.append((context, offset, list(entries)))
    h.block_status(2 * 1048576, 0, extents)
    (context, offset, entries), = seen
    assert context == "base:allocation" and offset == 0
    assert sum(entries[0::2]) >= 65536 and entries[1] == 0
    seen.clear()
    h.block_status(2 * 1048576, 0, extents, nbd.CMD_FLAG_REQ_ONE)
    (context, offset, entries), = seen
    assert len(entries) == 2 and entries[0] <= 2 * 1048576
    # Beyond the end: EINVAL for reads, ENOSPC for writes; the connection stays usable. (libnbd's strict
    # mode would refuse these itself without asking the server.)
    h.set_strict_mode(0)
    past_the_end = ((lambda: h.pread(4096, size), errno.EINVAL), (lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC))
    for call, code in past_the_end:
        try:
            call()
        except nbd.Error as exc:
            assert exc.errnum == code, exc
        else:
            raise AssertionError("request past the end succeeded")
    assert h.pread(2, 0) == b"aa"
    print("all commands ok")
"""


def test_nbdsh_exercises_every_command_and_flag(backend: str, peers: Any, blank_device: Any) -> None:
    peers("nbdsh")
    with serve_exports(backend, {"disk": Export(blank_device(8 * MIB))}) as base:
        result = nbdsh(base.format("disk"), NBDSH_EVERY_COMMAND)
    assert "all commands ok" in result.stdout


def test_read_only_export_refuses_writes_with_eperm(backend: str, peers: Any) -> None:
    peers("nbdsh")
    device = MemoryDevice(MIB)
    device.pwrite(b"keep", 0)
    script = """
        import errno
        assert h.is_read_only()
        h.set_strict_mode(0)  # send the writes, so that the server (not libnbd) refuses them
        for call in (lambda: h.pwrite(b"x", 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
            try:
                call()
            except nbd.Error as exc:
                assert exc.errnum == errno.EPERM, exc
            else:
                raise AssertionError("a write to a read-only export succeeded")
        assert h.pread(4, 0) == b"keep"
        print("read-only ok")
    """
    with serve_exports(backend, {"ro": Export(device, read_only=True)}) as base:
        result = nbdsh(base.format("ro"), script, check=False)
    assert "read-only ok" in result.stdout, result.stderr
    buf = memoryview(bytearray(4))
    device.pread_into(buf, 0)
    assert bytes(buf) == b"keep"


def test_tls_with_x509_certificates(backend: str, peers: Any) -> None:
    peers("nbdinfo", "qemu-img")
    with (
        make_pki() as pki,
        serve_exports(backend, {"disk": Export(MemoryDevice(4 * MIB))}, tls=pki.server_context) as base,
    ):
        tls_uri = base.format("disk") + ("&" if "?" in base else "?") + f"tls-certificates={pki.directory}"
        info = json.loads(run("nbdinfo", "--json", tls_uri).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MIB
        port = base.split(":")[2].split("/")[0]
        qemu = run(
            "qemu-img", "info", "--output=json",
            "--object", f"tls-creds-x509,id=tls0,dir={pki.directory},endpoint=client",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0",
        )  # fmt: skip
        assert json.loads(qemu.stdout)["virtual-size"] == 4 * MIB
        # A plaintext client is refused, with the server saying why (libnbd's debug log relays the message).
        plain = subprocess.run(
            ["nbdinfo", base.format("disk").replace("nbds://", "nbd://")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**PEER_ENV, "LIBNBD_DEBUG": "1"},
        )
        assert plain.returncode != 0
        assert "server error message: TLS is required" in plain.stderr


def _no_ipv6_loopback() -> str | None:
    """Why this machine cannot listen on ::1 (no IPv6 in Python, or no ::1: a kernel or container without
    IPv6), found with a plain socket; None if it can. Any other failure is raised."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return str(exc)
        raise
    return None


def test_ipv6_loopback(peers: Any) -> None:
    """Both server kinds listen on ::1 and nbdinfo reaches them there."""
    peers("nbdinfo")
    import threading

    import anyio.from_thread

    import nbdproto_anyio
    import nbdproto_threads

    missing = _no_ipv6_loopback()
    if missing is not None:
        pytest.skip(f"this machine has no IPv6 loopback: {missing}")
    server = nbdproto_threads.Server({"d": MemoryDevice(MIB)}, ("::1", 0))  # any failure now is the server's
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        info = json.loads(run("nbdinfo", "--json", f"nbd://[::1]:{server.address[1]}/d").stdout)
        assert info["exports"][0]["export-size"] == MIB
    finally:
        server.shutdown()
    spec = nbdproto.ExportSpec(MemoryDevice(2 * MIB))
    with anyio.from_thread.start_blocking_portal() as portal:
        listener = portal.call(nbdproto_anyio.listen, ("::1", 0))
        future = portal.start_task_soon(nbdproto_anyio.Server({"d": spec}).serve, listener)
        try:
            info = json.loads(run("nbdinfo", "--json", f"nbd://[::1]:{listener.address[1]}/d").stdout)
            assert info["exports"][0]["export-size"] == 2 * MIB
        finally:
            future.cancel()


def test_tls_client_certificates_are_verified(backend: str, peers: Any) -> None:
    peers("nbdinfo")
    with make_pki(verify_client=True) as pki:
        exports = {"disk": Export(MemoryDevice(MIB))}
        with serve_exports(backend, exports, tls=pki.server_context) as base:
            uri = base.format("disk") + ("&" if "?" in base else "?") + f"tls-certificates={pki.directory}"
            assert json.loads(run("nbdinfo", "--json", uri).stdout)["TLS"] is True  # client-cert.pem is there
            os.rename(os.path.join(pki.directory, "client-cert.pem"), os.path.join(pki.directory, "gone.pem"))
            refused = run("nbdinfo", uri, check=False)
            assert refused.returncode != 0
