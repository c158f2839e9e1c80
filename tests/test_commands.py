"""ServerConnection in transmission against the spec's rules that test_server does not already cover: flags on
every command, cookies, lengths, the shape of every chunk, block status limits, and RESIZE (spec: "Request
types", "Command flags", "Structured reply flags", "Structured reply types", the RESIZE extension)."""

from __future__ import annotations

import struct

import pytest

import nbdproto as n
import nbdproto.wire
from nbdproto.serving._carry_out import device_calls, reply_for
from tests.nbdbytes import joined, replies, request
from tests.test_server import RW_FLAGS, events, export, handshake, new_server

C, F, TF = n.Command, n.CommandFlags, n.TransmissionFlags
MIB = 1 << 20
MODES = ["simple", "structured", "extended"]


def connected(mode: str, contexts: tuple[str, ...] = (), **kw: object) -> n.ServerConnection:
    s = new_server()
    handshake(s, structured=mode != "simple", extended=mode == "extended", contexts=contexts, exp=export(**kw))
    return s


def req(mode: str, command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return request(command, cookie, offset, length, flags, extended=mode == "extended")


@pytest.mark.parametrize("mode", MODES)
def test_fua_is_accepted_on_every_command_when_advertised(mode: str) -> None:
    # spec ("Command flags"): with NBD_FLAG_SEND_FUA the server MUST accept FUA on all commands, if only by
    # ignoring it; without it FUA is a flag the client may not send (EINVAL).
    contexts = () if mode == "simple" else (n.BASE_ALLOCATION,)
    s = connected(mode, contexts)
    data = req(mode, C.READ, 1, 0, 512, F.FUA) + req(mode, C.FLUSH, 2, flags=F.FUA)
    data += req(mode, C.CACHE, 3, 0, 512, F.FUA)
    if contexts:
        data += req(mode, C.BLOCK_STATUS, 4, 0, 512, F.FUA)
    s.receive_data(data + req(mode, C.DISC, 5, flags=F.FUA))
    got = events(s)
    assert [type(e) for e in got][:3] == [n.ReadRequest, n.FlushRequest, n.CacheRequest]
    assert isinstance(got[-1], n.DisconnectRequest) and all(e.flags & F.FUA for e in got[:-1])  # type: ignore[attr-defined]
    assert joined(s) == b""
    s = connected(mode, contexts, flags=RW_FLAGS & ~TF.SEND_FUA)
    s.receive_data(req(mode, C.READ, 1, 0, 512, F.FUA) + req(mode, C.FLUSH, 2, flags=F.FUA))
    assert events(s) == []
    assert [c.error for c in replies(joined(s))] == [n.Errno.EINVAL] * 2


@pytest.mark.parametrize("mode", MODES)
def test_replies_echo_the_cookie(mode: str) -> None:
    cookies = [0, 1, 0xFFFFFFFFFFFFFFFF, 0x8000000000000000, 0x0123456789ABCDEF]
    s = connected(mode)
    for i, cookie in enumerate(cookies):
        s.receive_data(req(mode, C.READ, cookie, i * 512, 512))
    got = events(s)
    s.receive_data(req(mode, C.READ, 7, MIB, 512))  # refused by the engine itself
    assert events(s) == []
    for i, event in enumerate(got):
        cookie = event.cookie  # type: ignore[attr-defined]
        if i % 2:
            s.send(n.ErrorReply(cookie, n.Errno.EIO, "no"))
        else:
            s.send(n.ReadData(cookie, event.offset, bytes(512)))  # type: ignore[attr-defined]
    out = replies(joined(s), {c: 512 for c in cookies})
    assert [c.cookie for c in out] == [7, *cookies]


@pytest.mark.parametrize("mode", MODES)
def test_zero_length_requests_are_einval_never_a_disconnect(mode: str) -> None:
    contexts = () if mode == "simple" else (n.BASE_ALLOCATION,)
    s = connected(mode, contexts)
    commands = [C.READ, C.TRIM, C.WRITE_ZEROES, C.CACHE] + ([C.BLOCK_STATUS] if contexts else [])
    data = b"".join(req(mode, command, i, 0, 0) for i, command in enumerate(commands))
    data += req(mode, C.WRITE, 99, 0, 0, F.PAYLOAD_LEN if mode == "extended" else 0)
    s.receive_data(data + req(mode, C.FLUSH, 100))
    assert events(s) == [n.FlushRequest(100)]
    assert [c.error for c in replies(joined(s))] == [n.Errno.EINVAL] * (len(commands) + 1)


def test_commands_without_payload_may_exceed_the_maximum_payload() -> None:
    # spec ("Size constraints"): the server SHOULD NOT disconnect for an effect length above the maximum payload.
    s = connected("structured", (n.BASE_ALLOCATION,), size=64 * MIB, maximum_payload=MIB)
    big = 32 * MIB
    s.receive_data(
        request(C.TRIM, 1, 0, big)
        + request(C.WRITE_ZEROES, 2, 0, big)
        + request(C.CACHE, 3, 0, big)
        + request(C.BLOCK_STATUS, 4, 0, big)
    )
    assert [(type(e), e.length) for e in events(s)] == [  # type: ignore[attr-defined]
        (n.TrimRequest, big),
        (n.WriteZeroesRequest, big),
        (n.CacheRequest, big),
        (n.BlockStatusRequest, big),
    ]


def test_a_simple_error_reply_carries_no_data() -> None:
    s = connected("simple")
    s.receive_data(request(C.READ, 1, 0, 512) + request(C.READ, 2, 512, 512))
    assert len(events(s)) == 2
    s.send(n.ErrorReply(1, n.Errno.EIO, "failed"))
    s.send(n.ReadData(2, 512, b"x" * 512))
    out = joined(s)
    assert len(out) == 16 + 16 + 512
    assert struct.unpack(">IIQ", out[:16]) == (n.wire.SIMPLE_REPLY_MAGIC, n.Errno.EIO, 1)
    assert struct.unpack(">IIQ", out[16:32]) == (n.wire.SIMPLE_REPLY_MAGIC, 0, 2)


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_reply_flags_and_the_none_chunk(mode: str) -> None:
    # spec: DONE is the only reply flag; with extended headers success is a NONE chunk: length 0, DONE set.
    s = connected(mode, (n.BASE_ALLOCATION,))
    s.receive_data(
        req(mode, C.READ, 1, 0, 3000)
        + req(mode, C.FLUSH, 2)
        + req(mode, C.BLOCK_STATUS, 3, 0, 4096)
        + req(mode, C.TRIM, 4, 0, 4096)
        + req(mode, C.READ, 5, MIB, 512)
    )
    events(s)
    s.send(n.ReadHole(1, 0, 1000))
    s.send(n.ReadData(1, 1000, b"a" * 2000))
    s.send(n.SuccessReply(2))
    s.send(n.BlockStatusReply(3, {1: (n.Extent(4096, 0),)}))
    s.send(n.ErrorReply(4, n.Errno.EIO))
    out = replies(joined(s))
    assert all(c.flags in (0, n.ReplyFlags.DONE) for c in out)
    # Each reply ends once: a simple reply, or DONE on its last chunk and on no other.
    for cookie in range(1, 6):
        mine = [c for c in out if c.cookie == cookie]
        assert [c.flags == n.ReplyFlags.DONE or c.chunk_type is None for c in mine] == [False] * (len(mine) - 1) + [
            True
        ]
    flush = next(c for c in out if c.cookie == 2)
    if mode == "extended":
        assert (flush.chunk_type, flush.flags, flush.payload) == (n.ChunkType.NONE, n.ReplyFlags.DONE, b"")
    else:
        assert flush.chunk_type is None  # a simple reply: allowed for what carries no data


@pytest.mark.parametrize("mode", MODES)
def test_nothing_may_follow_the_final_chunk(mode: str) -> None:
    s = connected(mode)
    s.receive_data(req(mode, C.READ, 1, 0, 1024) + req(mode, C.READ, 2, 0, 1024))
    events(s)
    s.send(n.ReadData(1, 0, bytes(1024)))
    with pytest.raises(n.LocalProtocolError, match="cookie"):
        s.send(n.ReadData(1, 0, bytes(1024)))
    s = connected(mode)
    s.receive_data(req(mode, C.READ, 2, 0, 1024))
    events(s)
    if mode != "simple":
        s.send(n.ReadData(2, 0, bytes(512), done=False))
        s.send(n.ErrorReply(2, n.Errno.EIO, "first", offset=512))
        with pytest.raises(n.LocalProtocolError, match="cookie"):
            s.send(n.ErrorReply(2, n.Errno.EIO, "second", offset=600))
        chunks = replies(joined(s))
        assert [c.chunk_type for c in chunks] == [n.ChunkType.OFFSET_DATA, n.ChunkType.ERROR_OFFSET]
        assert chunks[-1].flags == n.ReplyFlags.DONE


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_read_chunks_describe_at_least_one_byte(mode: str) -> None:
    s = connected(mode)
    s.receive_data(req(mode, C.READ, 1, 0, 1024))
    events(s)
    for bad in (n.ReadHole(1, 0, 0), n.ReadData(1, 0, b"", done=False)):
        with pytest.raises(n.LocalProtocolError, match="empty"):
            s.send(bad)
        s = connected(mode)
        s.receive_data(req(mode, C.READ, 1, 0, 1024))
        events(s)
    s.send(n.ReadHole(1, 0, 1024))
    (hole,) = replies(joined(s))
    assert hole.chunk_type == n.ChunkType.OFFSET_HOLE and len(hole.payload) == 12 and hole.fields.hole_size == 1024


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_error_chunks_are_well_formed(mode: str) -> None:
    s = connected(mode)
    s.receive_data(req(mode, C.READ, 1, 4096, 1024) + req(mode, C.WRITE_ZEROES, 2, 0, 512))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="non-zero"):
        s.send(n.ErrorReply(1, n.Errno.OK))
    s = connected(mode)
    s.receive_data(req(mode, C.READ, 1, 4096, 1024) + req(mode, C.WRITE_ZEROES, 2, 0, 512))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="outside"):
        s.send(n.ErrorReply(1, n.Errno.EIO, offset=4096 + 1024))
    s = connected(mode)
    s.receive_data(req(mode, C.READ, 1, 4096, 1024) + req(mode, C.WRITE_ZEROES, 2, 0, 512))
    events(s)
    s.send(n.ErrorReply(1, n.Errno.EIO, offset=4096 + 100))
    s.send(n.ErrorReply(2, n.Errno.ENOSPC))
    first, second = replies(joined(s))
    assert first.chunk_type == n.ChunkType.ERROR_OFFSET and len(first.payload) == 14 and first.fields.offset == 4196
    assert second.chunk_type == n.ChunkType.ERROR and len(second.payload) == 6 and second.error == n.Errno.ENOSPC


