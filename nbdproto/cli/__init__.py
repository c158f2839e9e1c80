"""The ``nbdproto`` command line (also ``python -m nbdproto``), for people who never write Python.

``serve`` serves files, block devices and in-memory disks (``_serve``, imported only for serve: the servers and
event loops are a good part of start-up); ``mirror`` serves a disk while mirroring it (``_mirror``, over
``MirrorDevice`` and serve's own serving code); ``info`` and ``list`` ask a server about its exports (``_query``,
with ``_exportinfo`` for what is said of an export and ``_map`` for extents); ``copy`` copies disks (``_copy``,
over ``nbdproto_threads.copy``); ``fuse`` shows an export as a file (``_fuse``). Every command is built on the
public APIs of nbdproto, nbdproto.devices, nbdproto_threads and nbdproto_anyio, and on nothing private of theirs.
"""

from __future__ import annotations

from ._main import build_parser, main

__all__ = ["main", "build_parser"]
