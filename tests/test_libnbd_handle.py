"""nbdproto.libnbd against libnbd's binding: the handle itself, its settings and state rules, the data calls
on nbdkit's memory plugin (started by connect_command, so each side gets a fresh one), errors from the
server, Buffer, and debug messages (tests/libnbd_diff.py says how the two sides are run and compared)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import PEER_ENV
from tests.libnbd_diff import ROOT, Differ, Workers, libnbd_workers, require_binding  # noqa: F401

pytestmark = pytest.mark.peers

MEMORY = '["nbdkit", "-s", "--exit-with-parent", "memory", "1M"]'


@pytest.fixture
def differ(libnbd_workers: Workers) -> Iterator[Differ]:  # noqa: F811
    require_binding("nbdkit")
    yield Differ(libnbd_workers)


def test_a_new_handle_answers_every_call_as_libnbd_does(differ: Differ) -> None:
    # Every query on a handle that never connected, and what each setter refuses, with libnbd's errnos.
    trace = differ.same("""
h = nbd.NBD()
for name in ["get_handshake_flags", "get_tls", "get_request_block_size", "get_full_info", "get_pread_initialize",
             "get_request_structured_replies", "get_export_name", "get_nr_meta_contexts", "get_opt_mode",
             "get_tls_verify_peer", "get_debug", "connection_state", "aio_get_direction", "aio_get_fd",
             "aio_in_flight", "aio_peek_command_completed", "get_uri", "get_private_data", "aio_is_created",
             "aio_is_connecting", "aio_is_ready", "aio_is_processing", "aio_is_dead", "aio_is_closed",
             "aio_is_negotiating", "supports_tls", "supports_uri", "get_size", "is_read_only", "can_flush", "can_fua",
             "is_rotational", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_multi_conn", "can_cache",
             "get_protocol", "get_structured_replies_negotiated", "get_tls_negotiated", "get_canonical_export_name",
             "get_export_description", "opt_go", "opt_abort", "opt_info", "flush", "shutdown", "aio_flush",
             "aio_disconnect"]:
    attempt(name, getattr(h, name))
