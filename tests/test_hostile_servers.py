"""Misbehaving servers against every client: the threads client, the anyio client on asyncio and trio, and the
command line (``info`` for handshake cases, ``copy`` for the rest).

Each case (tests/hostile_server.py serves it) ends, within a hard deadline, either in exactly the export's
bytes (cases that bend but keep the rules: 65,536 one-byte chunks in order and out of order, a block status
chunk of more descriptors than the client keeps) or in RemoteProtocolError / NegotiationError (a
ConnectionError or CopyFailed caused by one counts) whose message names the broken rule. Never another
exception, never a hang, never wrong data.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import nbdproto as n
import nbdproto.wire
import nbdproto_anyio as na
import nbdproto_threads as nt
from nbdproto.cli import main
from nbdproto.wire._constants import ChunkType, InfoType
from tests.hostile_server import CONTENT, REP, SIZE, TF, Case, Close, Request, Wire, option_reply, serve_case

pytestmark = pytest.mark.timeout(60)
DEADLINE = 20.0
"""Seconds any one client gets for a case; hitting it means a hang (the cases take milliseconds)."""
STATUS_LENGTH = (1 << 32) - (1 << 16)
"""The longest block status a client without extended headers asks for: what the clients under test ask."""

MIB = 1 << 20


# --- Replies that break the rules -----------------------------------------------------------------------------


def raw(data: bytes) -> Callable[[Wire, Request], bytes]:
    return lambda wire, request: data


def chunks(make: Callable[[Wire, Request], list[bytes]]) -> Callable[[Wire, Request], bytes]:
    return lambda wire, request: b"".join(make(wire, request))


def one_byte_chunks(order: list[int]) -> Callable[[Wire, Request], bytes]:
    def reply(wire: Wire, request: Request) -> bytes:
        last = order[-1]
        body = [wire.data(request, at, CONTENT[at : at + 1], 0) for at in order[:-1]]
        return b"".join(body) + wire.data(request, last, CONTENT[last : last + 1])

    return reply


def extents(*pairs: tuple[int, int], context: int = 1) -> Callable[[Wire, Request], bytes]:
    return lambda wire, request: wire.status(request, context, list(pairs))


def many_descriptors(count: int) -> Callable[[Wire, Request], bytes]:
    def reply(wire: Wire, request: Request) -> bytes:
        if wire.extended:
            payload = struct.pack(">II", 1, count) + struct.pack(">QQ", 1, 0) * count
            return wire.chunk(request, ChunkType.BLOCK_STATUS_EXT, payload)
        return wire.chunk(request, ChunkType.BLOCK_STATUS, struct.pack(">I", 1) + struct.pack(">II", 1, 0) * count)

    return reply


def fragmented_status(wire: Wire, request: Request) -> bytes:
    """2 Mi descriptors (16 MiB, all a client reads in one chunk, and allowed for a long request): one-byte
    extents, then one of 1 MiB."""
    count = 2 * MIB - 1
    body = struct.pack(">II", 1, 0) * count + struct.pack(">II", 1 << 20, 0)
    return wire.chunk(request, ChunkType.BLOCK_STATUS, struct.pack(">I", 1) + body)


def huge_info(option: int) -> bytes:
    """33 MiB of information replies nobody understands before the ACK."""
    filler = option_reply(option, REP.INFO, struct.pack(">H", 999) + bytes(60_000))
    export = option_reply(option, REP.INFO, struct.pack(">HQH", InfoType.EXPORT, SIZE, TF.HAS_FLAGS))
    return export + filler * (33 * MIB // len(filler) + 1) + option_reply(option, REP.ACK)


def go_answer(*replies: tuple[int, bytes]) -> Callable[[int], bytes]:
    return lambda option: b"".join(option_reply(option, kind, payload) for kind, payload in replies)


EXPORT_INFO = struct.pack(">HQH", InfoType.EXPORT, SIZE, TF.HAS_FLAGS | TF.READ_ONLY)
HALF = SIZE // 2
ODD_ORDER = list(range(0, SIZE, 2))[::-1] + list(range(1, SIZE, 2))


def _handshake(name: str, match: str, **kw: Any) -> Case:
    return Case(name, match, handshake_only=True, **kw)


# fmt: off
CASES = [
    # Block-size constraints (issue 18 items 2, 3)
    _handshake("minimum block size 0", r"minimum block size 0 is not a power of two", block_sizes=(0, 4096, MIB)),
    _handshake("minimum not a power of two", r"minimum block size 1000 ", block_sizes=(1000, 4096, 32000)),
    _handshake("minimum above 64 KiB", r"minimum block size 131072 ", block_sizes=(1 << 17, 1 << 17, MIB)),
    _handshake("preferred below minimum", r"preferred block size 512 ", block_sizes=(4096, 512, MIB)),
    _handshake("preferred not a power of two", r"preferred block size 3000 ", block_sizes=(512, 3000, MIB)),
    _handshake("maximum 0", r"maximum payload 0 ", block_sizes=(1, 4096, 0)),
    _handshake("maximum below preferred", r"maximum payload 4096 ", block_sizes=(512, 65536, 4096)),
    _handshake("maximum not a multiple of minimum", r"maximum payload 1000000 ", block_sizes=(512, 4096, 1000000)),
    # What the export is (item 3's "every fact", the 31 cases that already passed)
    _handshake("export size 2^63", r"export size", size=1 << 63),
    _handshake("transmission flags without HAS_FLAGS", r"HAS_FLAGS", flags=0),
    _handshake("INFO/GO without NBD_INFO_EXPORT", r"NBD_INFO_EXPORT", go_replies=go_answer((REP.ACK, b""))),
    _handshake("33 MiB of information replies", r"exceeds 32 MiB", go_replies=huge_info),
    _handshake("TLS demanded", r"requires TLS", go_replies=go_answer((REP.ERR_TLS_REQD, b""))),
    _handshake("greeting magic", r"NBDMAGIC", greeting=struct.pack(">QQH", 0x4E42444D41474944, n.wire.IHAVEOPT, 3)),
    _handshake("option reply for another option", r"option reply for option 99",
               go_replies=lambda option: option_reply(99, REP.ACK)),
    _handshake("option reply magic", r"option reply magic",
               go_replies=lambda option: struct.pack(">QIII", 0x3E889045565A8, option, REP.ACK, 0)),
    _handshake("option reply length of 4 GiB", r"option reply length 4294967295",
               go_replies=lambda option: struct.pack(">QIII", n.wire.OPTION_REPLY_MAGIC, option, REP.INFO, 0xFFFFFFFF)),
    _handshake("closes in the middle of GO", r"closed the connection",
               go_replies=lambda option: Close(go_answer((REP.INFO, EXPORT_INFO))(option)[:30])),
    # Meta contexts (item 8)
    _handshake("meta context never asked for", r"qemu:dirty-bitmap:evil.*never asked for",
               contexts=[(1, n.BASE_ALLOCATION), (2, "qemu:dirty-bitmap:evil")]),
    _handshake("meta context id answered twice", r"answered id 1 .* twice",
               contexts=[(1, n.BASE_ALLOCATION), (1, n.BASE_ALLOCATION)]),
    _handshake("meta context name without namespace", r"namespace:leaf-name", contexts=[(1, "allocation")]),
    _handshake("base: leaf never asked for", r"base:evil.*never asked for", contexts=[(1, "base:evil")]),
    # Read chunks (items 4, 5 and the checks that already held)
    Case("hole of 4 GiB", r"read chunk 0\+4294967295 is outside the request",
         read=lambda wire, request: wire.hole(request, request.offset, 0xFFFFFFFF)),
    Case("hole of 4 GiB, extended headers", r"read chunk 0\+4294967295 is outside the request", extended=True,
         read=lambda wire, request: wire.hole(request, request.offset, 0xFFFFFFFF)),
    Case("hole of 0 bytes", r"hole of 0 bytes", read=lambda wire, request: wire.hole(request, 0, 0)),
    Case("hole chunk of 16 bytes", r"OFFSET_HOLE chunk of 16 bytes",
         read=lambda wire, request: wire.chunk(request, ChunkType.OFFSET_HOLE, bytes(16))),
    Case("data outside the request", r"outside the request",
         read=lambda wire, request: wire.data(request, SIZE - 10, CONTENT[:20])),
    Case("data chunk of 4 GiB", r"OFFSET_DATA chunk of 4294967295 bytes",
         read=lambda wire, request: wire.chunk(request, ChunkType.OFFSET_DATA, b"", length=0xFFFFFFFF)),
    Case("overlapping chunks in order", r"overlaps",
         read=chunks(lambda wire, r: [wire.data(r, 0, CONTENT[: HALF + 1], 0), wire.data(r, HALF, CONTENT[HALF:])])),
    Case("overlapping chunks out of order", r"overlaps bytes an earlier chunk answered",
         read=chunks(lambda wire, r: [wire.data(r, 100, CONTENT[100:200], 0), wire.data(r, 150, CONTENT[150:250], 0),
                                      wire.data(r, 0, CONTENT)])),
    Case("hole over data already answered", r"overlaps",
         read=chunks(lambda wire, r: [wire.data(r, 0, CONTENT[:HALF], 0), wire.hole(r, HALF - 1, 2, 0),
                                      wire.data(r, HALF, CONTENT[HALF:])])),
    Case("read ends short", r"ended with 32768 of 65536 bytes",
         read=lambda wire, request: wire.data(request, 0, CONTENT[:HALF])),
    Case("reply for a cookie not in flight", r"not in flight",
         read=lambda wire, request: wire.data(request._replace(cookie=999), 0, CONTENT)),
    Case("reply magic", r"reply magic 0x12345678",
         read=lambda wire, request: struct.pack(">IIQ", 0x12345678, 0, request.cookie)),
    Case("closes in the middle of a reply", r"closed the connection in the middle of a reply",
         read=lambda wire, request: Close(wire.data(request, 0, CONTENT)[:HALF])),
    Case("closes between chunks", r"closed the connection before the DONE chunk",
         read=lambda wire, request: Close(wire.data(request, 0, CONTENT[:HALF], 0))),
    Case("NONE chunk without DONE", r"carry DONE",
         read=lambda wire, request: wire.chunk(request, ChunkType.NONE, b"", 0)),
    Case("unknown chunk type", r"unknown chunk type 77",
         read=lambda wire, request: wire.chunk(request, 77, b"")),
    Case("block status chunk for a read", r"block status chunk for READ",
         read=lambda wire, request: wire.status(request, 1, [(SIZE, 0)])),
    Case("error chunk with error 0", r"error 0", read=lambda wire, request: wire.error(request, 0, "fine")),
    Case("simple reply to a structured read", r"simple reply",
         read=lambda wire, request: wire.simple(request, data=CONTENT)),
    Case("extended reply without the request's offset", r"does not echo", extended=True,
         read=lambda wire, request: wire.data(request._replace(offset=4096), 0, CONTENT)),
    # Block status (items 6, 7)
    Case("2 Mi descriptors for a 64 KiB request", r"2097152 descriptors for a request of 65536 bytes",
         block_status=many_descriptors(2 * MIB)),
    Case("1 Mi extended descriptors for a 64 KiB request", r"1048576 descriptors for a request of 65536 bytes",
         extended=True, block_status=many_descriptors(MIB)),
    Case("extents covering the request twice over", r"first 1 extents .* cover 65536 bytes, not less than",
         block_status=extents((SIZE, 0), (SIZE, 0))),
    Case("an extent 4 GiB past the end of the export", r"end at 4294967295, past the end of the export",
         block_status=extents((0xFFFFFFFF, 0))),
    Case("an extent of length 0", r"length 0", block_status=extents((0, 0))),
    Case("an extent not a multiple of the minimum block size", r"multiple of the minimum block size 512",
         block_sizes=(512, 4096, MIB), block_status=extents((100, 0), (SIZE - 100, 0))),
    Case("block status for a context never agreed", r"context 7, not asked for",
         block_status=extents((SIZE, 0), context=7)),
    Case("block status of 13 bytes", r"13 bytes is not 4 \+ a positive multiple of 8",
         block_status=lambda wire, request: wire.chunk(request, ChunkType.BLOCK_STATUS, bytes(13))),
    Case("BLOCK_STATUS_EXT without extended headers", r"does not match the negotiated headers",
         block_status=lambda wire, request: wire.chunk(request, ChunkType.BLOCK_STATUS_EXT, bytes(24))),
    Case("read data for block status", r"read data for BLOCK_STATUS",
         block_status=lambda wire, request: wire.data(request, 0, CONTENT)),
    # Within the rules, however odd: exactly the export's bytes come back
    Case("65,536 one-byte chunks in order", None, read=one_byte_chunks(list(range(SIZE)))),
    Case("65,536 one-byte chunks, evens backwards then odds, extended headers", None, extended=True,
         read=one_byte_chunks(ODD_ORDER)),
    Case("65,536 one-byte extents", None, block_status=many_descriptors(SIZE)),
    Case("2 Mi descriptors for a long request", None, size=8 << 30, block_status=fragmented_status),
]
# fmt: on
CASE_IDS = [case.name for case in CASES]


def _error_cause(exc: BaseException) -> BaseException | None:
    """The RemoteProtocolError / NegotiationError that ``exc`` is, or that caused it; else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (n.RemoteProtocolError, n.NegotiationError)):
            return seen
        if not isinstance(seen, (ConnectionError, nt.CopyFailed)):
            return None
        seen = seen.__cause__
    return None


