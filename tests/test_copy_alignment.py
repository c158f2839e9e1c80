"""``nbdproto copy`` and the minimum block size: every request aligned to both ends, and the unaligned tail of a
disk whose size is not a multiple of it (issue 18 item 9).

The spec says such a tail cannot be reached by a client bound to the constraints ("the client would be unable
to access the final few bytes of the export"), but a client that did not ask for NBD_INFO_BLOCK_SIZE is not
bound, and a server enforcing constraints on it MUST fail its unaligned requests cleanly. So the copy asks for
the tail over one more connection that does not ask for block sizes: nbdkit's blocksize-policy filter lets it
through with ``blocksize-error-policy=allow`` (the whole disk is copied) and answers EINVAL with ``=error``;
our own servers refuse that connection (NBD_REP_ERR_BLOCK_SIZE_REQD). When refused, the copy stops before
copying anything and says which bytes cannot be reached and why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbdproto
import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from nbdproto.wire import STATUS_SPAN
from nbdproto_threads._copyloop import CopyLoop
from nbdproto_threads._copyruns import aligned_runs, pieces
from tests.capture import nbdkit

pytestmark = pytest.mark.timeout(60)
SIZE = 1000  # two 512-byte blocks would be 1024: the last 488 bytes are the unaligned tail


def pattern(size: int) -> bytes:
    """What nbdkit's pattern plugin serves: each 8-byte word holds its own offset, big-endian."""
    return b"".join((i * 8).to_bytes(8, "big") for i in range((size + 7) // 8))[:size]


def policy(plugin: str, error_policy: str) -> list[str]:
    """nbdkit arguments: ``plugin`` of SIZE bytes behind blocksize-policy with a minimum block size of 512."""
    return ["--filter=blocksize-policy", plugin, f"size={SIZE}", "blocksize-minimum=512", "blocksize-preferred=4096",
            "blocksize-maximum=65536", f"blocksize-error-policy={error_policy}"]  # fmt: skip


def run_copy(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "nbdproto", "copy", "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_tail_is_copied_when_the_server_allows_unaligned_requests(tmp_path: Path, peers: Any) -> None:
    peers("nbdkit")
    out = tmp_path / "out.img"
    with nbdkit(policy("pattern", "allow")) as port:
        done = run_copy(f"nbd://127.0.0.1:{port}/", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == pattern(SIZE)


def test_tail_is_written_into_an_export_that_allows_it(tmp_path: Path, peers: Any) -> None:
    peers("nbdkit")
    source, back = tmp_path / "source.img", tmp_path / "back.img"
    source.write_bytes(pattern(SIZE)[::-1])
    with nbdkit(policy("memory", "allow")) as port:
        uri = f"nbd://127.0.0.1:{port}/"
        assert run_copy(str(source), uri).returncode == 0
        done = run_copy(uri, str(back))
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == source.read_bytes()


def test_tail_refused_with_einval_stops_the_copy_before_it_starts(tmp_path: Path, peers: Any) -> None:
    peers("nbdkit")
    out = tmp_path / "out.img"
    with nbdkit(policy("pattern", "error")) as port:
        done = run_copy(f"nbd://127.0.0.1:{port}/", str(out))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert "the last 488 bytes (from offset 512) cannot be copied" in done.stderr, done.stderr
    assert "minimum block size 512" in done.stderr and "(0 of 1000 bytes copied)" in done.stderr


def test_tail_refused_by_our_server_names_block_size_reqd() -> None:
    """Our servers refuse GO without NBD_INFO_BLOCK_SIZE for an export with a minimum block size: the copy says
    so (the exception it raises carries the reason as UnreachableTail)."""
    device = MemoryDevice(SIZE)
    spec = nbdproto.ExportSpec(device, block_sizes=(512, 4096, 65536))
    server = nt.Server({"": spec}, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(nt.CopyFailed) as failed:
            nt.copy(f"nbd://127.0.0.1:{server.address[1]}/", "null:")
    finally:
        server.shutdown()
        thread.join(10)
    assert failed.value.copied == 0
    cause = failed.value.__cause__
    assert isinstance(cause, nt.UnreachableTail) and (cause.offset, cause.length) == (512, 488)
    assert isinstance(cause.__cause__, nbdproto.NegotiationError)
    assert cause.__cause__.reply_type == nbdproto.OptionReplyType.ERR_BLOCK_SIZE_REQD


class Runs:
    """A CopySource stand-in for aligned_runs: runs given as (length, is_zero)."""

    def __init__(self, *runs: tuple[int, bool]) -> None:
        self._runs = runs

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        at = 0
        for size, zero in self._runs:
            yield at, size, zero
            at += size


def test_zero_runs_keep_whole_blocks_and_give_partial_ones_to_data() -> None:
    source: Any = Runs((100, False), (1000, True), (10, False), (2000, True), (986, False))
    assert list(aligned_runs(source.runs, 4096, 512)) == [(0, 512, False), (512, 1024, True), (1024, 1536, False),
                                                      (1536, 3072, True), (3072, 4096, False)]  # fmt: skip
    # Adjacent runs of a kind are one run; with no alignment nothing moves.
    source = Runs((100, False), (100, False), (50, True), (50, True))
    assert list(aligned_runs(source.runs, 300, 1)) == [(0, 200, False), (200, 300, True)]


def test_pieces_are_aligned_and_zero_runs_fit_a_compact_request() -> None:
    source: Any = Runs((3 * STATUS_SPAN, True), (1 << 20, False))
    requests = list(pieces(source.runs, 3 * STATUS_SPAN + (1 << 20), 1 << 19, 4096))
    assert all(length <= STATUS_SPAN and offset % 4096 == 0 and length % 4096 == 0 for offset, length, _ in requests)
    assert sum(length for _, length, _ in requests) == 3 * STATUS_SPAN + (1 << 20)
    assert [zero for _, _, zero in requests] == [True] * 3 + [False] * 2


def test_a_copy_to_null_drops_read_data_in_the_kernel_and_keeps_every_reply_in_step(peers: Any) -> None:
    """To null: the read data is discarded without being copied out (MSG_TRUNC) on every connection, the
    unaligned tail's own connection included, while the engines still count every byte: a reply parsed one
    byte out of step would fail the copy."""
    peers("nbdkit")
    seen: list[nt.CopyProgress] = []
    with nbdkit(policy("pattern", "allow")) as port:
        done = nt.copy(f"nbd://127.0.0.1:{port}/", "null:", request_size=512, requests=4, progress=seen.append)
    assert (done.copied, done.data) == (SIZE, SIZE) and seen[-1].copied == SIZE
    device = MemoryDevice(8 << 20)
    device.pwrite(os.urandom(8 << 20), 0)
    server = nt.Server({"": device}, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        done = nt.copy(f"nbd://127.0.0.1:{server.address[1]}/", "null:", connections=4, request_size=65536)
    finally:
        server.shutdown()
        thread.join(10)
    assert (done.copied, done.data) == (8 << 20, 8 << 20)


def test_work_that_ends_after_the_loop_closed_writes_to_no_descriptor(caplog: pytest.LogCaptureFixture) -> None:
    """A copy cut short closes its loop without waiting (close(wait=False)); file I/O already running in a
    worker ends later and must not write its wake-up into the closed pipe, whose descriptor number the next
    open file may have taken (the CI failure: "Bad file descriptor" printed after a Ctrl-C)."""
    loop = CopyLoop()
    started, release = threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(10)

    loop.in_thread(work, lambda: None)
    assert started.wait(10)
    assert loop.workers is not None
    workers = loop.workers
    loop.close(wait=False)
    pipes = [os.pipe() for _ in range(3)]  # the wake pipe's numbers, taken again by new files
    try:
        release.set()
        workers.shutdown(wait=True)  # the work ends and its done-callback runs
        for reader, _ in pipes:
            os.set_blocking(reader, False)
            with pytest.raises(BlockingIOError):
                os.read(reader, 1)
        assert not [r for r in caplog.records if r.name == "concurrent.futures"]  # "exception calling callback"
    finally:
        for pipe in pipes:
            for fd in pipe:
                os.close(fd)
