"""ReadOnlyFilter: serve a device without letting anything change it.

Writes, trims, write-zeroes and resizes fail with EROFS (EPERM on the wire) without reaching the inner device,
and the capabilities say so, so the export is advertised read-only (NBD_FLAG_READ_ONLY) and no write-side
feature is offered. Reads, block status, cache and flush pass straight through, read views and sendfile
included: the filter costs nothing on the read path. Thread-safe and multi-conn safe whenever the inner
device is (it keeps no state).
"""

from __future__ import annotations

import errno
from dataclasses import replace

from nbdproto.serving import Buffer, DeviceCapabilities

from ._filter import Filter

__all__ = ["ReadOnlyFilter"]


def _refuse() -> OSError:
    return OSError(errno.EROFS, "the export is read-only (readonly filter)")


class ReadOnlyFilter(Filter):
    """``inner`` served read-only."""

    def _capabilities_over(self, inner: DeviceCapabilities) -> DeviceCapabilities:
        return replace(
            inner, can_write=False, can_fua=False, can_trim=False, can_zero=False, can_fast_zero=False,
            can_resize=False,
        )  # fmt: skip

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        raise _refuse()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise _refuse()

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        raise _refuse()

    def resize(self, size: int) -> None:
        raise _refuse()
