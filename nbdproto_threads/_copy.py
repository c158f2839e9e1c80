"""Copy a disk between NBD exports and local files, the holes left as holes (``nbdproto copy`` SRC DST).

SRC and DST are NBD URIs or local paths; DST may also be ``null:``, which discards (for measuring), and either
may be ``-``: standard input or output, streamed in order (``_copystreams``). The source's allocation (block
status ``base:allocation`` for NBD, SEEK_DATA/SEEK_HOLE for files, all-zero chunks of a stream) splits the
disk into data and zero runs: data is read and written; zero runs are never sent as data, but become
WRITE_ZEROES (which may punch holes) on an NBD target, holes in a new file, or punched holes in an existing
one. As in nbdcopy, ``destination_is_zero`` skips them altogether (the target is known to read as zeros: a
new image, a fresh export), and ``allocated`` writes them as data instead (targets that must end up fully
allocated); ``flush`` makes what was written durable at the end (NBD_CMD_FLUSH, fdatasync), which is
otherwise left to the target.

Every request is aligned to the larger of the two ends' minimum block sizes (spec: "Size constraints"): a
zero run that starts or ends inside a block gives the partial blocks to the data around it. When the disk's
size is not a multiple of that block size, the last few bytes cannot be reached with aligned requests at all
(the spec says so: "the client would be unable to access the final few bytes of the export"). A client is bound
by the constraints only after asking for them (NBD_INFO_BLOCK_SIZE with NBD_OPT_GO), and a server that
enforces them on clients that did not ask MUST fail such requests cleanly, without corrupting data; so that
tail is copied first, over one more connection to the end that needs it, negotiated without asking for block
sizes. Where the server refuses (NBD_REP_ERR_BLOCK_SIZE_REQD, or EINVAL for the request), the copy stops
before anything else is copied, saying which bytes cannot be reached and why.

The copy is one thread driving every connection's sans-IO engine over non-blocking sockets (``selectors``):
``connections`` connections at each NBD end with ``requests`` requests in flight on each, each read's data
received straight into one of the copy's buffers (``ClientConnection.read_buffer``) and written from there.
Threads were tried first (a blocking Client per worker): their hand-offs and the GIL cost more than the
copying (bench/bench_copy.sh compares a copy with nbdcopy's).
"""

from __future__ import annotations

import os
import ssl
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import nbdproto
import nbdproto.client
from nbdproto import NBDError
from nbdproto.client import DIRTY_BITMAP_PREFIX

from ._copydirty import DirtySource
from ._copyends import FileEnd, NbdEnd, NullEnd
from ._copyloop import REQUEST_SIZE, CopyLoop, Done
from ._copyruns import UnreachableTail, pieces
from ._copystreams import StreamTarget, read_in_thread, zero_runs

__all__ = [
    "CopyEnd",
    "CopySource",
    "CopyTarget",
    "CopyProgress",
    "CopyFailed",
    "UnreachableTail",
    "copy",
    "SPARSE_DEFAULT",
]

STREAM = "-"
"""The name of standard input (as SRC) or standard output (as DST)."""

SPARSE_DEFAULT = 4096
"""The all-zero blocks a copy searches the data it reads for (nbdcopy's -S default on files and most exports)."""


class CopyEnd(Protocol):
    """What both ends of a copy have: a size, the largest request they take, the alignment requests need (a
    power of two: an NBD export's minimum block size), and a close."""

    @property
    def size(self) -> int: ...

    @property
    def max_request(self) -> int: ...

    @property
    def minimum_block_size(self) -> int: ...

    def close(self) -> None: ...


class CopySource(CopyEnd, Protocol):
    """Where a copy reads from: its data and zero runs, and reads that call ``done`` once the buffer is full."""

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, is_zero) runs covering the range, in order."""
        ...

    def read(self, buffer: memoryview, offset: int, done: Done) -> None: ...


class CopyTarget(CopyEnd, Protocol):
    """Where a copy writes to: writes, zeroes (never sent as data where the target can help it), a finish."""

    def write(self, data: memoryview, offset: int, done: Done) -> None: ...

    def zero(self, offset: int, length: int, done: Done) -> None: ...

    def finish(self, flush: bool = False) -> None:
        """The copy is complete; with ``flush``, make it durable (an NBD flush, fdatasync of a file)."""
        ...


@dataclass(slots=True)
class CopyProgress:
    """How far a copy got: ``copied`` of ``total`` bytes are done (data and zero runs), ``data`` of them were
    written as data. Handed to the ``progress`` callback after each piece completes, and returned at the end.
    ``total`` is 0 while a streamed source's size is unknown (it is set once the stream ends)."""

    total: int
    copied: int = 0
    data: int = 0
    in_flight: int = 0

    @property
    def fraction(self) -> float:
        """Done so far, from 0.0 to 1.0 (1.0 for an empty disk; 0.0 while a stream's size is unknown)."""
        if not self.total:
            return 1.0 if self.copied == 0 and not self.in_flight else 0.0
        return self.copied / self.total