rec("strict", h.get_strict_mode() & 0x1f)
attempt("get_meta_context", h.get_meta_context, 0)
attempt("aio_command_completed 1", h.aio_command_completed, 1)
attempt("aio_command_completed 0", h.aio_command_completed, 0)
attempt("poll", h.poll, 0)
attempt("pread", h.pread, 1, 0)
attempt("pwrite", h.pwrite, b"x", 0)
attempt("zero", h.zero, 1, 0)
attempt("trim", h.trim, 1, 0)
attempt("cache", h.cache, 1, 0)
attempt("block_status", h.block_status, 1, 0, recorder("extent"))
attempt("aio_pread", h.aio_pread, nbd.Buffer(1), 0)
attempt("aio_pwrite", h.aio_pwrite, b"x", 0)
attempt("opt_list", h.opt_list, recorder("list"))
attempt("opt_list_meta_context", h.opt_list_meta_context, recorder("context"))
attempt("can_meta_context", h.can_meta_context, nbd.CONTEXT_BASE_ALLOCATION)
attempt("get_block_size", h.get_block_size, nbd.SIZE_MINIMUM)
attempt("get_block_size bad", h.get_block_size, 9)
attempt("set_tls bad", h.set_tls, 7)
attempt("set_tls", h.set_tls, nbd.TLS_ALLOW)
attempt("get_tls", h.get_tls)
attempt("set_tls_username", h.set_tls_username, "alice")
attempt("get_tls_username", h.get_tls_username)
attempt("set_tls_verify_peer", h.set_tls_verify_peer, False)
attempt("get_tls_verify_peer", h.get_tls_verify_peer)
attempt("set_handshake_flags bad", h.set_handshake_flags, 4)
attempt("set_handshake_flags", h.set_handshake_flags, nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
attempt("get_handshake_flags", h.get_handshake_flags)
attempt("set_strict_mode bad", h.set_strict_mode, 0x100)
attempt("set_strict_mode", h.set_strict_mode, nbd.STRICT_BOUNDS)
attempt("get_strict_mode", h.get_strict_mode)
attempt("set_request_structured_replies", h.set_request_structured_replies, False)
attempt("get_request_structured_replies", h.get_request_structured_replies)
attempt("set_request_block_size", h.set_request_block_size, False)
attempt("get_request_block_size", h.get_request_block_size)
attempt("set_full_info", h.set_full_info, True)
attempt("get_full_info", h.get_full_info)
attempt("set_pread_initialize", h.set_pread_initialize, False)
attempt("get_pread_initialize", h.get_pread_initialize)
attempt("set_export_name", h.set_export_name, "x")
attempt("get_export_name", h.get_export_name)
attempt("add_meta_context", h.add_meta_context, nbd.CONTEXT_BASE_ALLOCATION)
attempt("add_meta_context 2", h.add_meta_context, "qemu:dirty-bitmap:b1")
attempt("get_meta_context", h.get_meta_context, 1)
attempt("get_nr_meta_contexts", h.get_nr_meta_contexts)
attempt("clear_meta_contexts", h.clear_meta_contexts)
attempt("get_nr_meta_contexts", h.get_nr_meta_contexts)
attempt("set_private_data", h.set_private_data, 42)
attempt("set_private_data", h.set_private_data, 43)
attempt("set_handle_name", h.set_handle_name, "mine")
attempt("get_handle_name", h.get_handle_name)
attempt("kill_subprocess", h.kill_subprocess, 0)
attempt("set_uri_allow_transports bad", h.set_uri_allow_transports, 8)
attempt("set_uri_allow_tls", h.set_uri_allow_tls, nbd.TLS_REQUIRE)
attempt("set_uri_allow_local_file", h.set_uri_allow_local_file, True)
attempt("set_opt_mode", h.set_opt_mode, True)
attempt("get_opt_mode", h.get_opt_mode)
attempt("set_debug", h.set_debug, False)
attempt("get_debug", h.get_debug)
attempt("clear_debug_callback", h.clear_debug_callback)
attempt("set_debug_callback bad", h.set_debug_callback, 42)
attempt("get_version type", lambda: type(h.get_version()).__name__)
attempt("get_package_name type", lambda: type(h.get_package_name()).__name__)
# A failed connect leaves the handle dead, and a dead handle refuses what libnbd's refuses.
attempt("connect_unix", h.connect_unix, "/nonexistent/socket")
for name in ["connection_state", "aio_is_dead", "get_size", "aio_in_flight", "get_uri"]:
    attempt(name, getattr(h, name))
attempt("set_export_name", h.set_export_name, "y")
attempt("connect_unix again", h.connect_unix, "/nonexistent/socket")
""")
    assert ["connect_unix", "Error", 2, "ENOENT", "nbd_connect_unix"] in trace


def test_constants_have_libnbd_values(differ: Differ) -> None:
    differ.same("""
names = ["TLS_DISABLE", "TLS_ALLOW", "TLS_REQUIRE", "SIZE_MINIMUM", "SIZE_PREFERRED", "SIZE_MAXIMUM", "CMD_FLAG_FUA",
         "CMD_FLAG_NO_HOLE", "CMD_FLAG_DF", "CMD_FLAG_REQ_ONE", "CMD_FLAG_FAST_ZERO", "HANDSHAKE_FLAG_FIXED_NEWSTYLE",
         "HANDSHAKE_FLAG_NO_ZEROES", "HANDSHAKE_FLAG_MASK", "STRICT_COMMANDS", "STRICT_FLAGS", "STRICT_BOUNDS",
         "STRICT_ZERO_SIZE", "STRICT_ALIGN", "ALLOW_TRANSPORT_TCP", "ALLOW_TRANSPORT_UNIX", "ALLOW_TRANSPORT_VSOCK",
         "ALLOW_TRANSPORT_MASK", "SHUTDOWN_ABANDON_PENDING", "SHUTDOWN_MASK", "AIO_DIRECTION_READ",
         "AIO_DIRECTION_WRITE", "AIO_DIRECTION_BOTH", "READ_DATA", "READ_HOLE", "READ_ERROR", "NAMESPACE_BASE",
         "CONTEXT_BASE_ALLOCATION", "STATE_HOLE", "STATE_ZERO"]
for name in names:
    rec(name, getattr(nbd, name))
rec("error", issubclass(nbd.Error, Exception), nbd.Error("text", 5).string, nbd.Error("text", 5).errno,
    nbd.Error("text", 5).errnum, str(nbd.Error("text", 5)), str(nbd.Error("text", 0)), nbd.Error("x", 0).errno)
rec("version", nbd.__version__.count("."), type(nbd.package_name).__name__)
""")


def test_the_data_calls_on_nbdkit_memory(differ: Differ) -> None:
    trace = differ.same(f"""
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
attempt("connect", h.connect_command, {MEMORY})
for name in ["get_handshake_flags", "connection_state", "aio_get_direction", "aio_in_flight", "get_uri",
             "aio_is_connecting", "aio_is_ready", "aio_is_processing", "aio_is_negotiating", "get_size", "is_read_only",
             "can_flush", "can_fua", "is_rotational", "can_trim", "can_zero", "can_fast_zero", "can_df",
             "can_multi_conn", "can_cache", "get_protocol", "get_structured_replies_negotiated", "get_tls_negotiated",
             "get_canonical_export_name", "get_export_description", "opt_go", "get_export_name",
             "get_nr_meta_contexts"]:
    attempt(name, getattr(h, name))
for size_type in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM):
    attempt("get_block_size", h.get_block_size, size_type)
