"""nbdproto.libnbd against libnbd's binding on real servers: nbdkit (memory over TCP and a unix socket, pattern,
the sh plugin with scripted extents, TLS with certificates and pre-shared keys), qemu-nbd with a dirty bitmap
and its allocation depth, our threads server (extended headers agreed on our side) and ``nbdproto serve``
started by socket activation. Each side gets its own server where the server keeps state."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from nbdproto.devices import MemoryDevice
from tests.libnbd_diff import Differ, Params, Workers, libnbd_workers, require_binding  # noqa: F401
from tests.remotes import nbdkit, serving_on_socket
from tests.serving import Export, make_pki, serve_exports

pytestmark = pytest.mark.peers

EXTENTS_SCRIPT = """#!/usr/bin/env bash
# 64 KiB with scripted extents (nbdkit's sh plugin).
case "$1" in
  get_size) echo 65536 ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  can_extents) exit 0 ;;
  extents)
    echo 0     8192  0
    echo 8192  8192  hole
    echo 16384 16384 hole,zero
    echo 32768 16384 zero
    echo 49152 16384 0 ;;
  *) exit 2 ;;
esac
"""

SESSION = """
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
attempt("connect", CONNECT[0], *CONNECT[1:])
for name in ["get_protocol", "get_handshake_flags", "get_structured_replies_negotiated", "get_size", "is_read_only",
             "can_flush", "can_fua", "is_rotational", "can_trim", "can_zero", "can_fast_zero", "can_df",
             "can_multi_conn", "can_cache", "get_export_name", "aio_is_ready"]:
    attempt(name, getattr(h, name))
for size_type in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM):
    attempt("get_block_size", h.get_block_size, size_type)
