"""How many bytes a server driver asks of its next receive: small while requests are small, large while the
client streams big writes. ServerSessionLogic keeps one per connection (``receive_size``), fed by every receive
the driver hands it."""

from __future__ import annotations

__all__ = ["RECV_SIZE", "STREAM_RECV_SIZE", "ReceiveSize"]

RECV_SIZE = 64 * 1024
"""Bytes asked of a receive normally: enough for hundreds of pipelined request headers in one system call, and
small enough that the interpreter's allocation of the result stays on the heap. Asking for more costs an mmap
and an munmap for every receive that brings less, a cost that shows one request at a time (bench/bench_qd1.sh)."""

STREAM_RECV_SIZE = 1 << 20
"""About the bytes asked of a receive while the client streams writes larger than RECV_SIZE (nbdcopy's 256 KiB, with
dozens in flight; rounded to a whole number of them, see ``ReceiveSize.streaming``): one receive then brings several
whole writes, each handed to the device as a slice of what was received (no copy), instead of two receives and two
turns of the server's loop for every write (bench/bench_table.py's nbdcopy write; larger receives brought no
more). A receive holds its buffer while it waits, so a driver asks for this much only where bytes are waiting (the anyio
server receives once the socket is readable, the threads server with a receive that does not wait, falling back to a
waiting one of RECV_SIZE): a client that streamed big writes and went quiet costs the server no more than any other
(bench/bench_memory.py)."""

_LONGEST_HEADER = 32  # an extended request header: a write of STREAM_RECV_SIZE bytes with one is still a receive


class ReceiveSize:
    """The size of a server connection's next receive (``next``): RECV_SIZE, or while the client streams writes
    bigger than a receive, about STREAM_RECV_SIZE (``streaming``). Streaming starts the moment a receive into a
    write payload's own buffer brings at least RECV_SIZE bytes, and ends once a receive of the stream brings less
    than RECV_SIZE (it stopped). Small writes, however many, never start it: their payloads fit in what a
    receive brings."""

    __slots__ = ("next", "streaming_in_place", "_streaming", "_write_size", "_header_size", "_header_received")

    def __init__(self) -> None:
        self.next = RECV_SIZE
        self.streaming_in_place = False
        """True while big writes stream in and are received in place (see ``in_place``): the next receive is of
        a request header alone, and may be one with the rest of the payload before it
        (ServerSessionLogic.in_place_buffers)."""
        self._streaming = False
        self._write_size = 0
        self._header_size = 0  # writes are received in place: a request header's size (0: they are not)
        self._header_received = False  # in place: the last receive was the stream's, not a payload's

    def in_place(self, header_size: int) -> None:
        """Write payloads are received in place (ServerConnection.write_view) from now on, after request headers
        of ``header_size`` bytes: while the client streams big writes, a receive of the stream asks for one
        header, so that the payload after it is received straight into place instead of into the stream's
        buffer (and copied from there). Streaming then starts with the payload of a write bigger than
        RECV_SIZE, and ends with the payload of a smaller one, or when two receives of the stream come in a row
        (the header was not a write's)."""
        self._header_size = header_size
        self.streaming_in_place = self._streaming and bool(header_size)

    @staticmethod
    def streaming(write_size: int) -> int:
        """The size asked of receives while writes of ``write_size`` bytes on the wire (header and payload; 0:
        not known yet) stream in: the whole number of them nearest STREAM_RECV_SIZE (at least one), so at most
        a third more than it; STREAM_RECV_SIZE itself for writes bigger than that (they straddle receives
        whatever their size, and a receive must not grow with what a client chooses to send). A receive
        that brings all it asked for then ends where a request ends, and the next one starts a receive instead
        of straddling two: a straddling write's payload needs a buffer of its own (allocated, zeroed, and
        filled with a copy of what arrived and a receive of the rest). With nbdcopy's 256 KiB writes and 1 MiB
        receives, one write in four straddled, and a receive brought the last 112 bytes of it; with whole
        numbers of writes only a receive that brings less than it asked leaves a write straddling (the server
        CPU per GiB: bench/bench_table.py's nbdcopy write)."""
        if not 0 < write_size <= STREAM_RECV_SIZE + _LONGEST_HEADER:
            return STREAM_RECV_SIZE
        return write_size * max(1, (STREAM_RECV_SIZE + write_size // 2) // write_size)

    def received(self, count: int, into_payload: bool, write_size: int = 0) -> None:
        """A receive brought ``count`` bytes: into the own buffer of a write payload (the write's size on the
        wire, header and payload, as ``write_size`` when known), or as the stream's bytes. While not streaming
        (``next`` is RECV_SIZE), a receive of the stream's bytes changes nothing."""
        in_place = self._header_size
        if into_payload:
            if write_size:
                self._write_size = write_size
            if in_place:
                self._streaming = self._write_size > RECV_SIZE
            elif count >= RECV_SIZE:
                self._streaming = True
            self._header_received = False
        elif in_place:
            self._streaming = self._streaming and not self._header_received
            self._header_received = self._streaming
        elif count < RECV_SIZE:
            self._streaming = False
        if not self._streaming:
            self.next = RECV_SIZE
        else:
            self.next = in_place or self.streaming(self._write_size)
        self.streaming_in_place = self._streaming and bool(in_place)

    def received_payload_and_header(self, write_size: int) -> None:
        """In place (``in_place``): one receive brought the rest of the payload of a write of ``write_size``
        bytes on the wire and the header after it, what ``received`` says of the two parts, in one call."""
        self._write_size = write_size
        self._streaming = self._header_received = self.streaming_in_place = write_size > RECV_SIZE
        self.next = self._header_size if self._streaming else RECV_SIZE
