"""The plain data events carry: block-status extents, and what a read reply's data may be."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Extent", "FileRegion", "Payload"]


class Extent(NamedTuple):
    """One block status descriptor: ``length`` bytes of the export have ``status`` (context-defined flags)."""

    length: int
    status: int


class FileRegion:
    """``length`` bytes of an open file at ``offset``, standing in for a read reply's data.

    The engine never reads payloads, it only queues them: a driver that can send straight from a file (os.sendfile
    on a plaintext socket) passes a FileRegion as ReadData's data and finds it again among the pieces to send,
    so the bytes go from the page cache to the socket without passing through Python.
    """

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"FileRegion(fd={self.fd}, offset={self.offset}, length={self.length})"


Payload = bytes | bytearray | memoryview | FileRegion
"""What a reply's data may be: any buffer, or a FileRegion for drivers that send from files."""
