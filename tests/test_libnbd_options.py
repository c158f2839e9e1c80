"""nbdproto.libnbd against libnbd's binding: option mode and what the handshake settings change (structured
replies refused, handshake flags withheld, an export the server does not have), on nbdkit with its
exportname filter (several exports, descriptions, a strict server that refuses unknown names)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.libnbd_diff import Differ, Workers, libnbd_workers, require_binding  # noqa: F401

pytestmark = pytest.mark.peers

EXPORTS = (
    '["nbdkit", "-s", "--exit-with-parent", "-e", "main", "--filter=exportname", "memory", "1M", "exportname=main", '
    '"exportname=other", "exportname-strict=true", "exportdesc=fixed:hello"]'
)
MEMORY = '["nbdkit", "-s", "--exit-with-parent", "memory", "1M"]'


@pytest.fixture
def differ(libnbd_workers: Workers) -> Iterator[Differ]:  # noqa: F811
    require_binding("nbdkit")
    yield Differ(libnbd_workers)


def test_option_mode(differ: Differ) -> None:
    trace = differ.same(f"""
h = nbd.NBD()
attempt("set_opt_mode", h.set_opt_mode, True)
attempt("add_meta_context", h.add_meta_context, nbd.CONTEXT_BASE_ALLOCATION)
attempt("connect", h.connect_command, {EXPORTS})
for name in ["connection_state", "aio_get_direction", "aio_is_negotiating", "get_protocol",
             "get_structured_replies_negotiated", "get_size", "get_export_name", "get_handshake_flags",
             "aio_in_flight", "get_opt_mode", "set_opt_mode"]:
    attempt(name, getattr(h, name), *([True] if name == "set_opt_mode" else []))
attempt("pread", h.pread, 1, 0)
attempt("opt_list", h.opt_list, recorder("export"))
attempt("opt_list not callable", h.opt_list, None)
attempt("opt_list_meta_context", h.opt_list_meta_context, recorder("context"))
attempt("opt_info", h.opt_info)
attempt("get_size", h.get_size)
attempt("can_meta_context", h.can_meta_context, nbd.CONTEXT_BASE_ALLOCATION)
attempt("set_export_name", h.set_export_name, "nosuch")
attempt("opt_info nosuch", h.opt_info)
attempt("get_size", h.get_size)
attempt("opt_go nosuch", h.opt_go)
attempt("state", h.connection_state)
attempt("set_export_name", h.set_export_name, "other")
attempt("set_full_info", h.set_full_info, True)
attempt("set_request_block_size", h.set_request_block_size, False)
attempt("opt_info other", h.opt_info)
attempt("canonical name", h.get_canonical_export_name)
attempt("description", h.get_export_description)
attempt("clear_meta_contexts", h.clear_meta_contexts)
attempt("opt_list_meta_context all", h.opt_list_meta_context, recorder("every context"))
attempt("add_meta_context", h.add_meta_context, "base:")
attempt("opt_list_meta_context base:", h.opt_list_meta_context, recorder("base context"))
attempt("get_meta_context", h.get_meta_context, 0)
attempt("opt_go", h.opt_go)
attempt("state", h.connection_state)
attempt("can_meta_context", h.can_meta_context, nbd.CONTEXT_BASE_ALLOCATION)
attempt("canonical name", h.get_canonical_export_name)
attempt("description", h.get_export_description)
attempt("pread", h.pread, 4, 0)
attempt("opt_abort when ready", h.opt_abort)
attempt("set_export_name when ready", h.set_export_name, "main")
attempt("shutdown", h.shutdown)
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_command({MEMORY})
attempt("opt_abort", h.opt_abort)
for name in ["connection_state", "aio_is_closed", "get_size", "opt_go", "aio_get_direction", "get_protocol"]:
    attempt(name, getattr(h, name))
""")
    assert ["opt_go nosuch", "Error", 2, "ENOENT", "nbd_opt_go"] in trace


def test_handshake_settings(differ: Differ) -> None:
    differ.same(f"""
h = nbd.NBD()
h.set_opt_mode(True)
h.set_request_structured_replies(False)
h.connect_command({MEMORY})
attempt("structured replies", h.get_structured_replies_negotiated)
attempt("opt_list_meta_context without them", h.opt_list_meta_context, recorder("context"))
attempt("opt_go", h.opt_go)
attempt("can_df", h.can_df)
attempt("block_status without them", h.block_status, 512, 0, recorder("extent"))
attempt("pread_structured without them", h.pread_structured, 512, 0, recorder("chunk"))
h = nbd.NBD()
h.set_handshake_flags(0)
attempt("connect without fixed newstyle", h.connect_command, {MEMORY})
for name in ["get_protocol", "get_handshake_flags", "get_structured_replies_negotiated", "get_size"]:
    attempt(name, getattr(h, name))
attempt("pread", h.pread, 4, 0)
h = nbd.NBD()
h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
attempt("connect without NO_ZEROES", h.connect_command, {MEMORY})
attempt("get_handshake_flags", h.get_handshake_flags)
h = nbd.NBD()
h.set_export_name("nosuch")
attempt("connect to an export that is not there", h.connect_command, {EXPORTS})
attempt("state", h.connection_state)
attempt("get_size", h.get_size)
h = nbd.NBD()
h.set_opt_mode(True)
h.set_handshake_flags(0)
attempt("connect in option mode without fixed newstyle", h.connect_command, {MEMORY})
attempt("state", h.connection_state)
attempt("opt_list", h.opt_list, recorder("export"))
attempt("opt_info", h.opt_info)
attempt("opt_list_meta_context", h.opt_list_meta_context, recorder("context"))
attempt("opt_go", h.opt_go)
attempt("state", h.connection_state)
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_handshake_flags(0)
attempt("TLS without fixed newstyle", h.connect_command, {MEMORY})
attempt("state", h.connection_state)
h = nbd.NBD()
h.set_request_block_size(False)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.add_meta_context("nosuch:context")
attempt("connect", h.connect_command, {MEMORY})
attempt("get_nr_meta_contexts", h.get_nr_meta_contexts)
attempt("can nosuch", h.can_meta_context, "nosuch:context")
attempt("block_status", h.block_status, 4096, 0, recorder("extent"))
""")
