"""The ends of a copy: NBD exports (several connections each), local files, ``null:`` (see ``_copy``)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import nbdproto
from nbdproto import NBDError
from nbdproto.wire import STATUS_SPAN

from ._client import Connection, open_connection, open_together
from ._copyloop import REQUEST_SIZE, CopyConnection, CopyLoop, Done, checked

if TYPE_CHECKING:
    from nbdproto.devices import FileDevice

__all__ = ["NbdEnd", "FileEnd", "NullEnd", "UNLIMITED"]

UNLIMITED = 1 << 30
"""The largest request of an end that has no limit of its own (a file, ``null:``): the copy's request size
decides (REQUEST_SIZE unless asked otherwise)."""


class NbdEnd:
    """An NBD export through several connections; requests go to the least busy one. A request not aligned to
    the export's minimum block size (the unaligned tail of the disk) goes to a connection of its own that did
    not ask for block sizes (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        connections: int,
        tls: ssl.SSLContext | None,
        loop: CopyLoop,
        meta_contexts: Sequence[str] = (nbdproto.BASE_ALLOCATION,),
    ) -> None:
        self.loop = loop
        self.uri, self.tls = uri, tls
        self.unconstrained: CopyConnection | None = None
        self._discard = False
        first = open_connection(uri, tls=tls, timeout=loop.timeout, meta_contexts=meta_contexts)
        self.connections = [CopyConnection(first)]
        loop.add(self.connections[0])
        export = self.connections[0].export
        # More than one connection only where the server promises they see each other's writes.
        count = connections if export.flags & nbdproto.TransmissionFlags.CAN_MULTI_CONN else 1
        for connection in _open_together(uri, tls, count - 1, loop.timeout):
            self.connections.append(CopyConnection(connection))
            loop.add(self.connections[-1])
        self.export = export
        self.size = export.size
        self.max_request = export.maximum_payload
        self.minimum_block_size = export.minimum_block_size
        self.can_zero = bool(export.flags & nbdproto.TransmissionFlags.SEND_WRITE_ZEROES)
        self.context = next(
            (i for i, name in self.connections[0].engine.meta_contexts.items() if name == nbdproto.BASE_ALLOCATION),
            None,
        )
        self.sparse_aware = self.context is not None
        self.fresh = False
        self._zeroes = memoryview(bytes(min(REQUEST_SIZE, self.max_request)))

    def discard_reads(self) -> None:
        """The data read is not wanted (see CopyConnection.discard_reads)."""
        self._discard = True
        for connection in (*self.connections, *([self.unconstrained] if self.unconstrained else [])):
            connection.discard_reads()

    def _pick(self, offset: int, length: int) -> CopyConnection:
        if (offset | length) % self.minimum_block_size:
            return self._unconstrained()
        return min(self.connections, key=lambda c: len(c.callbacks))

    def _unconstrained(self) -> CopyConnection:
        if self.unconstrained is None:
            try:
                connection = open_connection(
                    self.uri, tls=self.tls, meta_contexts=(), block_sizes=False, timeout=self.loop.timeout
                )
            except nbdproto.NegotiationError as exc:
                raise nbdproto.NegotiationError(f"{self.uri} would not negotiate without block sizes: {exc}",
                                                exc.reply_type) from exc  # fmt: skip
            self.unconstrained = CopyConnection(connection)
            if self._discard:
                self.unconstrained.discard_reads()
            self.loop.add(self.unconstrained)
        return self.unconstrained

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        if not self.sparse_aware:
            yield offset, length, False
            return
        end = offset + length
        while offset < end:
            for extent in self._block_status(offset, min(end - offset, STATUS_SPAN)):
                size = min(extent.length, end - offset)
                yield offset, size, bool(extent.status & nbdproto.AllocationState.ZERO)
                offset += size
                if offset >= end:
                    break

    def _block_status(self, offset: int, length: int) -> tuple[nbdproto.Extent, ...]:
        # Waited for here, while the other requests in flight go on.
        answer: list[Any] = []
        self.connections[0].request(lambda c: nbdproto.BlockStatusRequest(c, offset, length), answer.append)
        self.loop.wait(lambda: bool(answer))
        (reply,) = answer
        if isinstance(reply, nbdproto.ErrorReply):
            raise NBDError(int(reply.error), reply.message or os.strerror(int(reply.error)))
        extents: tuple[nbdproto.Extent, ...] = reply.extents[self.context]
        return extents

    def read(self, buffer: memoryview, offset: int, done: Done) -> None:
        connection = self._pick(offset, len(buffer))
        connection.request(lambda c: nbdproto.ReadRequest(c, offset, len(buffer), buffer=buffer), checked(done))

    def write(self, data: memoryview, offset: int, done: Done) -> None:
        self._pick(offset, len(data)).request(lambda c: nbdproto.WriteRequest(c, offset, data), checked(done))

    def zero(self, offset: int, length: int, done: Done) -> None:
        if self.can_zero:
            connection = self._pick(offset, length)
            connection.request(lambda c: nbdproto.WriteZeroesRequest(c, offset, length), checked(done))
            return
        # No WRITE_ZEROES: zeroes written as data, the run done when its last write is.
        pieces = [(at, min(len(self._zeroes), offset + length - at)) for at in range(offset, offset + length,
                                                                                      len(self._zeroes))]  # fmt: skip
        left = [len(pieces)]

        def one_done() -> None:
            left[0] -= 1
            if not left[0]:
                done()

        for at, size in pieces:
            self.write(self._zeroes[:size], at, one_done)

    def finish(self, flush: bool = False) -> None:
        if not flush or self.export.read_only or not self.export.flags & nbdproto.TransmissionFlags.SEND_FLUSH:
            return
        flushed: list[bool] = []
        self.connections[0].request(lambda c: nbdproto.FlushRequest(c), checked(lambda: flushed.append(True)))
        self.loop.wait(lambda: bool(flushed))

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        if self.unconstrained is not None:
            self.unconstrained.close()


