"""Questions asked without selecting an export (opt mode: NBD_OPT_INFO, NBD_OPT_LIST_META_CONTEXT), meta
context discovery before GO, and block status of one named context: both client libraries, against our server,
nbdkit and qemu-nbd (a qcow2 image with a dirty bitmap)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import nbdproto as n
import nbdproto.client
import nbdproto_anyio as na
import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from tests.conftest import PEER_ENV
from tests.remotes import serving_on_socket
from tests.serving import BACKENDS, Export, serve_exports

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20


def exports() -> dict[str, Export]:
    return {
        "a": Export(MemoryDevice(MIB), "first disk"),
        "b": Export(MemoryDevice(2 * MIB), read_only=True),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_inquire_lists_every_export_with_its_details(backend: str) -> None:
    with serve_exports(backend, exports()) as base:
        inquiry = nt.inquire(base.format(""), list_exports=True)
        async_inquiry = anyio.run(lambda: na.inquire(base.format(""), list_exports=True))
    assert inquiry == async_inquiry
    assert inquiry.listed and inquiry.structured_replies and inquiry.extended_headers and not inquiry.tls
    by_name = {d.name: d for d in inquiry.exports}
    assert list(by_name) == ["a", "b"]
    a, b = by_name["a"], by_name["b"]
    assert a.export is not None and b.export is not None
    assert (a.export.size, a.export.description, a.listed_description, a.export.read_only) == (
        MIB, "first disk", "first disk", False)  # fmt: skip
    assert (b.export.size, b.export.read_only) == (2 * MIB, True)
    assert a.meta_contexts == b.meta_contexts == (n.BASE_ALLOCATION,)
    assert a.export.block_sizes_known and a.export.maximum_payload == 32 * MIB


def test_export_info_and_list_meta_contexts_without_selecting() -> None:
    with serve_exports("threads", exports()) as base:
        details = nt.export_info(base.format("a"))
        assert details.export is not None and details.export.size == MIB
        assert details.meta_contexts == (n.BASE_ALLOCATION,)
        assert nt.list_meta_contexts(base.format("b")) == [n.BASE_ALLOCATION]
        assert anyio.run(lambda: na.list_meta_contexts(base.format("b"), ["base:"])) == [n.BASE_ALLOCATION]
        assert anyio.run(lambda: na.export_info(base.format("b"))).export.size == 2 * MIB  # type: ignore[union-attr]
        with pytest.raises(n.NegotiationError, match="'nope' refused") as refused:
            nt.export_info(base.format("nope"))
        assert refused.value.reply_type == n.OptionReplyType.ERR_UNKNOWN
        # Nothing was selected: the server served no transmission phase (a GO would have been needed).
        with nt.connect(base.format("a"), discover_meta_contexts=True) as client:
            assert client.available_meta_contexts == (n.BASE_ALLOCATION,)
        with nt.connect(base.format("a")) as client:
            assert client.available_meta_contexts is None


def test_the_plan_records_refusals_and_goes_on() -> None:
    # One export refused for INFO, another for LIST_META_CONTEXT: each is recorded; the plan ends with ABORT.
    plan = n.client.ClientNegotiation("", go=False, list_exports=True, info=True, list_meta_contexts=())
    assert isinstance(plan.step(n.ServerGreeting(3)), n.OptionList)
    listing = n.ExportList((n.ExportListing("x", "ex"), n.ExportListing("y")))
    assert isinstance(plan.step(listing), n.OptionExtendedHeaders)
    assert isinstance(plan.step(n.OptionError(n.Option.EXTENDED_HEADERS, n.OptionReplyType.ERR_UNSUP)),
                      n.OptionStructuredReply)  # fmt: skip
    info = plan.step(n.OptionAck(n.Option.STRUCTURED_REPLY))
    assert isinstance(info, n.OptionInfo) and info.name == "x"
    listed = plan.step(n.OptionError(n.Option.INFO, n.OptionReplyType.ERR_UNKNOWN, "gone"))
    assert isinstance(listed, n.OptionListMetaContext) and listed.name == "x"
    info = plan.step(n.MetaContexts(n.Option.LIST_META_CONTEXT, {0: "base:allocation", 1: "x:y"}))
    assert isinstance(info, n.OptionInfo) and info.name == "y"
    listed = plan.step(n.ExportInfo(n.Export("y", 4096)))
    assert isinstance(listed, n.OptionListMetaContext)
    assert isinstance(plan.step(n.OptionError(n.Option.LIST_META_CONTEXT, n.OptionReplyType.ERR_POLICY)),
                      n.OptionAbort)  # fmt: skip
    assert plan.step(n.ClientAborted()) is None and plan.done
    result = plan.result
    assert isinstance(result, n.Inquiry) and result.structured_replies and not result.extended_headers
    x, y = result.exports
    assert (x.name, x.export, x.meta_contexts, x.listed_description) == ("x", None, ("base:allocation", "x:y"), "ex")
    assert "gone" in str(x.errors[0])
    assert y.export is not None and y.export.size == 4096 and y.meta_contexts is None and len(y.errors) == 1


@contextlib.contextmanager
def qemu_nbd_with_bitmap() -> Iterator[str]:
    """qemu-nbd serving a qcow2 image with a dirty bitmap "b0" (the blocks written after it was added are
    dirty) and allocation depth; yields the URI."""
    with tempfile.TemporaryDirectory(prefix="nbdproto-qemu-") as tmp:
        image, sock = os.path.join(tmp, "disk.qcow2"), os.path.join(tmp, "nbd.sock")
        run = lambda *args: subprocess.run(args, check=True, capture_output=True, timeout=30, env=PEER_ENV)  # noqa: E731
        run("qemu-img", "create", "-f", "qcow2", image, "8M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", image)
        run("qemu-img", "bitmap", "--add", image, "b0")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 128k", "-c", "write -z 3M 64k", image)
        command = ["qemu-nbd", "-t", "-r", "-A", "-f", "qcow2", "-B", "b0", "-x", "disk", "-k", sock, image]
        with serving_on_socket(command, sock, "qemu-nbd"):
            yield f"nbd+unix:///disk?socket={sock}"


def test_qemu_nbd_contexts_discovered_and_one_context_asked_for(peers: Any) -> None:
    peers("qemu-nbd", "qemu-img", "qemu-io")
    bitmap = "qemu:dirty-bitmap:b0"
    with qemu_nbd_with_bitmap() as uri:
        offered = ["base:allocation", "qemu:allocation-depth", bitmap]
        assert sorted(nt.list_meta_contexts(uri)) == offered
        assert nt.list_meta_contexts(uri, ["qemu:dirty-bitmap:"]) == [bitmap]
        assert sorted(anyio.run(lambda: na.list_meta_contexts(uri))) == offered
        details = nt.export_info(uri)
        assert details.export is not None and details.export.size == 8 * MIB and details.export.read_only
        with nt.connect(uri, meta_contexts=(n.BASE_ALLOCATION, bitmap), discover_meta_contexts=True) as client:
            assert sorted(client.available_meta_contexts or ()) == offered
            # qemu cannot be asked for one context per request: both are asked for, one is handed back.
            dirty = client.block_status(8 * MIB, 0, context=bitmap)
            both = client.block_status(8 * MIB, 0)
            assert set(both) == {n.BASE_ALLOCATION, bitmap} and both[bitmap] == dirty
            assert client.block_status(8 * MIB, 0, contexts=[bitmap]) == {bitmap: dirty}
        assert [(e.length, e.status) for e in dirty] == [(MIB, 0), (128 * 1024, 1), (1920 * 1024, 0),
                                                         (64 * 1024, 1), (5056 * 1024, 0)]  # fmt: skip

        async def async_side() -> tuple[n.Extent, ...]:
            async with await na.connect(uri, meta_contexts=(bitmap,)) as client:
                return await client.block_status(8 * MIB, 0, context=bitmap)

        assert anyio.run(async_side) == dirty


def test_nbdkit_contexts_and_info(peers: Any) -> None:
    peers("nbdkit")
    with tempfile.TemporaryDirectory(prefix="nbdproto-nbdkit-") as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        with serving_on_socket(["nbdkit", "-f", "-U", sock, "memory", "1M"], sock, "nbdkit"):
            uri = f"nbd+unix:///?socket={sock}"
            assert nt.list_meta_contexts(uri) == [n.BASE_ALLOCATION]
            inquiry = nt.inquire(uri, list_exports=True)
            (only,) = inquiry.exports
            assert only.export is not None and only.export.size == MIB and not only.errors
