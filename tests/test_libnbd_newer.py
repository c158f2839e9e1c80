"""nbdproto.libnbd beyond what Debian's libnbd 1.14 can be compared with: the calls newer libnbd releases added
(extended headers and 64-bit block status, stats_*, opt_starttls / opt_structured_reply / opt_extended_headers,
explicit meta context queries, close() and ClosedHandle, the nbd() context manager), nbdproto's own
set_wait_timeout, several threads sharing one handle, servers that break the protocol, and the package rule
that nothing here imports a backend."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from nbdproto import libnbd as nbd
from nbdproto.devices import MemoryDevice
from tests.conftest import require_peers
from tests.hostile_server import CONTENT, SIZE, serve_case
from tests.serving import Export, make_pki, serve_exports
from tests.test_hostile_servers import CASE_IDS, CASES, STATUS_LENGTH

MEMORY = ["nbdkit", "-s", "--exit-with-parent", "memory", "1M"]


@pytest.fixture
def our_uri() -> Iterator[str]:
    with serve_exports("threads", {"disk": Export(MemoryDevice(1 << 20))}) as base:
        yield base.format("disk")


def test_extended_headers_and_64_bit_block_status(our_uri: str) -> None:
    h = nbd.NBD()
    assert h.get_request_extended_headers()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(our_uri)
    assert h.get_extended_headers_negotiated() and h.get_structured_replies_negotiated()
    h.pwrite(b"x" * 8192, 65536)
    narrow: list[object] = []
    wide: list[object] = []
    h.block_status(1 << 20, 0, lambda context, offset, entries, err: narrow.append((context, offset, entries)))
    h.block_status_64(1 << 20, 0, lambda context, offset, entries, err: wide.append((context, offset, entries)))
    expected = [(65536, 3), (65536, 0), (1048576 - 131072, 3)]  # the memory device allocates 64 KiB at a time
    assert wide == [("base:allocation", 0, expected)]
    assert narrow == [("base:allocation", 0, [number for pair in expected for number in pair])]
    assert h.can_block_status_payload()
    chosen: list[object] = []
    h.block_status_filter(1 << 20, 0, [nbd.CONTEXT_BASE_ALLOCATION], lambda *args: chosen.append(args[:3]))
    assert chosen == wide
    with pytest.raises(nbd.Error) as refused:
        h.block_status_filter(1 << 20, 0, ["qemu:allocation-depth"], lambda *args: 0)
    assert refused.value.errno == "EINVAL"
    done: list[int] = []
    cookie = h.aio_block_status_64(4096, 65536, lambda *args: done.append(args[2][0][0]), lambda err: err.value)
    while h.aio_in_flight():
        h.poll(-1)
    assert h.aio_command_completed(cookie) and done == [4096]
    assert h.get_block_size(nbd.SIZE_PAYLOAD) > 0
    h.shutdown()

    plain = nbd.NBD()
    plain.set_request_extended_headers(False)
    plain.connect_uri(our_uri)
    assert not plain.get_extended_headers_negotiated() and plain.get_structured_replies_negotiated()
    assert plain.pread(8, 65536) == b"x" * 8


def test_stats_count_what_went_over_the_wire(our_uri: str) -> None:
    h = nbd.NBD()
    assert (h.stats_bytes_sent(), h.stats_bytes_received()) == (0, 0)
    h.connect_uri(our_uri)
    sent, received, chunks_in = h.stats_bytes_sent(), h.stats_bytes_received(), h.stats_chunks_received()
    assert sent > 0 and received > 0 and chunks_in > 0 and h.stats_chunks_sent() > 0
    h.pread(1 << 20, 0)
    assert h.stats_bytes_received() >= received + (1 << 20)
    assert h.stats_bytes_sent() >= sent + 28 and h.stats_chunks_received() == chunks_in + 1
    h.pwrite(b"y" * 4096, 0)
    assert h.stats_bytes_sent() >= sent + 28 * 2 + 4096


def test_the_qemu_constants_and_the_context_manager() -> None:
    assert nbd.CONTEXT_QEMU_DIRTY_BITMAP + "b1" == "qemu:dirty-bitmap:b1"
    assert nbd.CONTEXT_QEMU_ALLOCATION_DEPTH == "qemu:allocation-depth"
    assert (nbd.NAMESPACE_QEMU, nbd.STATE_DIRTY, nbd.SIZE_PAYLOAD, nbd.CMD_FLAG_PAYLOAD_LEN) == ("qemu:", 1, 3, 0x20)
    with nbd.nbd() as h:
        assert h.aio_is_created()
    with pytest.raises(nbd.ClosedHandle):
        h.get_size()
    g = nbd.NBD()
    g.close()
    with pytest.raises(nbd.ClosedHandle):
        g.close()
    assert not g.aio_is_ready() and g.aio_get_direction() == 0


def test_the_option_calls_of_newer_releases(our_uri: str) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_request_structured_replies(False)
    h.set_request_extended_headers(False)
    h.set_request_meta_context(False)
    h.set_export_name("disk")
    h.connect_uri(our_uri)
    assert not h.get_structured_replies_negotiated()
    assert h.opt_structured_reply() and h.get_structured_replies_negotiated()
    assert h.opt_extended_headers() and h.get_extended_headers_negotiated()
    assert not h.opt_starttls()  # this server has no TLS: it refuses, the connection goes on
    listed: list[str] = []
    assert h.opt_list_meta_context_queries(["base:"], listed.append) == 1 and listed == ["base:allocation"]
    chosen: list[str] = []
    assert h.opt_set_meta_context_queries([nbd.CONTEXT_BASE_ALLOCATION], chosen.append) == 1
    assert chosen == ["base:allocation"] and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()  # set_request_meta_context(False): the contexts set above are kept
    seen: list[str] = []
    h.block_status(4096, 0, lambda context, *rest: seen.append(context))
    assert seen == ["base:allocation"]


def test_opt_starttls_upgrades(tmp_path: os.PathLike[str]) -> None:
    require_peers("nbdkit")
    with make_pki() as pki:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.set_tls_certificates(pki.directory)
        h.connect_command(["nbdkit", "-s", "--exit-with-parent", "--tls=on", "--tls-certificates=" + pki.directory,
                           "memory", "1M"])  # fmt: skip
        assert not h.get_tls_negotiated()
        assert h.opt_starttls() and h.get_tls_negotiated()
        h.opt_go()
        h.pwrite(b"over TLS", 0)
        assert h.pread(8, 0) == b"over TLS"


def test_the_wait_timeout_bounds_a_stalled_server() -> None:
    require_peers("nbdkit")
    h = nbd.NBD()
    h.connect_command(["nbdkit", "-s", "--exit-with-parent", "--filter=delay", "memory", "1M", "delay-read=30"])
    with pytest.raises(nbd.Error) as refused:
        h.set_wait_timeout(0)
    assert refused.value.errno == "EINVAL"
    h.set_wait_timeout(0.3)
    with pytest.raises(nbd.Error) as timed_out:
        h.pread(512, 0)
    assert timed_out.value.errno == "ETIMEDOUT" and h.aio_is_dead()


def test_poll2_wakes_for_its_file_descriptor(our_uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(our_uri)
    reader, writer = os.pipe()
    try:
        h.aio_pread(nbd.Buffer(4096), 0)
        while h.aio_in_flight():
            assert h.poll2(reader, 10000) == 1
        os.write(writer, b"!")
        assert h.poll2(reader, 10000) == 1  # nothing in flight: only the pipe can wake it
    finally:
        os.close(reader)
        os.close(writer)


def test_threads_share_a_handle(our_uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(our_uri)
    for index in range(4):
        h.pwrite(bytes([index + 1]) * 65536, index * 65536)
    failures: list[BaseException] = []

    def reader(index: int) -> None:
        try:
            for _ in range(50):
                assert h.pread(65536, index * 65536) == bytes([index + 1]) * 65536
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=reader, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures and not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_hostile_server_kills_the_handle_with_an_error(case: object) -> None:
    # The binding's errors only: every broken rule is an nbd.Error naming it, the handle then dead.
    with serve_case(case) as uri:  # type: ignore[arg-type]
        h = nbd.NBD()
        h.set_wait_timeout(20)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_uri(uri)
            h.block_status(min(h.get_size(), STATUS_LENGTH), 0, lambda *args: 0)
            data = h.pread(SIZE, 0)
        except nbd.Error as exc:
            assert case.match is not None, f"{case}: {exc}"  # type: ignore[attr-defined]
            assert h.aio_is_dead() or h.aio_is_closed(), h.connection_state()
            assert exc.string.startswith(("nbd_connect_uri: ", "nbd_block_status: ", "nbd_pread: "))
            return
        assert case.match is None, f"{case}: accepted"  # type: ignore[attr-defined]
        assert data == CONTENT


def test_no_backend_is_imported() -> None:
    # The engine's distribution must not depend on a backend: nbdproto.libnbd runs on the engine alone.
    code = (
        "import sys; from nbdproto import libnbd; h = libnbd.NBD(); h.get_version(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nbdproto_threads', 'nbdproto_anyio', 'anyio')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result