class CopyFailed(Exception):
    """The copy stopped on an error (its ``__cause__``) after ``copied`` of ``total`` bytes were acknowledged by
    the target. With one connection and one request in flight those bytes are the first ``copied`` of the disk."""

    def __init__(self, cause: BaseException, copied: int, total: int) -> None:
        super().__init__(f"{cause} ({copied} of {total} bytes copied)")
        self.copied = copied
        self.total = total


@dataclass(frozen=True)
class _Options:
    slots: int
    request_size: int
    destination_is_zero: bool
    allocated: bool
    flush: bool
    report: Callable[[CopyProgress], None] | None
    sparse: int = 0
    queue_size: int | None = None
    extents: bool = True


# --- The copy -------------------------------------------------------------------------------------------


def copy(
    src: str,
    dst: str,
    *,
    connections: int = 4,
    requests: int = 2,
    tls: ssl.SSLContext | None = None,
    progress: Callable[[CopyProgress], None] | None = None,
    request_size: int = REQUEST_SIZE,
    destination_is_zero: bool = False,
    allocated: bool = False,
    flush: bool = False,
    timeout: float | None = 30.0,
    sparse: int = SPARSE_DEFAULT,
    extents: bool = True,
    queue_size: int | None = None,
    synchronous: bool = False,
    threads: int = 0,
    verbose: Callable[[str], None] | None = None,
    only_dirty: str | None = None,
) -> CopyProgress:
    """Copy SRC to DST (NBD URIs, local paths or ``-``; DST may be ``null:``) and say how it went.

    ``connections`` connections at each NBD end (one where the server does not promise multi-conn), each with
    ``requests`` requests in flight, each of at most ``request_size`` bytes. ``progress`` is called with the
    running totals after each piece. ``destination_is_zero``, ``allocated`` and ``flush``: as the module
    docstring says. ``timeout``: seconds any wait for a server may take (a connect, a handshake, a reply); None:
    no limit. The rest are nbdcopy's: ``sparse`` (-S): data read is searched for all-zero blocks of this many
    bytes (at least the ends' minimum block size), which become zero runs like the source's holes (0: none
    are searched for); ``extents`` (False: --no-extents): the source's allocation is not asked, every byte is
    read; ``queue_size``: at most this many bytes of requests in flight; ``synchronous``: one connection, one
    request at a time, in order; ``threads``: worker threads for local file I/O (0: as the files suit).
    ``verbose`` is told what each end is and how the copy will run, a line at a time. ``only_dirty``: copy
    only the regions SRC (an NBD URI) reports dirty in ``qemu:dirty-bitmap:NAME`` onto DST, an existing copy of
    what SRC held when the bitmap started (``_copydirty``); the progress then counts the dirty bytes only.

    A regular file as DST ends up the size of SRC (grown or cut), as nbdcopy leaves it. Raises CopyFailed (its
    cause, and how far the copy got) when an end fails mid-way.
    """
    if only_dirty is not None:
        _check_only_dirty(src, dst, destination_is_zero)
    if request_size < 1:
        raise ValueError(f"request size {request_size} must be positive")
    if sparse < 0 or sparse & (sparse - 1):
        raise ValueError(f"sparse block size {sparse} must be 0 or a power of two")
    if synchronous:
        connections, requests = 1, 1
    # No zeros to search for in data written as it is (--allocated), nor in data dropped unread (to null:).
    searched = 0 if allocated or dst == "null:" else sparse
    options = _Options(max(1, connections * requests), request_size, destination_is_zero, allocated, flush, progress,
                       searched, queue_size, extents)  # fmt: skip
    loop = CopyLoop(timeout)
    source: NbdEnd | FileEnd | None = None
    target: NbdEnd | FileEnd | NullEnd | StreamTarget | None = None
    opened: int | None = None  # DST's descriptor when it is written as a stream
    streamed: int | None = None  # SRC's descriptor when it is read as one
    failed = True
    try:
        if only_dirty is not None:
            source = NbdEnd(src, connections, tls, loop, (nbdproto.BASE_ALLOCATION, DIRTY_BITMAP_PREFIX + only_dirty))
        elif src != STREAM and not nbdproto.client.looks_like_uri(src) and _is_stream(src):  # a pipe, /dev/zero...
            streamed = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        elif src != STREAM:
            is_uri = nbdproto.client.looks_like_uri(src)
            source = NbdEnd(src, connections, tls, loop) if is_uri else FileEnd(src, loop, writable=False)
        if dst == "null:":
            target = NullEnd()
            if isinstance(source, NbdEnd):
                source.discard_reads()
        elif nbdproto.client.looks_like_uri(dst):
            target = NbdEnd(dst, connections, tls, loop)
        elif dst == STREAM:
            target = StreamTarget(sys.stdout.fileno(), loop)
        elif source is None or _is_stream(dst):  # written in order: from a stream, or to a pipe or /dev/null
            flags = os.O_WRONLY | os.O_CLOEXEC | (0 if _is_stream(dst) else os.O_CREAT | os.O_TRUNC)
            opened = os.open(dst, flags, 0o666)
            target = StreamTarget(opened, loop)
        else:
            target = FileEnd(dst, loop, writable=True, size=source.size)
        if threads > 0:
            loop.worker_count = threads
        if verbose is not None:
            _describe(verbose, src, source, dst, target, connections, requests, options)
        if source is None:
            done = _run_stream(sys.stdin.fileno() if streamed is None else streamed, target, loop, options)
        else:
            if target.size < source.size:
                raise ValueError(f"{dst} holds {target.size} bytes, less than the {source.size} of {src}")
            block = max(source.minimum_block_size, target.minimum_block_size)  # powers of two: the larger is the LCM
            if isinstance(source, NbdEnd) and only_dirty is not None:
                done = _run(DirtySource(source, only_dirty, block), target, loop, options, block)
            else:
                done = _run(source, target, loop, options, block)
        failed = False
        return done
    finally:
        for end in (source, target):
            if end is not None:
                end.close()
        for fd in (opened, streamed):
            if fd is not None:
                os.close(fd)
        loop.close(wait=not failed)  # a worker stuck on a read of standard input must not hold up Ctrl-C


