"""Filter: the pass-through base of every device wrapper, in the shape of nbdkit's filters.

A filter wraps an inner device (nbdkit's "next") and is a device itself, so filters stack: ``LogFilter(
CowFilter(FileDevice(path)))``. A filter overrides only the calls it changes. Every other call goes straight
to the inner device: at construction the inner device's bound method is stored on the filter instance, so a
call the filter does not change runs no code of ours at all (a forwarding method would cost a Python frame per
request: bench/bench_filters.py measures what each filter adds to a read).
A filter that decides per instance that it leaves a call alone (a delay filter with no read delay) says so
with ``_pass_through("pread_into")``.

Capabilities are the filter's own nature combined with the inner device's: ``_capabilities_over(inner)``
returns the inner device's by default (less what it has no method for, ``nbdproto.capabilities_of``), and a
filter changes the fields it affects with ``dataclasses.replace`` (a cow overlay can write over a read-only
base; a delay filter over a read-only device stays read-only). The optional extras of ``nbdproto.BlockDevice``:

- ``dispatch``: the inner device's, unless the filter says otherwise (one that sleeps asks for "threads", so
  that a server never sleeps on its event loop).
- ``read_view`` and ``fileno``: the inner device's, but only while reads pass straight through. A server
  answers a read from a view of the inner device, or with os.sendfile from its descriptor, without calling
  ``pread_into``; a filter that changes, delays, fails or counts reads would be bypassed, so such a filter
  offers neither, or a ``read_view`` of its own that does what its ``pread_into`` does and then hands out the
  inner device's view (the error and stats filters: a read view saves a copy and a system call per read).
- ``write_view``: the inner device's, but only while ``pwrite`` and ``flush`` pass straight through (a payload
  received into the inner device's storage is written without ``pwrite``; FUA is then a ``flush``), and with
  it the inner device's ``write_view_ended``.
- ``resize``: forwarded; servers call it only where the capabilities say ``can_resize``, which is the inner
  device's unless a filter says otherwise.
- ``close``: closes the inner device (a filter with resources of its own releases them first).

A filter serves every connection of an export (one object), so it must be thread-safe; whether it is
multi-conn safe is in its capabilities (``can_multi_conn``), usually the inner device's.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from nbdproto.serving import BlockDevice, Buffer, DeviceCapabilities, Dispatch, capabilities_of, dispatch_of

__all__ = ["Filter", "CALLS", "FILTER_COMMANDS", "slower_dispatch"]

FILTER_COMMANDS = {
    "read": "pread_into",
    "write": "pwrite",
    "zero": "write_zeroes",
    "trim": "trim",
    "flush": "flush",
    "extents": "extents",
    "cache": "cache",
}
"""The command names filters are configured with (``delay:read=10ms``, ``error:commands=write``, the rows of
the stats), and the BlockDevice call each one is."""

CALLS = tuple(FILTER_COMMANDS.values())
"""The BlockDevice methods a filter may change; each one it does not override goes straight through."""

_DISPATCH_ORDER: dict[str, int] = {"inline": 0, "batch": 1, "threads": 2}


def slower_dispatch(*hints: Dispatch) -> Dispatch:
    """The most cautious of several dispatch hints: a device built on two others may block wherever either
    may ("threads" over "batch" over "inline")."""
    return max(hints, key=lambda hint: _DISPATCH_ORDER[hint])


class Filter:
    """A device that passes every call through to ``inner``; subclasses override what they change.

    ``inner`` is the wrapped device, public so that a stack of filters can be inspected.
    """

    dispatch: Dispatch

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.dispatch = dispatch_of(inner)
        self._passed: set[str] = set()
        own = type(self)
        self._pass_through(*(name for name in CALLS if getattr(own, name) is getattr(Filter, name)))

    def _pass_through(self, *names: str) -> None:
        """Send the calls ``names`` straight to the inner device from now on (no code of this filter runs
        for them). Passing ``pread_into`` through also offers the inner device's ``read_view`` and
        ``fileno``, which skip ``pread_into`` and are therefore safe exactly then; passing ``pwrite`` and
        ``flush`` through offers its ``write_view``, which skips ``pwrite`` (and makes FUA a ``flush``)."""
        inner = self.inner
        for name in names:
            if name not in CALLS:
                raise ValueError(f"{name!r} is not a call a filter passes through (one of {CALLS})")
            method = getattr(inner, name, None)
            if method is not None:  # one the inner device lacks is not advertised (capabilities_of): never called
                setattr(self, name, method)
            self._passed.add(name)
        extras: tuple[str, ...] = ("read_view", "fileno") if "pread_into" in names else ()
        if {"pwrite", "flush"} <= self._passed:
            extras += ("write_view", "write_view_ended")
        for extra in extras:
            method = getattr(inner, extra, None)
            if method is not None:
                setattr(self, extra, method)

    def passes_through(self, name: str) -> bool:
        """True when the call ``name`` goes straight to the inner device."""
        return name in self._passed

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._capabilities_over(capabilities_of(self.inner))

    def _capabilities_over(self, inner: DeviceCapabilities) -> DeviceCapabilities:
        """What this filter can do over an inner device that can do ``inner`` (by default, the same)."""
        return inner

    # The calls, forwarding. Those a subclass does not override are replaced at construction by the inner
    # device's own bound methods (see _pass_through); these bodies then serve only type checkers and
    # subclasses that call super().

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.inner.pread_into(buffer, offset)

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        self.inner.pwrite(data, offset, fua)

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.inner.trim(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return self.inner.extents(context, offset, length)

    def resize(self, size: int) -> None:
        """NBD_CMD_RESIZE, forwarded (servers send it only where ``can_resize`` says so)."""
        resize: Any = getattr(self.inner, "resize", None)
        if resize is None:
            raise OSError(errno.ENOTSUP, f"{type(self.inner).__name__} cannot be resized")
        resize(size)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> Filter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
