"""What of a sparse file is data and what is hole, as the tests compare it.

SEEK_DATA / SEEK_HOLE, not ``st_blocks``: ext4 counts an extent tree's index block in ``st_blocks`` once a
file has more than four extents, and how many extents a copy leaves depends on the order in which its
connections' writes land, so two files with the same holes can differ there by 4 KiB."""

from __future__ import annotations

import errno
import os


def data_ranges(fd: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of data in the file: what is not a hole."""
    size, out, pos = os.fstat(fd).st_size, [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
            break  # holes to the end
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        pos = end
    return out


def data_bytes(path: str | os.PathLike[str]) -> int:
    """How many bytes of the file are data rather than holes."""
    with open(path, "rb") as f:
        return sum(length for _, length in data_ranges(f.fileno()))
