"""Memory that forked processes share: a file no path names, made before the fork and inherited."""

from __future__ import annotations

import os
import tempfile

__all__ = ["anonymous_file"]


def anonymous_file(name: str) -> int:
    """A descriptor of a new, empty file that no path names: a memfd (``name`` shows in /proc/PID/fd), or an
    unlinked temporary file where there are none (not Linux), on /dev/shm when it exists. Every process that
    inherits it maps or writes the same pages; the memory goes when the last descriptor is closed."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name, os.MFD_CLOEXEC)
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix=f"{name}-", dir=directory)
    os.unlink(path)
    return fd