attempt("can_meta_context", h.can_meta_context, nbd.CONTEXT_BASE_ALLOCATION)
attempt("can_meta_context other", h.can_meta_context, "qemu:dirty-bitmap:b1")
attempt("pwrite", h.pwrite, b"hello world", 4096)
attempt("pwrite fua", h.pwrite, bytearray(b"hello world"), 8192, nbd.CMD_FLAG_FUA)
attempt("pwrite memoryview", h.pwrite, memoryview(b"0123456789")[2:6], 12288)
attempt("pread", h.pread, 32, 4090)
attempt("pread 12288", h.pread, 8, 12286)
attempt("pread past the end", h.pread, 32, 1 << 20)
attempt("pread of 0", h.pread, 0, 0)
attempt("pread with FUA", h.pread, 1, 0, nbd.CMD_FLAG_FUA)
attempt("pread unknown flag", h.pread, 1, 0, 0x100)
attempt("pread 64M", h.pread, 64 << 20, 0)
attempt("pread over 64M", h.pread, (64 << 20) + 1, 0)
attempt("pread negative offset", h.pread, 1, -1)
attempt("pwrite past the end", h.pwrite, b"x", 1 << 20)
attempt("pwrite empty", h.pwrite, b"", 0)
attempt("pwrite str", h.pwrite, "text", 0)
attempt("pwrite DF", h.pwrite, b"x", 0, nbd.CMD_FLAG_DF)
attempt("trim past the end", h.trim, 1, 1 << 20)
attempt("trim", h.trim, 4096, 0)
attempt("trim fua", h.trim, 4096, 0, nbd.CMD_FLAG_FUA)
attempt("zero", h.zero, 4096, 65536, nbd.CMD_FLAG_NO_HOLE)
attempt("zero fast", h.zero, 4096, 65536, nbd.CMD_FLAG_FAST_ZERO)
attempt("zero REQ_ONE", h.zero, 4096, 65536, nbd.CMD_FLAG_REQ_ONE)
attempt("zero past the end", h.zero, 2, (1 << 20) - 1)
attempt("cache", h.cache, 4096, 0)
attempt("cache past the end", h.cache, 4096, 1 << 20)
attempt("flush", h.flush)
attempt("flush FUA", h.flush, nbd.CMD_FLAG_FUA)
attempt("block_status", h.block_status, 1 << 20, 0, recorder("extent"))
attempt("block_status REQ_ONE", h.block_status, 1 << 20, 0, recorder("extent1"), nbd.CMD_FLAG_REQ_ONE)
attempt("block_status FUA", h.block_status, 1 << 20, 0, recorder("extent"), nbd.CMD_FLAG_FUA)
attempt("block_status past the end", h.block_status, 1, 1 << 20, recorder("extent"))
attempt("block_status not callable", h.block_status, 1, 0, None)
attempt("block_status returning -1", h.block_status, 1 << 20, 0, recorder("fails", -1))
def sets_err(metacontext, offset, entries, err):
    rec("sets_err", metacontext, offset, entries, err)
    err.value = 42
    return -1
attempt("block_status setting err", h.block_status, 1 << 20, 0, sets_err)
def raises(metacontext, offset, entries, err):
    rec("raises", metacontext)
    raise RuntimeError("a callback that fails")
