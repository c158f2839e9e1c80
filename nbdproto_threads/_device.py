"""The block-device protocol of the threads backend: what the server calls to carry out requests.

A device is anything with these methods (``typing.Protocol``: no base class needed). They are called from the
connection threads, possibly several at once (one per connection, more with ``workers``), so a device that
says ``can_multi_conn`` must be safe to use from many threads. Failures are ``OSError`` with an errno; the
server turns them into NBD errors (nbdproto._dispatch.nbd_errno). The async backend's AsyncBlockDevice has the
same methods, awaited.

Two optional extras, looked up with getattr: ``read_view(offset, length)`` returns the bytes as a zero-copy
buffer (or None), which a server sends as the reply itself on plaintext connections (nbdproto._dispatch.ReadView;
FileDevice's are slices of its memory mapping); ``fileno()`` lets a device without views have large plaintext
reads sent with os.sendfile.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from nbdproto._export import DeviceCapabilities

__all__ = ["BlockDevice", "Buffer", "check_range"]

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class BlockDevice(Protocol):
    """A block device served over NBD (the sync binding)."""

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


def check_range(size: int, offset: int, length: int, *, writing: bool = False, can_write: bool = True) -> None:
    """The errors a device raises for a bad range: EINVAL for reads and ENOSPC for writes past ``size``
    (spec: "Error values"), EROFS for a write to a read-only device. Shared by the built-in devices."""
    if offset < 0 or length < 0 or offset + length > size:
        code = errno.ENOSPC if writing else errno.EINVAL
        raise OSError(code, f"range {offset}+{length} is outside the device ({size} bytes)")
    if writing and not can_write:
        raise OSError(errno.EROFS, "the device is read-only")