def _is_stream(path: str) -> bool:
    """Whether ``path`` is a pipe or a character device (``/dev/null``, a tape): no size, no seeking; copied
    in order, as standard input and output are."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _describe(say: Callable[[str], None], src: str, source: object, dst: str, target: object, connections: int,
              requests: int, options: _Options) -> None:  # fmt: skip
    """The ``verbose`` lines: what each end is, and how the copy runs (as nbdcopy -v prints them)."""
    for role, name, end in (("src", src, source), ("dst", dst, target)):
        kind = {NbdEnd: "nbd", FileEnd: "file", NullEnd: "null", StreamTarget: "stream"}.get(type(end), "stream")
        say(f"{role}: {kind} {name!r}")
        if end is not None and not isinstance(end, (NullEnd, StreamTarget)):
            assert isinstance(end, (NbdEnd, FileEnd))
            extents = f", extents={'yes' if end.sparse_aware and options.extents else 'no'}" if role == "src" else ""
            say(f"{role}: size={end.size}, minimum block size={end.minimum_block_size}{extents}")
    say(f"connections={connections} requests={requests} request size={options.request_size} "
        f"sparse={options.sparse} queue size={options.queue_size or 'unlimited'} "
        f"synchronous={'true' if options.slots == 1 and connections == 1 else 'false'}")  # fmt: skip


def _check_only_dirty(src: str, dst: str, destination_is_zero: bool) -> None:
    if not nbdproto.client.looks_like_uri(src):
        raise ValueError(f"only an NBD export says what is dirty: {src} is not an NBD URI")
    if destination_is_zero:
        raise ValueError(
            "with only the dirty regions copied, the destination holds the previous backup: it is not zero"
        )
    if dst == STREAM or not (nbdproto.client.looks_like_uri(dst) or dst == "null:" or os.path.exists(dst)):
        raise ValueError(f"{dst} must be the previous backup, an existing image to copy the changes onto")


def _step(largest: int, block: int, options: _Options) -> int:
    largest = min(largest, options.request_size)
    step = largest - largest % block
    if not step:
        raise ValueError(f"no request size suits both ends: at most {largest} bytes a request, in multiples of "
                         f"{block}")  # fmt: skip
    return step


class _Pieces:
    """The bookkeeping of pieces in flight: buffers, progress, and how a zero run goes to the target."""

    def __init__(self, target: CopyTarget, step: int, total: int, options: _Options) -> None:
        self.target = target
        self.options = options
        # --queue-size bounds the bytes of requests in flight: as many requests of ``step`` as fit (one at least).
        queued = options.slots if options.queue_size is None else max(1, options.queue_size // step)
        self.slots = min(options.slots, queued)
        self.free = [memoryview(bytearray(step)) for _ in range(self.slots)]
        self.zeroes = memoryview(bytes(step)) if options.allocated else None
        self.progress = CopyProgress(total)

    def finished(self, length: int, buffer: memoryview | None, data: bool) -> None:
        progress = self.progress
        progress.in_flight -= 1
        if buffer is not None:
            self.free.append(buffer)
        if data:
            progress.data += length
        progress.copied += length
        if self.options.report is not None:
            self.options.report(progress)

    def zero(self, offset: int, length: int) -> None:
        """A zero run: skipped on a destination known to be zero, written as data when ``allocated``, else
        the target's zero (WRITE_ZEROES, a hole)."""
        progress = self.progress
        if self.zeroes is not None:
            step = len(self.zeroes)
            for at in range(offset, offset + length, step):
                size = min(step, offset + length - at)
                progress.in_flight += 1
                self.target.write(self.zeroes[:size], at, lambda size=size: self.finished(size, None, True))  # type: ignore[misc]
            return
        progress.in_flight += 1
        if self.options.destination_is_zero:
            self.finished(length, None, False)
            return
        self.target.zero(offset, length, lambda: self.finished(length, None, False))