uri = attempt("get_uri", h.get_uri)
attempt("can_meta_context", h.can_meta_context, nbd.CONTEXT_BASE_ALLOCATION)
attempt("pwrite", h.pwrite, b"abc" * 1000, 4096, nbd.CMD_FLAG_FUA)
attempt("block_status", h.block_status, 1 << 20, 0, recorder("extent"))
attempt("block_status REQ_ONE", h.block_status, 1 << 20, 0, recorder("extent1"), nbd.CMD_FLAG_REQ_ONE)
attempt("zero", h.zero, 4096, 4096)
attempt("zero fast", h.zero, 4096, 65536, nbd.CMD_FLAG_FAST_ZERO)
attempt("trim", h.trim, 65536, 0)
attempt("cache", h.cache, 65536, 0)
attempt("block_status again", h.block_status, 1 << 20, 0, recorder("extent2"))
attempt("pread", h.pread, 8192, 0)
attempt("pread unaligned", h.pread, 3, 1)
attempt("pread 1M", h.pread, 1 << 20, 0)
attempt("pread_structured DF", h.pread_structured, 100, 4000, recorder("chunk"), nbd.CMD_FLAG_DF)
attempt("flush", h.flush)
attempt("shutdown", h.shutdown)
attempt("state", h.connection_state)
"""


@pytest.fixture
def differ(libnbd_workers: Workers) -> Iterator[Differ]:  # noqa: F811
    require_binding("nbdkit")
    yield Differ(libnbd_workers)


def _session(connect: str) -> str:
    """SESSION, connecting with ``connect`` (the call and its arguments), its URI with the port blanked."""
    script = SESSION.replace('attempt("connect",', f'CONNECT = {connect}\nattempt("connect",')
    return script.replace(
        'uri = attempt("get_uri", h.get_uri)',
        "import re\nuri = h.get_uri()\n"
        'rec("get_uri", re.sub("socket=[^&]*", "socket=S", uri.replace(str(PARAMS.get("port")), "PORT")))',
    )


@contextlib.contextmanager
def _nbdkit_tcp() -> Iterator[Params]:
    with nbdkit("memory", "1M") as (uri, _):
        yield {"uri": uri, "host": "127.0.0.1", "port": uri.rsplit(":", 1)[1].strip("/")}


@contextlib.contextmanager
def _nbdkit_unix() -> Iterator[Params]:
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(_tempdir())
        sock = os.path.join(directory, "nbdkit.sock")
        stack.enter_context(
            serving_on_socket(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "memory", "1M"], sock, "nbdkit")
        )
        yield {"socket": sock, "uri": f"nbd+unix:///?socket={sock}"}


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nbdproto-libnbd-") as directory:
        yield directory


@contextlib.contextmanager
def _our_server() -> Iterator[Params]:
    exports = {"disk": Export(MemoryDevice(1 << 20)), "ro": Export(MemoryDevice(1 << 20), "a description", True)}
    with serve_exports("threads", exports) as base:
        yield {"uri": base.format("disk"), "base": base, "port": base.rsplit(":", 1)[1].split("/")[0]}


@pytest.mark.parametrize(
    ("connect", "server"),
    [
        ("[h.connect_uri, PARAMS['uri']]", _nbdkit_tcp),
        ("[h.connect_tcp, PARAMS['host'], PARAMS['port']]", _nbdkit_tcp),
        ("[h.connect_unix, PARAMS['socket']]", _nbdkit_unix),
        ("[h.connect_uri, PARAMS['uri']]", _nbdkit_unix),
        ("[h.connect_uri, PARAMS['uri']]", _our_server),
        ("[h.aio_connect_uri, PARAMS['uri']]", _our_server),
    ],
    ids=["nbdkit-tcp-uri", "nbdkit-connect-tcp", "nbdkit-connect-unix", "nbdkit-unix-uri", "ours-uri", "ours-aio"],
)
def test_a_session_on_each_server(differ: Differ, connect: str, server: object) -> None:
    script = _session(connect)
    if "aio_connect" in connect:  # the aio connect returns at once: wait for the handshake as scripts do
        script = script.replace(
            'attempt("connect", CONNECT[0], *CONNECT[1:])',
            'attempt("connect", CONNECT[0], *CONNECT[1:])\nwhile h.aio_is_connecting():\n    h.poll(-1)',
        )
    trace = differ.same(script, server)  # type: ignore[arg-type]
    assert ["connect", "ok", None] in trace and ["shutdown", "ok", None] in trace


def test_our_serve_command_by_socket_activation(differ: Differ) -> None:
    trace = differ.same(
        _session("[h.connect_systemd_socket_activation, PARAMS['command']]"),
        command=[sys.executable, "-m", "nbdproto", "serve", "--memory", "1M"],
    )
    assert ["connect", "ok", None] in trace


def test_opt_mode_on_our_server(differ: Differ) -> None:
    differ.same(
        """
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
attempt("connect", h.connect_uri, PARAMS["base"].format(""))
attempt("opt_list", h.opt_list, recorder("list"))
attempt("set_export_name", h.set_export_name, "ro")
attempt("opt_info", h.opt_info)
for name in ["get_size", "is_read_only", "get_canonical_export_name", "get_export_description", "can_trim"]:
    attempt(name, getattr(h, name))
attempt("opt_list_meta_context", h.opt_list_meta_context, recorder("context"))
attempt("opt_go", h.opt_go)
attempt("pwrite read-only", h.pwrite, b"x", 0)
attempt("get_uri", lambda: h.get_uri().replace(PARAMS["port"], "PORT"))
h = nbd.NBD()
attempt("connect to nothing", h.connect_uri, PARAMS["base"].format("nosuch"))
attempt("state", h.connection_state)
""",
        _our_server,
    )


def test_nbdkit_pattern(differ: Differ) -> None:
    differ.same("""
h = nbd.NBD()
h.connect_command(["nbdkit", "-s", "--exit-with-parent", "pattern", "3M"])
for offset, count in [(0, 16), (8, 8), (4095, 10), (1 << 20, 4096), ((3 << 20) - 8, 8), (12345, 100000)]:
    attempt("pread %d" % offset, h.pread, count, offset)
attempt("is_read_only", h.is_read_only)
attempt("pwrite", h.pwrite, b"x", 0)
buffers = [nbd.Buffer(65536) for _ in range(8)]
cookies = [h.aio_pread(buffer, index * 65536) for index, buffer in enumerate(buffers)]
while h.aio_in_flight():
    h.poll(-1)
