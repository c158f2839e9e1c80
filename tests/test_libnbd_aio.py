"""nbdproto.libnbd against libnbd's binding: the asynchronous API. Commands in flight together and completing
out of order, completion callbacks and their retirement, peek/completed/in-flight bookkeeping, a script's own
poll loop on aio_get_fd and aio_get_direction, the aio connect and option calls, and disconnecting with
commands in flight."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.libnbd_diff import Differ, Workers, libnbd_workers, require_binding  # noqa: F401

pytestmark = pytest.mark.peers

SLOW_FIRST_BLOCK = """#!/usr/bin/env bash
# 1 MiB of zeroes; a read of the first 4 KiB takes half a second, the others none (requests run in parallel).
case "$1" in
  get_size) echo 1048576 ;;
  thread_model) echo parallel ;;
  pread) if [ "$4" -lt 4096 ]; then sleep 0.5; fi; dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  *) exit 2 ;;
esac
"""

MEMORY = '["nbdkit", "-s", "--exit-with-parent", "memory", "1M"]'


@pytest.fixture
def differ(libnbd_workers: Workers) -> Iterator[Differ]:  # noqa: F811
    require_binding("nbdkit")
    yield Differ(libnbd_workers)


def test_replies_out_of_order(differ: Differ, tmp_path: os.PathLike[str]) -> None:
    plugin = os.path.join(tmp_path, "slow.sh")
    with open(plugin, "w") as f:
        f.write(SLOW_FIRST_BLOCK)
    os.chmod(plugin, 0o755)
    trace = differ.same(
        """
h = nbd.NBD()
h.connect_command(["nbdkit", "-s", "--exit-with-parent", "sh", PARAMS["plugin"]])
order = []
def completion(label):
    def callback(err):
        order.append((label, err.value))
        return 0
    return callback
buffers = {offset: nbd.Buffer(4096) for offset in (0, 4096, 8192, 65536)}
cookies = {attempt("aio_pread %d" % offset, h.aio_pread, buffer, offset, completion(offset)): offset
           for offset, buffer in buffers.items()}
attempt("aio_in_flight", h.aio_in_flight)
attempt("aio_peek_command_completed", h.aio_peek_command_completed)
while h.aio_in_flight() > 1:
    h.poll(-1)
rec("the slow one is still in flight", sorted(offset for offset, _ in order), h.aio_in_flight())
while h.aio_in_flight():
    h.poll(-1)
rec("last", order[-1])
rec("all", sorted(order))
completed = []
while True:
    try:
        cookie = h.aio_peek_command_completed()
    except nbd.Error as e:
        failure("peek when none is left", e)
        break
    completed.append(cookies[cookie])
    attempt("aio_command_completed", h.aio_command_completed, cookie)
rec("completed", sorted(completed), completed[-1])
rec("buffers", [buffer.is_zero() for buffer in buffers.values()])
""",
        plugin=plugin,
    )
    assert ["last", [0, 0]] in trace


def test_commands_in_flight_together(differ: Differ) -> None:
    differ.same(f"""
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_command({MEMORY})
written = nbd.Buffer.from_bytearray(bytes(range(256)) * 16)
heard = []  # callbacks run when replies arrive, which may be during a later call: recorded apart
def note(label, returns=0):
    def callback(*args):
        heard.append(norm([label, *args]))
        return returns
    return callback
cookies = []
cookies.append(attempt("aio_pwrite", h.aio_pwrite, written, 0, note("write done", 1)))
cookies.append(attempt("aio_pwrite bytes", h.aio_pwrite, b"y" * 100, 8192, None, nbd.CMD_FLAG_FUA))
cookies.append(attempt("aio_flush", h.aio_flush, note("flush done")))
cookies.append(attempt("aio_zero", h.aio_zero, 4096, 65536))
cookies.append(attempt("aio_trim", h.aio_trim, 4096, 131072, None, nbd.CMD_FLAG_FUA))
cookies.append(attempt("aio_cache", h.aio_cache, 4096, 65536))
cookies.append(attempt("aio_block_status", h.aio_block_status, 1 << 20, 65536, note("extent"), note("bs done")))
attempt("aio_in_flight", h.aio_in_flight)
attempt("aio_peek_command_completed", h.aio_peek_command_completed)
attempt("completed before any reply", h.aio_command_completed, cookies[1])
attempt("aio_pwrite bad flag", h.aio_pwrite, b"x", 0, None, nbd.CMD_FLAG_REQ_ONE)
attempt("aio_pread past the end", h.aio_pread, nbd.Buffer(2), (1 << 20) - 1)
attempt("aio_pread not callable", h.aio_pread, nbd.Buffer(2), 0, 42)
while h.aio_in_flight():
    h.poll(-1)
rec("heard", sorted(heard))
attempt("aio_in_flight", h.aio_in_flight)
rec("retired by its callback", h.aio_command_completed(cookies[0]))
rec("completed", sorted(h.aio_command_completed(cookie) for cookie in cookies[1:]))
attempt("completed twice", h.aio_command_completed, cookies[1])
attempt("unknown cookie", h.aio_command_completed, 999)
attempt("peek with none", h.aio_peek_command_completed)
read = nbd.Buffer(8192 + 100)
cookie = h.aio_pread(read, 0)
while not h.aio_command_completed(cookie):
    h.poll(-1)