Outcome = tuple[bytes, dict[str, Any]] | BaseException


def check(case: Case, outcome: Outcome) -> None:
    if case.match is None:
        assert not isinstance(outcome, BaseException), f"{case}: {outcome!r}"
        data, status = outcome
        assert data == CONTENT, f"{case}: wrong data returned"
        extent = status[n.BASE_ALLOCATION][0]
        assert extent.length > 0 and extent.status == 0
        return
    assert isinstance(outcome, BaseException), f"{case}: the client accepted it"
    cause = _error_cause(outcome)
    assert cause is not None, f"{case}: {type(outcome).__name__}: {outcome}"
    assert re.search(case.match, str(cause)), f"{case}: {cause}"


def threads_client(uri: str) -> Outcome:
    try:
        with nt.connect(uri) as client:
            status = client.block_status(min(client.size, STATUS_LENGTH), 0)
            return client.pread(SIZE, 0), status
    except Exception as exc:  # judged by check()
        return exc


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_threads_client(case: Case) -> None:
    with serve_case(case) as uri:
        outcome: list[Outcome] = []
        worker = threading.Thread(target=lambda: outcome.append(threads_client(uri)), daemon=True)
        worker.start()
        worker.join(DEADLINE)
        assert not worker.is_alive(), f"{case}: the threads client hung"
    check(case, outcome[0])


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_anyio_client(case: Case) -> None:
    with serve_case(case) as uri:
        try:
            with anyio.fail_after(DEADLINE):
                async with await na.connect(uri) as client:
                    status = await client.block_status(min(client.size, STATUS_LENGTH), 0)
                    outcome: Outcome = (await client.pread(SIZE, 0), status)
        except Exception as exc:  # judged by check(); a TimeoutError (a hang) fails it
            outcome = exc
    check(case, outcome)