attempt("block_status raising", h.block_status, 1 << 20, 0, raises)
attempt("block_status after", h.block_status, 65536, 0, recorder("after"))
attempt("pread_structured", h.pread_structured, 16, 4096, recorder("chunk"))
attempt("pread_structured DF", h.pread_structured, 16, 4096, recorder("chunk-df"), nbd.CMD_FLAG_DF)
attempt("shutdown", h.shutdown)
for name in ["connection_state", "aio_in_flight", "aio_is_closed", "get_size", "shutdown", "can_flush"]:
    attempt(name, getattr(h, name))
attempt("pread closed", h.pread, 1, 0)
""")
    assert ["pwrite past the end", "Error", 28, "ENOSPC", "nbd_pwrite"] in trace
    assert any(entry[:2] == ["extent", "base:allocation"] for entry in trace)


def test_server_errors_fail_commands_as_libnbd_reports_them(differ: Differ, tmp_path: os.PathLike[str]) -> None:
    trigger = os.path.join(tmp_path, "trigger")
    trace = differ.same(
        """
import os
trigger = PARAMS["trigger"]
h = nbd.NBD()
h.connect_command(["nbdkit", "-s", "--exit-with-parent", "--filter=error", "memory", "1M", "error=EIO",
                   "error-rate=1", "error-file=" + trigger])
open(trigger, "w").close()
attempt("pread", h.pread, 10, 0)
attempt("pwrite", h.pwrite, b"x", 0)
attempt("flush", h.flush)
cookie = attempt("aio_pread", h.aio_pread, bytearray(10), 0, recorder("completion"))
while h.aio_in_flight():
    h.poll(-1)
attempt("aio_command_completed", h.aio_command_completed, cookie)
attempt("aio_command_completed again", h.aio_command_completed, cookie)
def clears(err):
    rec("clears", err)
    err.value = 0
    return -1
cookie = attempt("aio_pread cleared", h.aio_pread, bytearray(10), 0, clears)
while h.aio_in_flight():
    h.poll(-1)
attempt("aio_command_completed cleared", h.aio_command_completed, cookie)
cookie = attempt("aio_pread retired", h.aio_pread, bytearray(10), 0, recorder("retires", 1))
while h.aio_in_flight():
    h.poll(-1)
attempt("retired is unknown", h.aio_command_completed, cookie)
attempt("peek", h.aio_peek_command_completed)
os.unlink(trigger)
def sets(err):
    rec("sets", err)
    err.value = 28
    return -1
cookie = attempt("aio_pread set", h.aio_pread, bytearray(10), 0, sets)
while h.aio_in_flight():
    h.poll(-1)
attempt("aio_command_completed set", h.aio_command_completed, cookie)
attempt("pread works again", h.pread, 4, 0)
""",
        trigger=trigger,
    )
    assert ["pread", "Error", 5, "EIO", "nbd_pread"] in trace
    assert ["aio_command_completed set", "Error", 28, "ENOSPC", "nbd_aio_command_completed"] in trace


def test_buffers(differ: Differ) -> None:
    differ.same(f"""
b = nbd.Buffer(4096)
rec("fresh", len(b), b.size(), b.is_zero(), b.is_zero(0, 0), b.is_zero(4095), b.to_bytearray()[:4])
for args in [(5000,), (0, 5000), (10, -2), (-1,)]:
    attempt("is_zero %r" % (args,), b.is_zero, *args)
shared = bytearray(b"abcdef")
s = nbd.Buffer.from_buffer(shared)
shared[0:1] = b"X"
rec("shared", s.to_bytearray(), len(s), s.is_zero())
c = nbd.Buffer.from_bytearray(shared)
shared[1:2] = b"Y"
rec("copied", c.to_bytearray(), c.to_buffer())
rec("from list", nbd.Buffer.from_bytearray([1, 2, 3]).to_bytearray())
attempt("from_buffer int", nbd.Buffer.from_buffer, 42)
h = nbd.NBD()
h.connect_command({MEMORY})
h.pwrite(b"\\x01" * 4096, 0)
cookie = h.aio_pread(b, 2048)
while not h.aio_command_completed(cookie):
    h.poll(-1)
rec("read into Buffer", b, b.is_zero(), b.is_zero(2048), b.is_zero(0, 2048))
view = bytearray(16)
cookie = h.aio_pread(view, 4090)
while not h.aio_command_completed(cookie):
    h.poll(-1)
rec("read into bytearray", view)
attempt("aio_pread into bytes", h.aio_pread, b"immutable", 0)
attempt("aio_pread into int", h.aio_pread, 7, 0)
cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(b"written"), 100)
while not h.aio_command_completed(cookie):
    h.poll(-1)
