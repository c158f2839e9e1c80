"""How many bytes a server driver asks of its next receive: small while requests are small, large while the
client streams big writes. ServerSessionLogic keeps one per connection (``receive_size``), fed by every receive
the driver hands it."""

from __future__ import annotations

__all__ = ["RECV_SIZE", "STREAM_RECV_SIZE", "ReceiveSize"]

RECV_SIZE = 64 * 1024
"""Bytes asked of a receive normally: enough for hundreds of pipelined request headers in one system call, and
small enough that the interpreter's allocation of the result stays on the heap. Asking for more costs an mmap
and an munmap for every receive that brings less (measured one request at a time: 1 MiB took twice the server
CPU per request of 64 KiB)."""

STREAM_RECV_SIZE = 1 << 20
"""Bytes asked of a receive while the client streams writes larger than RECV_SIZE (nbdcopy's 256 KiB, with
dozens in flight): one receive then brings several whole writes, each handed to the device as a slice of what
was received (no copy), instead of two receives and two turns of the server's loop for every write. Measured
with nbdcopy writing 1 GiB over 4 connections to the threads server: half the server's user CPU per GiB (206-260
ms with 64 KiB, 106-110 with 1 MiB; 4 MiB brought no more). A receive holds its buffer while it waits, so a
driver asks for this much only where bytes are waiting (the anyio server receives once the socket is readable,
the threads server with a receive that does not wait, falling back to a waiting one of RECV_SIZE): a client that
streamed big writes and went quiet costs the server no more than any other (200 such connections: 119 MiB of
server RSS, 151 MiB when the threads server waited with the large buffer)."""


class ReceiveSize:
    """The size of a server connection's next receive (``next``): STREAM_RECV_SIZE from the moment a receive
    into a write payload's own buffer brought at least RECV_SIZE bytes (the client sends writes bigger than a
    receive), RECV_SIZE again once a receive of the stream brings less than RECV_SIZE (it stopped). Small
    writes, however many, never switch it: their payloads fit in what a receive brings."""

    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next = RECV_SIZE

    def received(self, count: int, into_payload: bool) -> None:
        """A receive brought ``count`` bytes: into a write payload's own buffer, or as the stream's bytes."""
        if into_payload:
            if count >= RECV_SIZE:
                self.next = STREAM_RECV_SIZE
        elif count < RECV_SIZE:
            self.next = RECV_SIZE