def test_block_status_stops_at_the_first_extent_past_the_request() -> None:
    # spec: the first N-1 extents sum to less than the request; only the last may reach past it.
    s = connected("structured", (n.BASE_ALLOCATION,))
    s.receive_data(request(C.BLOCK_STATUS, 1, 0, 8192))
    events(s)
    s.send(n.BlockStatusReply(1, {1: (n.Extent(4096, 0), n.Extent(8192, 3), n.Extent(4096, 0))}))
    (chunk,) = replies(joined(s))
    assert [(d.length, d.status) for d in chunk.fields.descriptors] == [(4096, 0), (8192, 3)]


@pytest.mark.parametrize(("mode", "most"), [("structured", 1024 // 8), ("extended", 1024 // 16)])
def test_block_status_descriptors_fit_the_maximum_payload(mode: str, most: int) -> None:
    # spec: no chunk's variable part may exceed the maximum payload (2^20 descriptors at most in any case).
    s = connected(mode, (n.BASE_ALLOCATION,), preferred_block_size=512, maximum_payload=1024)
    s.receive_data(req(mode, C.BLOCK_STATUS, 1, 0, MIB))
    events(s)
    s.send(n.BlockStatusReply(1, {1: tuple(n.Extent(512, i % 2) for i in range(2048))}))
    (chunk,) = replies(joined(s))
    assert len(chunk.fields.descriptors) == most and len(chunk.payload) - (8 if mode == "extended" else 4) <= 1024


def test_req_one_keeps_whole_blocks() -> None:
    s = connected("structured", (n.BASE_ALLOCATION,), minimum_block_size=512)
    s.receive_data(request(C.BLOCK_STATUS, 1, 0, 1000, F.REQ_ONE))
    events(s)
    s.send(n.BlockStatusReply(1, {1: (n.Extent(4096, 3),)}))
    (chunk,) = replies(joined(s))
    assert [(d.length, d.status) for d in chunk.fields.descriptors] == [(512, 3)]


def test_status_must_fit_32_bits_even_with_extended_headers() -> None:
    s = connected("extended", (n.BASE_ALLOCATION,))
    s.receive_data(request(C.BLOCK_STATUS, 1, 0, 4096, extended=True))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="status"):
        s.send(n.BlockStatusReply(1, {1: (n.Extent(4096, 1 << 32),)}))


def test_base_allocation_reserved_bits_go_out_as_zero() -> None:
    status = n.BlockStatusRequest(1, 0, 8192, n.NO_FLAGS, (1, 2))
    calls = device_calls(status, {1: n.BASE_ALLOCATION, 2: "x:other"})
    reply = reply_for(status, calls, [[(8192, 0xFF)], [(8192, 0xFF)]])
    assert reply == n.BlockStatusReply(1, {1: (n.Extent(8192, 3),), 2: (n.Extent(8192, 0xFF),)})


@pytest.mark.parametrize("mode", MODES)
def test_a_read_only_export_refuses_every_write(mode: str) -> None:
    s = connected(mode, flags=TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_WRITE_ZEROES | TF.SEND_RESIZE)
    s.receive_data(req(mode, C.WRITE_ZEROES, 1, 0, 512) + req(mode, C.RESIZE, 2, 2 * MIB))
    assert events(s) == []
    assert [c.error for c in replies(joined(s))] == [n.Errno.EPERM, n.Errno.EPERM]


def test_df_reads_up_to_64_kib_are_one_chunk() -> None:
    # spec: the server MUST support unfragmented reads of up to 65,536 bytes.
    s = connected("structured")
    s.receive_data(request(C.READ, 1, 0, 65536, F.DF))
    (read,) = events(s)
    assert read.flags == F.DF
    s.send(n.ReadData(1, 0, bytes(65536)))
    (chunk,) = replies(joined(s))
    assert chunk.chunk_type == n.ChunkType.OFFSET_DATA and chunk.flags == n.ReplyFlags.DONE


@pytest.mark.parametrize("mode", MODES)
def test_resize_changes_the_size_requests_are_checked_against(mode: str) -> None:
    # RESIZE extension: after success the new size holds; a request between a smaller new size and the old one
    # fails with ENOSPC, and a larger new size is usable at once.
    s = connected(mode, flags=RW_FLAGS | TF.SEND_RESIZE)
    s.receive_data(req(mode, C.RESIZE, 1, 2 * MIB))
    events(s)
    s.send(n.SuccessReply(1))
    s.receive_data(req(mode, C.READ, 2, MIB + 512, 512))
    assert events(s) == [n.ReadRequest(2, MIB + 512, 512)]
    s.send(n.ReadData(2, MIB + 512, bytes(512)))
    s.receive_data(req(mode, C.RESIZE, 3, MIB // 2))
    events(s)
    s.send(n.SuccessReply(3))
    joined(s)
    s.receive_data(req(mode, C.READ, 4, MIB, 512) + req(mode, C.READ, 5, 3 * MIB, 512))
    assert events(s) == []
    assert [c.error for c in replies(joined(s))] == [n.Errno.ENOSPC, n.Errno.EINVAL]
    s.receive_data(req(mode, C.RESIZE, 6, 4 * MIB))
    events(s)
    s.send(n.ErrorReply(6, n.Errno.ENOSPC, "no room"))
    joined(s)
    s.receive_data(req(mode, C.READ, 7, MIB, 512))
    assert events(s) == []  # the failed resize changed nothing