rec("read back", read)
attempt("poll with nothing in flight", h.poll, 0)
""")


def test_a_main_loop_of_the_scripts_own(differ: Differ) -> None:
    # The loop libnbd(3) describes: the script waits on aio_get_fd in aio_get_direction, then notifies.
    differ.same(f"""
import select
h = nbd.NBD()
attempt("created", h.aio_is_created)
attempt("aio_connect_command", h.aio_connect_command, {MEMORY})
def loop(done):
    while not done():
        direction = h.aio_get_direction()
        events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0)
        events |= select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0
        poller = select.poll()
        poller.register(h.aio_get_fd(), events)
        for fd, revents in poller.poll(10000):
            if revents & (select.POLLIN | select.POLLHUP) and direction & nbd.AIO_DIRECTION_READ:
                h.aio_notify_read()
            elif revents & select.POLLOUT and direction & nbd.AIO_DIRECTION_WRITE:
                h.aio_notify_write()
loop(lambda: not h.aio_is_connecting())
for name in ["aio_is_ready", "aio_is_connecting", "aio_is_processing", "get_size", "aio_get_direction"]:
    attempt(name, getattr(h, name))
data = bytes(range(256)) * 4096
cookies = [h.aio_pwrite(data, 0), h.aio_pwrite(data[:65536], 1 << 19)]
loop(lambda: h.aio_in_flight() == 0)
rec("writes", [h.aio_command_completed(cookie) for cookie in cookies])
buffers = [nbd.Buffer(65536) for _ in range(16)]
cookies = [h.aio_pread(buffer, index * 65536) for index, buffer in enumerate(buffers)]
loop(lambda: h.aio_in_flight() == 0)
rec("reads", [h.aio_command_completed(cookie) for cookie in cookies], buffers)
h.aio_disconnect()
loop(lambda: h.aio_is_closed())
attempt("closed", h.aio_is_closed)
attempt("aio_get_fd", h.aio_get_fd)
attempt("aio_get_direction", h.aio_get_direction)
""")


def test_disconnecting_with_commands_in_flight(differ: Differ) -> None:
    differ.same(f"""
h = nbd.NBD()
h.connect_command({MEMORY})
cookie = h.aio_pwrite(b"x" * 10, 0)
attempt("aio_disconnect", h.aio_disconnect)
attempt("aio_in_flight", h.aio_in_flight)
attempt("aio_pread after", h.aio_pread, bytearray(2), 0)
attempt("aio_disconnect again", h.aio_disconnect)
attempt("aio_disconnect bad flag", h.aio_disconnect, nbd.CMD_FLAG_FUA)
while not h.aio_is_closed():
    h.poll(-1)
attempt("state", h.connection_state)
attempt("aio_in_flight", h.aio_in_flight)
try:  # nbdkit's threads may take the DISC first and refuse the write (ESHUTDOWN): its race, not the client's
    rec("aio_command_completed: done, or refused at shutdown", h.aio_command_completed(cookie))
except nbd.Error as exc:
    rec("aio_command_completed: done, or refused at shutdown", exc.errno == "ESHUTDOWN")
attempt("poll", h.poll, 0)
h = nbd.NBD()
h.connect_command({MEMORY})
attempt("shutdown abandoning", h.shutdown, nbd.SHUTDOWN_ABANDON_PENDING)
attempt("state", h.connection_state)
h = nbd.NBD()
h.connect_command({MEMORY})
attempt("shutdown bad flag", h.shutdown, 1)
""")


def test_the_aio_option_calls(differ: Differ) -> None:
    # An answer may come before the aio call returns or in the wait after it: the callbacks are recorded apart.
    differ.same("""
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
attempt("aio_connect_command", h.aio_connect_command, ["nbdkit", "-s", "--exit-with-parent", "-e", "main",
        "--filter=exportname", "memory", "1M", "exportname=main", "exportname=other", "exportname-strict=true"])
while h.aio_is_connecting():
    h.poll(-1)
attempt("negotiating", h.aio_is_negotiating)
heard = []
def note(label):
    def callback(*args):
        heard.append(norm([label, *args]))
        return 0
    return callback
def wait():
    while h.aio_is_connecting():
        h.poll(-1)
    rec("heard", heard[:])
    del heard[:]
    rec("negotiating", h.aio_is_negotiating(), h.aio_is_ready())
attempt("aio_opt_list", h.aio_opt_list, note("export"), note("list done"))
wait()
attempt("aio_opt_list_meta_context", h.aio_opt_list_meta_context, note("context"), note("contexts done"))
wait()
attempt("set_export_name", h.set_export_name, "nosuch")
attempt("aio_opt_info", h.aio_opt_info, note("info done"))
wait()
attempt("aio_opt_go", h.aio_opt_go, note("go done"))
wait()
attempt("set_export_name", h.set_export_name, "other")
attempt("aio_opt_info", h.aio_opt_info)
wait()
attempt("get_size", h.get_size)
attempt("aio_opt_go", h.aio_opt_go, note("go done"))
wait()
attempt("can_meta_context", h.can_meta_context, nbd.CONTEXT_BASE_ALLOCATION)
attempt("pread", h.pread, 4, 0)
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_command(["nbdkit", "-s", "--exit-with-parent", "memory", "1M"])
attempt("aio_opt_abort", h.aio_opt_abort)
while h.aio_is_connecting():
    h.poll(-1)
attempt("closed", h.aio_is_closed)
""")
