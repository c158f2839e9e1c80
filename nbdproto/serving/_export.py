"""What an export advertises, derived from what its block device can do: no I/O, shared by both backends.

A device states its abilities once, as ``DeviceCapabilities``; ``export_for`` turns them into the
``Export`` the engine advertises (transmission flags, block sizes, meta contexts), so the two backends and
every user device agree on what a capability means on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

from nbdproto.engine import Export, ExportRequested, ExportUnknown
from nbdproto.wire import BASE_ALLOCATION, DEFAULT_MAX_PAYLOAD, Option, OptionReplyType, TransmissionFlags

__all__ = ["DeviceCapabilities", "capabilities_of", "export_for", "ExportSpec", "answer_export_request"]


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
        # spec ("Size constraints"): powers of two, 1 <= minimum <= 64 KiB, max(minimum, 512) <= preferred <=
        # maximum (the maximum need not be a power of two, but must be a multiple of the minimum).
        minimum, preferred, maximum = self.minimum_block_size, self.preferred_block_size, self.maximum_payload
        if not (_power_of_two(minimum) and minimum <= 65536):
            raise ValueError(f"minimum block size {minimum} must be a power of two from 1 to 65536")
        lowest = max(minimum, 512)
        if not (_power_of_two(preferred) and lowest <= preferred <= 32 * 1024 * 1024):
            raise ValueError(f"preferred block size {preferred} must be a power of two from {lowest} to 32 MiB")
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

    Read-only by default (a server never writes unless told to): pass ``read_only=False`` to accept writes. A
    read-only export advertises no write-side feature (TRIM, WRITE_ZEROES, FAST_ZERO, FUA, RESIZE): a client must
    not use them there, and advertising them would only invite EPERM. FLUSH stays (harmless, and some clients always
    send it); CACHE and block status stay (they only read).
    """
    caps = capabilities
    writable = caps.can_write and not read_only
    flags = TransmissionFlags.HAS_FLAGS
    if not writable:
        flags |= TransmissionFlags.READ_ONLY
    if caps.can_flush:
        flags |= TransmissionFlags.SEND_FLUSH
    if caps.can_cache:
        flags |= TransmissionFlags.SEND_CACHE
    if caps.can_multi_conn:
        flags |= TransmissionFlags.CAN_MULTI_CONN
    if caps.rotational:
        flags |= TransmissionFlags.ROTATIONAL
    if writable:
        if caps.can_fua:
            flags |= TransmissionFlags.SEND_FUA
        if caps.can_trim:
            flags |= TransmissionFlags.SEND_TRIM
        if caps.can_zero:
            flags |= TransmissionFlags.SEND_WRITE_ZEROES
            if caps.can_fast_zero:
                flags |= TransmissionFlags.SEND_FAST_ZERO
        if caps.can_resize:
            flags |= TransmissionFlags.SEND_RESIZE
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


_METHODS = {
    "can_write": "pwrite",
    "can_flush": "flush",
    "can_fua": "flush",
    "can_trim": "trim",
    "can_zero": "write_zeroes",
    "can_fast_zero": "write_zeroes",
    "can_cache": "cache",
    "can_resize": "resize",
}
"""The method a device must have for each capability to mean anything (FUA is a promise a flush backs)."""


def capabilities_of(device: Any) -> DeviceCapabilities:
    """``device.capabilities`` less what the device has no method for: a device without ``extents`` offers no
    meta context, one without ``flush`` neither FLUSH nor FUA, without ``trim`` no TRIM, and so on. Servers
    advertise this, never more, so a device cannot promise what a request would then fail on (EIO)."""
    capabilities: DeviceCapabilities = device.capabilities
    missing = {c: False for c, method in _METHODS.items() if getattr(capabilities, c) and not _has(device, method)}
    if capabilities.meta_contexts and not _has(device, "extents"):
        return replace(capabilities, meta_contexts=(), **missing)
    return replace(capabilities, **missing) if missing else capabilities  # type: ignore[arg-type]


def _has(device: Any, method: str) -> bool:
    return callable(getattr(device, method, None))


class Device(Protocol):
    """What export_for needs of a device, in either backend: its size and what it can do."""

    @property
    def size(self) -> int: ...

    @property
    def capabilities(self) -> DeviceCapabilities: ...


D = TypeVar("D", bound=Device, covariant=True)  # a spec of a MemoryDevice is a spec of a BlockDevice


@dataclass(frozen=True)
class ExportSpec(Generic[D]):
    """An export as a server offers it: a device (sync or async), and what the server says about it.

    Exports are read-only unless ``read_only=False``. ``tls_required`` keeps plaintext
    clients away from this export when the server's TLS is optional (SELECTIVETLS).
    """

    device: D
    description: str = ""
    read_only: bool = True
    tls_required: bool = False
    block_sizes: tuple[int, int, int] | None = None
    """(minimum, preferred, maximum payload) to advertise instead of the device's own, e.g. 4096 for a disk
    that must not see partial sectors; checked as DeviceCapabilities checks them."""

    def export(self, name: str) -> Export:
        """The Export the engine advertises for this device under ``name``: what its capabilities say and its
        methods back (``capabilities_of``)."""
        capabilities = capabilities_of(self.device)
        if self.block_sizes is not None:
            minimum, preferred, maximum = self.block_sizes
            capabilities = replace(
                capabilities, minimum_block_size=minimum, preferred_block_size=preferred, maximum_payload=maximum
            )
        return export_for(
            name,
            self.device.size,
            capabilities,
            read_only=self.read_only,
            description=self.description,
            tls_required=self.tls_required,
        )


def answer_export_request(
    event: ExportRequested,
    lookup: Callable[[str], ExportSpec[Any] | None] | None,
    chosen: str | None,
    chosen_spec: ExportSpec[Any] | None,
) -> Export | ExportUnknown | None:
    """How a server session answers an ExportRequested; None when it is the client's final choice (GO or
    EXPORT_NAME of an export the session may serve), which the session hands to its application.

    ``lookup`` resolves names (a Server's mapping or resolver), if there is one; ``chosen`` / ``chosen_spec``
    are the export this session already committed to, if any. Without a lookup, questions asked before the
    choice (INFO, meta contexts) get what can be said without the device: INFO is refused, and meta context
    queries see base:allocation.
    """
    final = event.option in (Option.GO, Option.EXPORT_NAME)
    if chosen_spec is not None:
        if event.name == chosen:
            return chosen_spec.export(event.name)
        return ExportUnknown(f"this connection serves {chosen!r} only")
    if lookup is not None:
        spec = lookup(event.name)
        if spec is None:
            return ExportUnknown(f"no export named {event.name!r}")
        return None if final else spec.export(event.name)
    if final:
        return None
    if event.option == Option.INFO:
        return ExportUnknown("NBD_OPT_INFO is not available before an export is chosen", OptionReplyType.ERR_UNSUP)
    return Export(event.name, 0, meta_contexts=(BASE_ALLOCATION,))
