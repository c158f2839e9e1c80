"""Pipelined replies leave from the device's thread that completed them (nbdproto.serving.ReplyOutbox), on every
backend: the event-loop server's replies do not wait for its loop, and the budget those replies held comes back
all the same (to the connection, and to another connection waiting for the server's memory)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import anyio
import anyio.from_thread
import pytest

import nbdproto
import nbdproto_anyio
import nbdproto_anyio._budget
import nbdproto_threads
from nbdproto.devices import MemoryDevice
from tests.serving import BACKENDS, Export, make_pki, serve_exports
from tests.test_pipelined_batch import carry_out_calls
from tests.threaded import run_threads

pytestmark = pytest.mark.timeout(60)

KIB = 1 << 10


class _Remote(MemoryDevice):
    """A memory device that takes calls as a remote export does (``submit``), answering each batch from a thread
    of its own, once ``go`` is set (it is, unless a test clears it)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.arrived = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.answered_by: set[str] = set()

    def submit(self, calls: Any, tokens: Any, completions: Any) -> None:
        def answer() -> None:
            assert self.go.wait(20)
            self.answered_by.add(threading.current_thread().name)
            carry_out_calls(self, calls, tokens, completions)

        threading.Thread(target=answer, name="remote-reader", daemon=True).start()
        self.arrived.set()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_reply_leaves_while_the_event_loop_is_busy(backend: str) -> None:
    """Once a read reached the remote, a task blocks the server's event loop until the client has its reply, and
    only then does the remote answer it: only the remote's thread can have sent the reply. (A server that woke
    its loop to send would leave the client waiting: the task's wait would run out first.)"""
    device = _Remote(64 * KIB)
    device.pwrite(b"proxied!" * 512, 4 * KIB)
    device.go.clear()
    answered = threading.Event()
    waited: list[bool] = []

    async def block_the_loop_once_the_read_arrived() -> None:
        with anyio.fail_after(20):
            while not device.arrived.is_set():
                await anyio.sleep(0.01)
        device.go.set()
        waited.append(answered.wait(20))  # (blocking: nothing else runs on this loop meanwhile)

    server = nbdproto_anyio.Server({"": nbdproto.ExportSpec(device)})
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        listener = portal.call(nbdproto_anyio.listen, ("127.0.0.1", 0))
        serving = portal.start_task_soon(server.serve, listener)
        blocking = portal.start_task_soon(block_the_loop_once_the_read_arrived)
        try:
            with nbdproto_threads.connect(f"nbd://127.0.0.1:{listener.address[1]}/", timeout=30) as client:
                assert client.pread(4 * KIB, 4 * KIB) == b"proxied!" * 512
                answered.set()
            blocking.result(timeout=30)
        finally:
            serving.cancel()
            with contextlib.suppress(BaseException):
                serving.result(timeout=10)
    assert waited == [True] and device.answered_by == {"remote-reader"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_many_requests_at_once_each_get_their_own_reply(backend: str, tls: bool) -> None:
    """Eight threads of one client, each writing and reading back its own blocks, 40 times: every reply sent by
    whichever thread completed it (over TLS: by the connection's sender) carries its own request's data."""
    device = _Remote(2 << 20)
    with contextlib.ExitStack() as stack:
        pki = stack.enter_context(make_pki())
        uri = stack.enter_context(serve_exports(backend, {"": Export(device)}, tls=pki.server_context if tls else None))
        client = stack.enter_context(
            nbdproto_threads.connect(uri.format(""), timeout=30, tls=pki.client_context if tls else None)
        )

        def work(worker: int) -> None:
            for round_ in range(40):
                offset = (worker * 40 + round_) * 4 * KIB
                data = bytes([worker + 1, round_ + 1]) * 2 * KIB
                client.pwrite(data, offset)
                assert client.pread(4 * KIB, offset) == data

        run_threads(work, 8)
    assert device.answered_by == {"remote-reader"}


def test_a_connection_about_to_wait_for_memory_has_replies_sent_elsewhere_give_theirs_back_first() -> None:
    """The event-loop server's budgets are its loop's: a connection whose replies other threads sent gives their
    memory back when its loop next looks (``settle``), and a connection about to wait for memory has every such
    connection do so first, rather than wait for memory that is free already."""
    shared = nbdproto_anyio._budget.SharedBudget(4 << 20)  # (1 MiB of it guaranteed to each)
    first, second = nbdproto_anyio._budget.WaitingShare(shared), nbdproto_anyio._budget.WaitingShare(shared)
    settled: list[int] = []

    def settle() -> None:  # what the first connection's replies, sent by other threads, held
        if first.held:
            settled.append(first.held)
            first.give(first.held)

    async def main() -> None:
        await first.take(4 << 20)
        first.settle_with(settle)
        with anyio.fail_after(10):
            await second.take(2 << 20)
        assert settled == [4 << 20] and second.held == 2 << 20
        first.settle_with(None)
        assert not shared.budget.settlers

    anyio.run(main)
