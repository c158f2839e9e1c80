"""What an export advertises, derived from what its block device can do: no I/O, shared by both backends.

A device states its abilities once, as ``DeviceCapabilities``; ``export_for`` turns them into the
``Export`` the engine advertises (transmission flags, block sizes, meta contexts), so the two backends and
every user device agree on what a capability means on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._constants import BASE_ALLOCATION, DEFAULT_MAX_PAYLOAD, TransmissionFlags
from ._events import Export

__all__ = ["DeviceCapabilities", "export_for"]

TF = TransmissionFlags


@dataclass(frozen=True, slots=True)
class DeviceCapabilities:
    """What a block device can do. Each field maps to what the server advertises (spec: "Transmission flags",
    "Block size constraints", "Metadata querying").

    - ``can_write``: writes are possible at all (a device that cannot write is always served read-only).
    - ``can_flush`` / ``can_fua``: NBD_CMD_FLUSH, and FUA on writes, trims and write-zeroes.
    - ``can_trim``, ``can_zero``, ``can_fast_zero``, ``can_cache``, ``can_resize``: the matching commands.
    - ``can_multi_conn``: every connection sees every other's completed writes, and a flush on one flushes all
      (NBD_FLAG_CAN_MULTI_CONN); true for one process sharing one device object or one page cache.
    - ``rotational``: a hint that sequential access is cheaper (NBD_FLAG_ROTATIONAL).
    - block sizes: the minimum request alignment, the preferred size, and the largest payload accepted.
    - ``meta_contexts``: the contexts ``extents()`` can answer for; ``base:allocation`` for devices that know
      their holes.
    """

    can_write: bool = True
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_zero: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    can_resize: bool = False
    rotational: bool = False
    minimum_block_size: int = 1
    preferred_block_size: int = 4096
    maximum_payload: int = DEFAULT_MAX_PAYLOAD
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)

    def __post_init__(self) -> None:
        # spec ("Block size constraints"): powers of two, 1 <= minimum <= 64 KiB, minimum <= preferred <=
        # maximum (the maximum need not be a power of two, but must be a multiple of the minimum).
        minimum, preferred, maximum = self.minimum_block_size, self.preferred_block_size, self.maximum_payload
        if not (_power_of_two(minimum) and minimum <= 65536):
            raise ValueError(f"minimum block size {minimum} must be a power of two from 1 to 65536")
        if not (_power_of_two(preferred) and minimum <= preferred <= 32 * 1024 * 1024):
            raise ValueError(f"preferred block size {preferred} must be a power of two from {minimum} to 32 MiB")
        if not (preferred <= maximum <= 0xFFFFFFFF and maximum % minimum == 0):
            raise ValueError(f"maximum payload {maximum} must be a multiple of {minimum}, >= {preferred}, < 4 GiB")


def _power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


def export_for(
    name: str,
    size: int,
    capabilities: DeviceCapabilities,
    *,
    read_only: bool = True,
    description: str = "",
    tls_required: bool = False,
    block_size_required: bool = False,
) -> Export:
    """The Export that serves a device of ``size`` bytes with ``capabilities`` under ``name``.

    Read-only by default (the seed's rule): pass ``read_only=False`` to accept writes. A read-only export
    advertises no write-side feature (TRIM, WRITE_ZEROES, FAST_ZERO, FUA, RESIZE): a client must not use them
    there, and advertising them would only invite EPERM. FLUSH stays (harmless, and some clients always send
    it); CACHE and block status stay (they only read).
    """
    caps = capabilities
    writable = caps.can_write and not read_only
    flags = TF.HAS_FLAGS
    if not writable:
        flags |= TF.READ_ONLY
    if caps.can_flush:
        flags |= TF.SEND_FLUSH
    if caps.can_cache:
        flags |= TF.SEND_CACHE
    if caps.can_multi_conn:
        flags |= TF.CAN_MULTI_CONN
    if caps.rotational:
        flags |= TF.ROTATIONAL
    if writable:
        if caps.can_fua:
            flags |= TF.SEND_FUA
        if caps.can_trim:
            flags |= TF.SEND_TRIM
        if caps.can_zero:
            flags |= TF.SEND_WRITE_ZEROES
            if caps.can_fast_zero:
                flags |= TF.SEND_FAST_ZERO
        if caps.can_resize:
            flags |= TF.SEND_RESIZE
    return Export(
        name,
        size,
        flags,
        description,
        minimum_block_size=caps.minimum_block_size,
        preferred_block_size=caps.preferred_block_size,
        maximum_payload=caps.maximum_payload,
        meta_contexts=caps.meta_contexts,
        block_size_required=block_size_required,
        tls_required=tls_required,
    )
