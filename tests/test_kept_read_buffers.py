"""The buffers of a pipelined connection's read replies, kept for its reads to come (nbdproto.serving's
ReplyBuffers), on every backend: a busy connection keeps what it has in flight, and an idle one gives what it
keeps beyond KEPT_REPLY_BYTES back when another connection is about to wait for that memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest

import nbdproto
import nbdproto.libnbd
import nbdproto_threads
from nbdproto.serving import KEPT_REPLY_BYTES
from tests.serving import BACKENDS, Export, serving
from tests.test_pipelined_replies import _Remote

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


def _memory_used(server: Any) -> int:
    shared = getattr(server, "_memory", None) or server._budget  # (threads, anyio)
    return int(shared.budget.used)


def _settled(ready: Callable[[], bool]) -> bool:
    """Whether ``ready()`` comes true within ten seconds (the server gives budgets back after it sends)."""
    deadline = time.monotonic() + 10
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    return ready()


def _reads_at_once(uri: str, server: Any, device: _Remote, count: int, length: int) -> nbdproto.libnbd.NBD:
    """A client that sends ``count`` reads of ``length`` bytes at once and takes all their replies (nbdcopy's
    way), then stays connected, idle. The remote answers once the server holds them all (all in flight at
    once, however the server's receives cut them)."""
    handle = nbdproto.libnbd.NBD()
    handle.connect_uri(uri)
    device.go.clear()
    for index in range(count):
        handle.aio_pread(nbdproto.libnbd.Buffer(length), index * length)
    deadline = time.monotonic() + 10
    while _memory_used(server) < count * length and time.monotonic() < deadline:
        handle.poll(10)
    assert _memory_used(server) == count * length
    device.go.set()
    while handle.aio_in_flight():
        handle.poll(10_000)
    return handle


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_idle_connection_gives_its_kept_read_buffers_back_before_another_would_wait(backend: str) -> None:
    """The first client reads 16 MiB at once, each read's buffer kept once its reply is sent, and goes idle; the
    second then reads 32 MiB in one request from a server whose memory is 40 MiB. The first connection's kept
    buffers beyond KEPT_REPLY_BYTES are given back only now, as the second is about to wait for them, so the
    read is answered: kept for ever, it would wait for ever."""
    device = _Remote(64 * MIB)
    device.pwrite(bytes(range(256)) * (32 * MIB // 256), 0)
    limits = nbdproto.ServerLimits(memory_limit=40 * MIB)
    with contextlib.ExitStack() as stack:
        uri, server = stack.enter_context(serving(backend, {"": Export(device)}, limits=limits))
        first = _reads_at_once(uri.format(""), server, device, 64, 256 * 1024)
        stack.callback(first.close)
        assert _settled(lambda: _memory_used(server) > 40 * MIB - 32 * MIB)  # kept until wanted: more than it can spare
        second = stack.enter_context(nbdproto_threads.connect(uri.format(""), timeout=20))
        assert second.pread(32 * MIB, 0) == bytes(range(256)) * (32 * MIB // 256)
        assert _memory_used(server) <= KEPT_REPLY_BYTES + 32 * MIB  # the first holds no more than the bound
