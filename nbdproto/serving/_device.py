"""The block-device protocol: what both servers call to carry out requests, and what a device author writes.

A device is any object with these methods (``typing.Protocol``: no base class needed). The protocol is
synchronous, for every backend: the threads server calls it from connection threads, the anyio server from
worker threads, or right on the event loop for a device whose ``dispatch`` says it never blocks. Several
calls may run at once (one per connection, more with worker threads), so every device must be thread-safe,
and one that says ``can_multi_conn`` must show each connection what the others completed. Failures are
``OSError`` with an errno; the servers turn them into NBD errors (``nbdproto.serving.nbd_errno``).

Optional extras, looked up with getattr so that a plain device needs none of them:

- ``dispatch``: how a server should call the device (``Dispatch``; "threads" when absent).
- ``read_view(offset, length)``: the bytes as a zero-copy buffer (or None), which a server sends as the
  reply itself on plaintext connections (``nbdproto.ReadView``; FileDevice's are slices of its mapping).
- ``write_view(offset, length)``: a writable view of the device's own storage for those bytes (or None), which
  a server receives a write's payload straight into on plaintext connections, then answers the write with no
  pwrite (FUA: a flush) (``nbdproto.WriteView``; FileDevice's on tmpfs and memfds are slices of its mapping).
  The engine asks for it as soon as a write's header is parsed, before any of its payload has arrived.
- ``write_view_ended(view)``: called for each view ``write_view`` gave (the same object) once nothing more
  will be received into it: when the write's request has been carried out (``carry_out``, before its reply
  is made), or when the connection ends first (its payload part-way, or the request never carried out). A
  device that must know when no write is in progress (a filter that freezes the export at an instant between
  two requests: ``DirtyBitmapFilter.quiesced``) counts the views it gave out with it. A view it no longer
  knows of is ignored: a request cancelled between its carry_out and its reply is reported again as the
  connection ends.
- ``fileno()``: lets a device without views have large plaintext reads sent with os.sendfile.
- ``resize(size)``: NBD_CMD_RESIZE, for devices whose capabilities say ``can_resize``.
- ``call_batch(calls)``: carry out a list of ``nbdproto.DeviceCall`` together and return one result per call
  (its return value, or the exception it raised). ``carry_out_all`` (a server's "batch" dispatch) uses it, so
  that a remote device can have a whole batch of requests in flight at once (``NbdDevice`` does).
- ``submit(calls, tokens, completions)``: start carrying out a list of ``nbdproto.DeviceCall`` without waiting
  for them; each call's result (its return value, or the exception it raised) goes to
  ``completions.complete(token, result)`` with the call's token, from whichever thread learns it (the
  caller's own for a call carried out at once), and ``completions.completed()`` follows each burst of them
  (``Completions``). It may block to send or to reconnect, never to wait for an answer. A server whose device
  has it keeps reading requests while earlier ones are in flight and answers them as they complete, in any
  order (``nbdproto.serving.Pipeline``; ``NbdDevice`` has it: many requests in flight upstream).
- ``submit_nowait(calls, tokens, completions)``: ``submit`` where that needs no wait, for an event loop: raises
  BlockingIOError, having started nothing, where it would wait (then the server calls ``submit`` from a
  thread); returns None, or a callable that finishes sending (which may wait: it is called from a thread). An
  async server saves a thread hop per batch of requests with it.

Implementations live in ``nbdproto.devices``; this module only states the contract, so that the I/O-free
serving logic (``nbdproto.serving.carry_out``) and both backends can name it without loading any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from ._export import DeviceCapabilities

__all__ = ["BlockDevice", "Buffer", "Dispatch", "dispatch_of", "Completions"]

Buffer = bytes | bytearray | memoryview
"""What a write's data may be."""

Dispatch = Literal["inline", "batch", "threads"]
"""How a server should call a device:

- ``"inline"``: right where the request was read (on the event loop, in the connection's thread), one
  request after another: for devices that answer in microseconds and never block (memory, tmpfs files).
- ``"batch"``: every request read in one go is carried out together, in order, off the event loop: one
  thread hop per batch. For calls that are quick but may block (files in the page cache).
- ``"threads"``: each request in a worker thread of its own, so slow requests overlap and replies go out
  as they complete (disks, remote devices, object stores).
"""


@runtime_checkable
class BlockDevice(Protocol):
    """A block device served over NBD."""

    @property
    def size(self) -> int:
        """The size in bytes."""

    @property
    def capabilities(self) -> DeviceCapabilities:
        """What the device can do; decides what the server advertises."""

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` (holes read as zero)."""

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua``, durably before returning."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """The range's contents need not be kept (they may read back as anything, usually zero)."""

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        """Make the range read as zero; ``may_trim`` allows punching a hole; with ``fast``, raise
        OSError(ENOTSUP) rather than zero slowly."""

    def cache(self, offset: int, length: int) -> None:
        """Prefetch the range (a hint)."""

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """Status of the range for meta ``context``: (length, flags) runs from ``offset``, at least one, the
        first starting at ``offset``; they may stop short of ``length``."""

    def close(self) -> None:
        """Release the device."""


class Completions(Protocol):
    """Where a device's ``submit`` hands results: any thread may call these, several at once."""

    def complete(self, token: Any, result: object) -> None:
        """The call submitted with ``token`` is done: ``result`` is its return value, or the exception it
        raised."""

    def completed(self) -> None:
        """A burst of ``complete`` calls is over (the moment to answer what they completed together)."""

    # Optional: ``lane``, an int. A device that spreads calls over several connections of its own keeps the
    # calls of one lane (a client connection's Pipeline) on one of them, and spreads lanes over them.


def dispatch_of(device: object) -> Dispatch:
    """The device's ``dispatch`` hint, "threads" when it gives none (the safe choice for unknown devices)."""
    value = getattr(device, "dispatch", "threads")
    if value == "inline":
        return "inline"
    return "batch" if value == "batch" else "threads"