def _run(source: CopySource, target: CopyTarget, loop: CopyLoop, options: _Options, block: int = 1) -> CopyProgress:
    step = _step(min(source.max_request, target.max_request), block, options)
    aligned = source.size - source.size % block
    book = _Pieces(target, step, getattr(source, "total", source.size), options)
    progress = book.progress
    granule = max(options.sparse, block)
    runs = source.runs if options.extents else _all_data

    def start(offset: int, length: int, zero: bool) -> None:
        if zero:
            book.zero(offset, length)
            return
        progress.in_flight += 1
        buffer = book.free.pop()
        view = buffer[:length]
        if not options.sparse:
            source.read(view, offset, lambda: target.write(view, offset, lambda: book.finished(length, buffer, True)))
            return

        def read() -> None:  # the data searched for zero blocks, which go as zero runs (nbdcopy's -S)
            progress.in_flight -= 1
            _send_chunk(book, buffer, offset, length, granule)

        source.read(view, offset, read)

    try:
        if aligned < source.size:  # first, so that a tail no server lets us reach stops the copy before it starts
            try:
                start(aligned, source.size - aligned, False)
                loop.wait(lambda: not progress.in_flight)
            except (NBDError, OSError, nbdproto.ProtocolError) as exc:
                unreachable = UnreachableTail(source.size - aligned, aligned, block)
                unreachable.__cause__ = exc
                raise CopyFailed(unreachable, 0, source.size) from unreachable
        # Each piece in flight holds at most one buffer, so a free slot always has a free buffer.
        for piece in pieces(runs, aligned, step, block):
            while progress.in_flight >= book.slots or not book.free:
                loop.step()
            start(*piece)
        loop.wait(lambda: not progress.in_flight)
        target.finish(options.flush)
    except (NBDError, OSError, nbdproto.ProtocolError) as exc:
        raise CopyFailed(exc, progress.copied, source.size) from exc
    return progress


def _all_data(offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """The runs of a source whose allocation is not asked (--no-extents): all data."""
    yield offset, length, False


def _run_stream(fd: int, target: CopyTarget, loop: CopyLoop, options: _Options) -> CopyProgress:
    """Copy what ``fd`` (standard input) holds to ``target`` in order, chunk by chunk, until end of file."""
    step = _step(target.max_request, target.minimum_block_size, options)
    granule = max(options.sparse, target.minimum_block_size) if options.sparse else 1
    book = _Pieces(target, step, 0 if isinstance(target, StreamTarget) else target.size, options)
    progress = book.progress
    offset = 0
    try:
        while True:
            while not book.free:
                loop.step()
            buffer = book.free.pop()
            count = read_in_thread(loop, fd, buffer)
            if offset + count > target.size:
                raise ValueError(f"standard input holds more than the {target.size} bytes of the destination")
            _send_chunk(book, buffer, offset, count, granule)
            offset += count
            if count < step:
                break
        loop.wait(lambda: not progress.in_flight)
        progress.total = offset
        target.finish(options.flush)
    except (NBDError, OSError, nbdproto.ProtocolError) as exc:
        raise CopyFailed(exc, progress.copied, progress.total) from exc
    return progress


def _send_chunk(book: _Pieces, buffer: memoryview, offset: int, count: int, granule: int) -> None:
    """Send the first ``count`` bytes of ``buffer`` (data read for ``offset``): its data runs as writes, its
    all-zero runs of whole ``granule``s as zero runs (granule 1: no search, all written). The buffer is free
    again once every write from it is done."""
    if granule <= 1:
        runs = [(0, count, False)]
    else:
        owner = buffer.obj
        runs = list(zero_runs(buffer[:count], granule, owner if isinstance(owner, bytearray) else None))
    writes = sum(1 for _, _, zero in runs if not zero)
    if not writes:
        book.free.append(buffer)
    left = [writes]

    def one_done(length: int) -> None:
        left[0] -= 1
        book.finished(length, buffer if not left[0] else None, True)

    for start, end, zero in runs:
        if zero:
            book.zero(offset + start, end - start)
            continue
        book.progress.in_flight += 1
        book.target.write(buffer[start:end], offset + start, lambda length=end - start: one_done(length))  # type: ignore[misc]
