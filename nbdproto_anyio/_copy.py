"""``nbdproto copy SRC DST``: copy a disk between NBD exports and local files, the holes left as holes.

SRC and DST are NBD URIs or local paths (DST may also be ``null:``, which discards, for measuring). The source's
allocation (block status ``base:allocation`` for NBD, SEEK_DATA/SEEK_HOLE for files) splits the disk into data
and zero runs: data is read and written; zero runs are never sent as data, but become WRITE_ZEROES (which may
punch holes) on an NBD target, holes in a new file, or punched holes in an existing one. The work is spread
over ``connections`` connections at each end with ``requests`` requests in flight on each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import nbdproto
from nbdproto_threads import Client, FileDevice, NBDError, connect

from ._cli_query import add_tls_arguments, client_tls

__all__ = ["add_copy_command", "copy", "copy_command"]

REQUEST_SIZE = 1 << 20
"""Bytes per request: large enough that Python's per-request cost vanishes, within every server's limit."""
WINDOW = 64 << 20
"""How much of the source one block-status query covers."""


def add_copy_command(commands: Any) -> None:
    parser = commands.add_parser("copy", help="copy between NBD exports and files, sparse-aware and in parallel")
    parser.add_argument("src", metavar="SRC", help="NBD URI or file")
    parser.add_argument("dst", metavar="DST", help="NBD URI, file, or null: (discard)")
    parser.add_argument("--connections", type=int, default=4, help="connections at each NBD end (default 4)")
    # Measured (bench/bench_copy.sh): one request per connection beats four, the worker threads share one GIL.
    parser.add_argument("--requests", type=int, default=1, help="requests in flight per connection (default 1)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    add_tls_arguments(parser)


def _is_uri(text: str) -> bool:
    return "://" in text


class _Nbd:
    """An NBD export through several connections, one chosen per worker thread."""

    def __init__(self, uri: str, connections: int, tls: Any) -> None:
        self.clients: list[Client] = [connect(uri, tls=tls)]
        export = self.clients[0].export
        # More than one connection only where the server promises they see each other's writes.
        count = connections if export.flags & nbdproto.TransmissionFlags.CAN_MULTI_CONN else 1
        self.clients += [connect(uri, tls=tls) for _ in range(count - 1)]
        self.size = export.size
        self.max_request = min(REQUEST_SIZE, export.maximum_payload)
        self.can_zero = bool(export.flags & nbdproto.TransmissionFlags.SEND_WRITE_ZEROES)
        self.sparse_aware = nbdproto.BASE_ALLOCATION in self.clients[0].meta_contexts.values()
        self.fresh = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def client(self) -> Client:
        # Each worker thread sticks to one connection, handed out in turn.
        chosen: Client | None = getattr(self._local, "client", None)
        if chosen is None:
            with self._lock:
                chosen = self._local.client = self.clients[next(self._turn) % len(self.clients)]
        return chosen

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        if not self.sparse_aware:
            yield offset, length, False
            return
        end = offset + length
        while offset < end:
            extents = self.clients[0].block_status(end - offset, offset)[nbdproto.BASE_ALLOCATION]
            for extent in extents:
                size = min(extent.length, end - offset)
                yield offset, size, bool(extent.status & nbdproto.AllocationState.ZERO)
                offset += size
                if offset >= end:
                    break

    def read(self, buffer: memoryview, offset: int) -> None:
        self.client().pread_into(buffer, offset)

    def write(self, data: memoryview, offset: int) -> None:
        self.client().pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        if self.can_zero:
            self.client().zero(length, offset, may_trim=True)
            return
        chunk = bytes(min(length, self.max_request))
        done = 0
        while done < length:
            step = min(len(chunk), length - done)
            self.client().pwrite(memoryview(chunk)[:step], offset + done)
            done += step

    def finish(self) -> None:
        client = self.clients[0]
        if not client.export.read_only and client.export.flags & nbdproto.TransmissionFlags.SEND_FLUSH:
            client.flush()

    def close(self) -> None:
        for client in self.clients:
            client.close()


class _File:
    """A local file (or block device) through FileDevice."""

    def __init__(self, path: str, *, writable: bool, size: int = 0) -> None:
        self.fresh = writable and (not os.path.exists(path) or os.path.getsize(path) == 0)
        if writable and not os.path.exists(path):
            open(path, "wb").close()
        if writable and os.path.isfile(path) and os.path.getsize(path) < size:
            os.truncate(path, size)  # a new or short file grows sparse: its holes already read as zero
        self.device = FileDevice(path, read_only=not writable)
        self.size = self.device.size
        self.max_request = REQUEST_SIZE
        self.sparse_aware = True

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        position = offset
        for extent_length, status in self.device.extents(nbdproto.BASE_ALLOCATION, offset, length):
            yield position, extent_length, bool(status & nbdproto.AllocationState.ZERO)
            position += extent_length

    def read(self, buffer: memoryview, offset: int) -> None:
        self.device.pread_into(buffer, offset)

    def write(self, data: memoryview, offset: int) -> None:
        self.device.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        if not self.fresh:
            self.device.write_zeroes(offset, length, may_trim=True)

    def finish(self) -> None:
        self.device.flush()

    def close(self) -> None:
        self.device.close()


class _Null:
    """``null:``: a destination that takes everything and keeps nothing."""

    size = 1 << 63
    max_request = REQUEST_SIZE
    fresh = True

    def write(self, data: memoryview, offset: int) -> None:
        pass

    def zero(self, offset: int, length: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def _pieces(source: Any, size: int, step: int) -> Iterator[tuple[int, int, bool]]:
    """Data and zero runs of the source, cut to at most ``step`` bytes (zero runs are not cut)."""
    for window in range(0, size, WINDOW):
        for offset, length, zero in source.runs(window, min(WINDOW, size - window)):
            if zero:
                yield offset, length, True
                continue
            for start in range(offset, offset + length, step):
                yield start, min(step, offset + length - start), False


def copy(
    src: str, dst: str, *, connections: int = 4, requests: int = 1, progress: bool = False, tls: Any = None
) -> int:
    """Copy SRC to DST; returns the number of bytes copied as data (zero runs excluded)."""
    source: Any = _Nbd(src, connections, tls) if _is_uri(src) else _File(src, writable=False)
    target: Any = None
    try:
        if dst == "null:":
            target = _Null()
        elif _is_uri(dst):
            target = _Nbd(dst, connections, tls)
        else:
            target = _File(dst, writable=True, size=source.size)
        if target.size < source.size:
            raise ValueError(f"{dst} holds {target.size} bytes, less than the {source.size} of {src}")
        step = min(source.max_request, target.max_request)
        workers = max(1, connections * requests)
        local = threading.local()
        data_bytes = 0
        bar = _progress_bar(source.size, progress)
        lock = threading.Lock()

        def work(offset: int, length: int, zero: bool) -> int:
            if zero:
                target.zero(offset, length)
            else:
                buffer = getattr(local, "buffer", None)
                if buffer is None or len(buffer) < step:
                    buffer = local.buffer = memoryview(bytearray(step))
                view = buffer[:length]
                source.read(view, offset)
                target.write(view, offset)
            with lock:
                bar.update(length)
            return 0 if zero else length

        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="nbd-copy") as pool:
            pending: set[concurrent.futures.Future[int]] = set()
            for piece in _pieces(source, source.size, step):
                pending.add(pool.submit(work, *piece))
                if len(pending) >= workers * 2:  # bounded: never the whole disk's worth of futures at once
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    data_bytes += sum(f.result() for f in done)
            data_bytes += sum(f.result() for f in concurrent.futures.as_completed(pending))
        target.finish()
        bar.close()
        return data_bytes
    finally:
        source.close()
        if target is not None:
            target.close()


def _progress_bar(total: int, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show, file=sys.stderr)


def copy_command(args: argparse.Namespace) -> int:
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    tls_uri = args.src if _is_uri(args.src) else args.dst if _is_uri(args.dst) else None
    tls = client_tls(args, tls_uri) if tls_uri else None
    try:
        copy(args.src, args.dst, connections=args.connections, requests=args.requests, progress=show, tls=tls)
    except (NBDError, OSError, ValueError, nbdproto.ProtocolError) as exc:
        print(f"nbdproto copy: {exc}", file=sys.stderr)
        return 1
    return 0
