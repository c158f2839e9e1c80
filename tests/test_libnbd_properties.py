"""Property tests: hypothesis makes sequences of operations (reads, writes, zeroes, trims, flushes, caches,
block status with and without REQ_ONE, and batches of aio commands in flight together whose replies may come
in any order), and each sequence must give the same trace under libnbd's binding and nbdproto.libnbd, on a
fresh nbdkit memory export and on a fresh export of our own threads server. The example count is kept low:
each example starts two servers and runs two scripts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdproto.devices import MemoryDevice
from tests.libnbd_diff import Differ, Params, Workers, libnbd_workers, require_binding  # noqa: F401
from tests.serving import Export, serve_exports

pytestmark = pytest.mark.peers

SIZE = 1 << 20
SLOT = 65536

SCRIPT = """
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
if PARAMS.get("uri"):
    h.connect_uri(PARAMS["uri"])
else:
    h.connect_command(["nbdkit", "-s", "--exit-with-parent", "memory", str(PARAMS["size"])])
def data(length, first):
    return bytes((first + i) % 251 for i in range(length)) if length < 4096 else bytes([first]) * length
for index, op in enumerate(PARAMS["ops"]):
    kind, args = op[0], op[1:]
    label = "%d %s" % (index, kind)
    if kind == "pread":
        attempt(label, h.pread, args[0], args[1])
    elif kind == "pwrite":
        attempt(label, h.pwrite, data(args[0], args[2]), args[1], args[3])
    elif kind in ("zero", "trim", "cache"):
        attempt(label, getattr(h, kind), args[0], args[1], args[2])
    elif kind == "flush":
        attempt(label, h.flush)
    elif kind == "block_status":
        attempt(label, h.block_status, args[0], args[1], recorder(label + " extent"), args[2])
    elif kind == "aio":
        completions, results, buffers = [], [], {}
        def completion(position):
            def callback(err):
                completions.append((position, err.value))
                return 0
            return callback
        for position, (sub, count, offset, extra) in enumerate(args[0]):
            try:
                if sub == "aio_pread":
                    buffers[position] = nbd.Buffer(count)
                    cookie = h.aio_pread(buffers[position], offset, completion(position))
                elif sub == "aio_pwrite":
                    cookie = h.aio_pwrite(data(count, extra), offset, completion(position))
                else:
                    cookie = getattr(h, sub)(count, offset, completion(position), extra)
                results.append((position, cookie))
            except nbd.Error as e:
                failure("%s %d %s" % (label, position, sub), e)
        rec(label + " in flight", h.aio_in_flight())
        while h.aio_in_flight():
            h.poll(-1)
        for position, cookie in results:
            attempt("%s %d retired" % (label, position), h.aio_command_completed, cookie)
        rec(label + " completions", sorted(completions))
        rec(label + " read", sorted(buffers.items()))
rec("final", h.pread(PARAMS["size"], 0))
h.shutdown()
"""


def _ranges() -> st.SearchStrategy[tuple[int, int]]:
    """(count, offset): mostly inside the export, sometimes empty, unaligned or past its end."""
    offset = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([0, 512, 4096, SIZE - 512, SIZE, SIZE + 4096]))
    count = st.one_of(st.integers(1, 3 * SLOT), st.sampled_from([0, 1, 512, 4096, SLOT, SIZE]))
    return st.tuples(count, offset)


def _operation() -> st.SearchStrategy[list[Any]]:
    first_byte = st.integers(0, 250)
    fua = st.sampled_from([0, 1])
    zero_flags = st.sampled_from([0, 1, 2, 3, 0x10])
    return st.one_of(
        _ranges().map(lambda r: ["pread", *r]),
        st.tuples(_ranges(), first_byte, fua).map(lambda t: ["pwrite", *t[0], t[1], t[2]]),
        st.tuples(_ranges(), zero_flags).map(lambda t: ["zero", *t[0], t[1]]),
        st.tuples(_ranges(), fua).map(lambda t: ["trim", *t[0], t[1]]),
        _ranges().map(lambda r: ["cache", *r, 0]),
        st.just(["flush"]),
        st.tuples(_ranges(), st.sampled_from([0, 8])).map(lambda t: ["block_status", *t[0], t[1]]),
        _aio_batch(),
    )


def _aio_batch() -> st.SearchStrategy[list[Any]]:
    """Up to six aio commands, each in its own 64 KiB slot (so that their order on the server cannot change
    what a read sees), submitted together."""

    def build(choices: list[tuple[int, str, int, int]]) -> list[Any]:
        used: set[int] = set()
        batch = []
        for slot, kind, count, extra in choices:
            if slot in used:
                continue
            used.add(slot)
            batch.append([kind, min(count, SLOT), slot * SLOT, extra])
        return ["aio", batch]

    one = st.tuples(
        st.integers(0, SIZE // SLOT - 1),
        st.sampled_from(["aio_pread", "aio_pwrite", "aio_zero", "aio_trim", "aio_cache"]),
        st.integers(1, SLOT),
        st.integers(0, 250),
    ).map(
        lambda t: (t[0], "aio_cache" if t[1] == "aio_flush_like" else t[1], t[2], t[3] if t[1] == "aio_pwrite" else 0)
    )
    return st.lists(one, min_size=1, max_size=6).map(build)


@contextlib.contextmanager
def _fresh_nbdkit() -> Iterator[Params]:
    yield {"size": SIZE}


@contextlib.contextmanager
def _fresh_ours() -> Iterator[Params]:
    with serve_exports("threads", {"": Export(MemoryDevice(SIZE))}) as base:
        yield {"size": SIZE, "uri": base.format("")}


@pytest.mark.parametrize("server", [_fresh_nbdkit, _fresh_ours], ids=["nbdkit", "ours"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_operation(), min_size=1, max_size=12))
def test_operation_sequences_give_the_same_trace(
    libnbd_workers: Workers,  # noqa: F811
    server: Any,
    ops: list[list[Any]],
) -> None:
    require_binding("nbdkit")
    Differ(libnbd_workers).same(SCRIPT, server, ops=ops)