@pytest.mark.parametrize("case", [c for c in CASES if c.size == SIZE or c.handshake_only], ids=str)
def test_command_line(case: Case, tmp_path: Path) -> None:
    """``info`` shows handshake violations, ``copy`` the others; one line on stderr, exit status 1. Run in this
    process (``nbdproto.cli.main``, what ``python -m nbdproto`` calls) to keep 50 cases fast; the test below runs
    a few as real processes."""
    with serve_case(case) as uri:
        target = tmp_path / "copy.img"
        command = ["info", uri] if case.handshake_only else ["copy", "--no-progress", uri, str(target)]
        stderr = io.StringIO()
        status: list[int | BaseException] = []

        def run() -> None:
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
                    status.append(main(command))
            except BaseException as exc:  # a traceback: fails below
                status.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(DEADLINE)
        assert not worker.is_alive(), f"{case}: nbdproto {command[0]} hung"
    check_command_line(case, command[0], status[0], stderr.getvalue(), target)


def check_command_line(case: Case, command: str, status: int | BaseException, stderr: str, target: Path) -> None:
    if case.match is None:
        assert status == 0, stderr
        assert target.read_bytes() == CONTENT
        return
    assert status == 1, (status, stderr)
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"nbdproto {command}: ") and re.search(case.match, stderr), stderr


PROCESS_CASES = ["minimum block size 0", "meta context never asked for", "hole of 4 GiB",
                 "2 Mi descriptors for a 64 KiB request", "65,536 one-byte chunks in order"]  # fmt: skip


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_command_line_process(name: str, tmp_path: Path) -> None:
    """``python -m nbdproto info`` / ``copy`` as a process: exit status 1 and one line, no traceback."""
    (case,) = [c for c in CASES if c.name == name]
    with serve_case(case) as uri:
        target = tmp_path / "copy.img"
        command = ["info", uri] if case.handshake_only else ["copy", "--no-progress", uri, str(target)]
        done = subprocess.run([sys.executable, "-m", "nbdproto", *command], capture_output=True, text=True,
                              timeout=DEADLINE)  # fmt: skip
    check_command_line(case, command[0], done.returncode, done.stderr, target)


def test_every_case_is_distinct() -> None:
    assert len(set(CASE_IDS)) == len(CASE_IDS)