rec("aio", [h.aio_command_completed(cookie) for cookie in cookies], buffers)
""")


def test_scripted_extents(differ: Differ, tmp_path: os.PathLike[str]) -> None:
    script = os.path.join(tmp_path, "extents.sh")
    with open(script, "w") as f:
        f.write(EXTENTS_SCRIPT)
    os.chmod(script, 0o755)
    differ.same(
        """
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_command(["nbdkit", "-s", "--exit-with-parent", "sh", PARAMS["plugin"]])
attempt("whole", h.block_status, 65536, 0, recorder("extent"))
attempt("middle", h.block_status, 1024, 32256, recorder("extent"))
attempt("REQ_ONE", h.block_status, 1024, 32256, recorder("extent"), nbd.CMD_FLAG_REQ_ONE)
attempt("unaligned", h.block_status, 100, 100, recorder("extent"))
for offset in range(0, 65536, 4096):
    attempt("from %d" % offset, h.block_status, 65536 - offset, offset, recorder("extent"), nbd.CMD_FLAG_REQ_ONE)
cookie = attempt("aio", h.aio_block_status, 65536, 0, recorder("aio-extent"), recorder("completion", 1))
while h.aio_in_flight():
    h.poll(-1)
attempt("retired by its callback", h.aio_peek_command_completed)
rec("states", nbd.STATE_HOLE, nbd.STATE_ZERO)
attempt("read-only", h.is_read_only)
for name in ["pwrite", "zero", "trim", "flush", "cache"]:
    attempt(name, getattr(h, name), *{"pwrite": [b"x", 0], "flush": []}.get(name, [512, 0]))
""",
        plugin=script,
    )


@pytest.fixture
def bitmap_image(tmp_path: os.PathLike[str]) -> str:
    """A qcow2 image: data before the bitmap b1 was added, data and zeroes after it (b1 marks those)."""
    require_binding("qemu-img", "qemu-io", "qemu-nbd")
    image = os.path.join(tmp_path, "disk.qcow2")
    run = [("qemu-img", "create", "-q", "-f", "qcow2", image, "4M")]
    run += [("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 64k", "-c", "write -z 1M 64k", image)]
    run += [("qemu-img", "bitmap", "--add", image, "b1")]
    run += [("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 2M 128k", "-c", "write 3M 4k", image)]
    for command in run:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    return image


def test_qemu_nbd_with_a_dirty_bitmap(differ: Differ, bitmap_image: str) -> None:
    differ.same(
        """
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.add_meta_context("qemu:dirty-bitmap:b1")
h.add_meta_context("qemu:allocation-depth")
attempt("connect", h.connect_systemd_socket_activation,
        ["qemu-nbd", "-r", "-f", "qcow2", "-B", "b1", "-A", PARAMS["image"]])
for name in ["get_protocol", "get_size", "is_read_only", "can_flush", "can_trim", "can_zero", "can_df",
             "can_multi_conn", "can_cache", "get_export_name", "get_canonical_export_name", "get_export_description"]:
    attempt(name, getattr(h, name))
for size_type in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM):
    attempt("get_block_size", h.get_block_size, size_type)
for context in ["base:allocation", "qemu:dirty-bitmap:b1", "qemu:allocation-depth", "qemu:dirty-bitmap:nope"]:
    attempt("can " + context, h.can_meta_context, context)