rec("written", h.pread(7, 100))
attempt("set_pread_initialize", h.set_pread_initialize, False)
junk = bytearray(b"\\xff" * 8)
cookie = h.aio_pread(junk, 8192)
while not h.aio_command_completed(cookie):
    h.poll(-1)
rec("read without initialising", junk)
""")


def test_debug_messages_name_each_call(differ: Differ) -> None:
    # libnbd logs its state machine's transitions too; the enter/leave lines of each call must match.
    differ.same(f"""
h = nbd.NBD()
messages = []
h.set_debug_callback(lambda context, message: messages.append((context, message)))
h.set_debug(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_command({MEMORY})
h.pread(4, 0)
attempt("pread past the end", h.pread, 4, 1 << 20)
h.get_size()
h.block_status(4096, 0, lambda *args: 0)
h.set_debug(False)
h.pread(4, 0)
h.set_debug(True)
h.shutdown()
rec([(context, message.split("=")[0]) for context, message in messages if message.startswith(("enter", "leave"))])
rec([message for context, message in messages if message.startswith("leave")])
h.set_debug(False)
del h
""")


def test_a_connected_socket_and_a_command_subprocess(differ: Differ) -> None:
    differ.same("""
import socket, subprocess
ours, theirs = socket.socketpair()
server = subprocess.Popen(["nbdkit", "-s", "--exit-with-parent", "memory", "1M"], stdin=theirs, stdout=theirs)
theirs.close()
h = nbd.NBD()
attempt("connect_socket", h.connect_socket, ours.detach())
attempt("pwrite", h.pwrite, b"via a socket", 0)
attempt("pread", h.pread, 12, 0)
attempt("get_uri", h.get_uri)
attempt("kill_subprocess", h.kill_subprocess, 0)
attempt("shutdown", h.shutdown)
rec("server exit", server.wait(30))
h = nbd.NBD()
attempt("connect_socket not a number", h.connect_socket, "3")
h = nbd.NBD()
attempt("connect_command not a list", h.connect_command, "nbdkit -s memory 1M")
attempt("connect_command nothing to run", h.connect_command, ["/nonexistent/server"])
attempt("state", h.connection_state)
h = nbd.NBD()
attempt("connect_command", h.connect_command, ["nbdkit", "-s", "--exit-with-parent", "memory", "1M"])
attempt("kill_subprocess bad", h.kill_subprocess, -1)
attempt("kill_subprocess", h.kill_subprocess, 9)
while not (h.aio_is_closed() or h.aio_is_dead()):
    h.poll(-1)
attempt("state", h.connection_state)
""")


def test_handles_are_named_as_libnbd_names_them() -> None:
    # Each side in a fresh interpreter: the binding makes two handles at import (package_name, __version__).
    require_binding()
    code = "h = nbd.NBD(); g = nbd.NBD(); print(h.get_handle_name(), g.get_handle_name())"
    real = subprocess.run(
        ["/usr/bin/python3", "-c", "import nbd; " + code], capture_output=True, text=True, timeout=60, env=PEER_ENV
    )
    ours = subprocess.run(
        [sys.executable, "-c", "from nbdproto import libnbd as nbd; " + code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert ours.stdout == real.stdout == "nbd3 nbd4\n", (real, ours)


@pytest.mark.parametrize("raised", ["AssertionError", "RuntimeError"])
def test_an_exception_in_a_callback(raised: str) -> None:
    # libnbd's binding prints it and counts the call as failed, except a failed assert, which aborts.
    require_binding("nbdkit")
    script = f"""
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_command(["nbdkit", "-s", "--exit-with-parent", "memory", "1M"])
def extent(*args):
    raise {raised}("from the callback")
try:
    h.block_status(4096, 0, extent)
except nbd.Error as e:
    print("failed", e.errno)
"""
    results = []
    for python, header in (("/usr/bin/python3", "import nbd"), (sys.executable, "from nbdproto import libnbd as nbd")):
        run = subprocess.run(
            [python, "-c", header + "\n" + script], capture_output=True, text=True, timeout=60, cwd=ROOT, env=PEER_ENV
        )
        assert f"{raised}: from the callback" in run.stderr
        results.append((run.returncode, run.stdout))
    assert results[0] == results[1]
    assert results[0] == ((-6, "") if raised == "AssertionError" else (0, "failed EPROTO\n"))