def _open_together(uri: str, tls: ssl.SSLContext | None, count: int, timeout: float | None) -> list[Connection]:
    """Open and negotiate ``count`` connections at once."""
    return open_together(
        count, lambda: open_connection(uri, tls=tls, timeout=timeout), lambda connection: connection.stream.close()
    )


class FileEnd:
    """A local file (or block device) through FileDevice, its reads and writes made in worker threads."""

    def __init__(self, path: str, loop: CopyLoop, *, writable: bool, size: int = 0) -> None:
        self.loop = loop
        self.fresh = writable and (not os.path.exists(path) or os.path.getsize(path) == 0)
        if writable and not os.path.exists(path):
            open(path, "wb").close()
        if writable and os.path.isfile(path) and os.path.getsize(path) != size:
            # The copy's size, as nbdcopy leaves a regular file: a new or short one grows sparse (its holes read as
            # zero already), a longer one is cut, so that nothing of its old contents is left past the end.
            os.truncate(path, size)
        from nbdproto.devices import FileDevice  # ctypes and all: only when a local file takes part

        self.device: FileDevice = FileDevice(path, read_only=not writable)
        if not self.device.in_memory:
            loop.worker_count = 4
        self.size = self.device.size
        self.max_request = UNLIMITED
        self.minimum_block_size = 1
        self.sparse_aware = True

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        end = offset + length
        while offset < end:  # FileDevice.extents may stop short (a bounded number of runs per call)
            for extent_length, status in self.device.extents(nbdproto.BASE_ALLOCATION, offset, end - offset):
                size = min(extent_length, end - offset)
                yield offset, size, bool(status & nbdproto.AllocationState.ZERO)
                offset += size

    def read(self, buffer: memoryview, offset: int, done: Done) -> None:
        self.loop.in_thread(lambda: self.device.pread_into(buffer, offset), done)

    def write(self, data: memoryview, offset: int, done: Done) -> None:
        self.loop.in_thread(lambda: self.device.pwrite(data, offset), done)

    def zero(self, offset: int, length: int, done: Done) -> None:
        if self.fresh:
            done()
            return
        self.loop.in_thread(lambda: self.device.write_zeroes(offset, length, may_trim=True), done)

    def finish(self, flush: bool = False) -> None:
        if flush:
            self.device.flush()

    def close(self) -> None:
        self.device.close()


class NullEnd:
    """``null:``: a destination that takes everything and keeps nothing."""

    size = 1 << 63
    max_request = UNLIMITED
    minimum_block_size = 1

    def write(self, data: memoryview, offset: int, done: Done) -> None:
        done()

    def zero(self, offset: int, length: int, done: Done) -> None:
        done()

    def finish(self, flush: bool = False) -> None:
        pass

    def close(self) -> None:
        pass