attempt("whole", h.block_status, 4 << 20, 0, recorder("extent"))
attempt("REQ_ONE", h.block_status, 4 << 20, 0, recorder("extent1"), nbd.CMD_FLAG_REQ_ONE)
attempt("inside", h.block_status, 65536, (2 << 20) + 4096, recorder("extent2"))
attempt("pread", h.pread, 4096, 2 << 20)
h2 = nbd.NBD()
h2.set_opt_mode(True)
h2.connect_systemd_socket_activation(["qemu-nbd", "-r", "-f", "qcow2", "-B", "b1", "-A", PARAMS["image"]])
attempt("list all", h2.opt_list_meta_context, recorder("context"))
h2.add_meta_context("qemu:")
attempt("list qemu:", h2.opt_list_meta_context, recorder("qemu context"))
attempt("opt_abort", h2.opt_abort)
attempt("kill_subprocess", h.kill_subprocess, 0)
""",
        image=bitmap_image,
    )


TLS_SESSIONS = """
pki = PARAMS["pki"]
for tls, server_tls in [(nbd.TLS_REQUIRE, "require"), (nbd.TLS_ALLOW, "require"), (nbd.TLS_ALLOW, "off"),
                        (nbd.TLS_REQUIRE, "off"), (nbd.TLS_DISABLE, "require")]:
    h = nbd.NBD()
    attempt("supports_tls", h.supports_tls)
    attempt("set_tls", h.set_tls, tls)
    attempt("set_tls_certificates", h.set_tls_certificates, pki)
    attempt("connect", h.connect_command, ["nbdkit", "-s", "--exit-with-parent", "--tls=" + server_tls,
                                           "--tls-certificates=" + pki, "memory", "1M"])
    attempt("ready", h.aio_is_ready)
    attempt("get_tls_negotiated", h.get_tls_negotiated)
    attempt("pwrite", h.pwrite, b"secret" * 1000, 0)
    attempt("pread", h.pread, 6000, 0)
    attempt("pread 1M", h.pread, 1 << 20, 0)
    attempt("shutdown", h.shutdown)
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates("/nonexistent")
attempt("certificates that are not there", h.connect_command,
        ["nbdkit", "-s", "--exit-with-parent", "--tls=require", "--tls-certificates=" + pki, "memory", "1M"])
"""

PSK_SESSIONS = """
pki = PARAMS["pki"]
for user in ["alice", "bob"]:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    attempt("set_tls_username", h.set_tls_username, user)
    attempt("get_tls_username", h.get_tls_username)
    attempt("set_tls_psk_file", h.set_tls_psk_file, pki + "/keys.psk")
    attempt("connect", h.connect_command, ["nbdkit", "-s", "--exit-with-parent", "--tls=require",
                                           "--tls-psk=" + pki + "/keys.psk", "memory", "1M"])
    attempt("get_tls_negotiated", h.get_tls_negotiated)
    attempt("pread", h.pread, 4, 0)
"""


def test_tls_with_certificates(differ: Differ) -> None:
    with make_pki() as pki:
        trace = differ.same(TLS_SESSIONS, pki=pki.directory)
    assert trace.count(["get_tls_negotiated", "ok", True]) == 2


def test_tls_with_pre_shared_keys(differ: Differ) -> None:
    if sys.version_info < (3, 13):
        pytest.skip("TLS with pre-shared keys needs Python 3.13 (ssl.SSLContext.set_psk_client_callback)")
    with make_pki() as pki:
        with open(os.path.join(pki.directory, "keys.psk"), "w") as f:
            f.write("alice:" + "ab" * 32 + "\n")
        trace = differ.same(PSK_SESSIONS, pki=pki.directory)
    assert ["get_tls_negotiated", "ok", True] in trace


def test_uris_as_libnbd_reads_them(differ: Differ) -> None:
    differ.same(
        """
uris = ["localhost:10809", "/tmp/x", "nbd:/x", "foo://x", "nbd+unix:///", "nbd://x/?socket=/s",
        "nbds://localhost/?tls-psk-file=x", "nbds://localhost/?tls-certificates=x", "nbd+vsock:///"]
for uri in uris:
    attempt(uri, nbd.NBD().connect_uri, uri)
h = nbd.NBD()
h.set_uri_allow_transports(nbd.ALLOW_TRANSPORT_UNIX)
attempt("tcp refused", h.connect_uri, PARAMS["uri"])
h = nbd.NBD()
h.set_uri_allow_tls(nbd.TLS_REQUIRE)
attempt("plaintext refused", h.connect_uri, PARAMS["uri"])
h = nbd.NBD()
h.set_uri_allow_tls(nbd.TLS_DISABLE)
attempt("tls refused", h.connect_uri, "nbds://localhost/")
h = nbd.NBD()
attempt("export name", h.connect_uri, PARAMS["socket_uri"].replace("///", "///a%20b/c"))
attempt("get_export_name", h.get_export_name)
attempt("get_uri", lambda: h.get_uri().replace(PARAMS["socket"], "SOCKET"))
""",
        _nbdkit_unix_and_tcp,
    )


@contextlib.contextmanager
def _nbdkit_unix_and_tcp() -> Iterator[Params]:
    with _nbdkit_unix() as unix, _nbdkit_tcp() as tcp:
        yield {**tcp, "socket": unix["socket"], "socket_uri": unix["uri"]}
