"""The binding's constants, with the values libnbd.h gives them (the numbers are part of the API: scripts pass
them to calls and compare results with them).

Where libnbd 1.14 (Debian's python3-libnbd) and newer releases differ, the newer value is here: the masks
include the bits newer releases added (``CMD_FLAG_PAYLOAD_LEN``, ``STRICT_PAYLOAD``, ``STRICT_AUTO_FLAG``), and
the qemu namespace's names (libnbd 1.16) are present. docs/howto/libnbd.md lists what that changes.
"""

from __future__ import annotations

__all__ = [
    "TLS_DISABLE",
    "TLS_ALLOW",
    "TLS_REQUIRE",
    "SIZE_MINIMUM",
    "SIZE_PREFERRED",
    "SIZE_MAXIMUM",
    "SIZE_PAYLOAD",
    "CMD_FLAG_FUA",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_DF",
    "CMD_FLAG_REQ_ONE",
    "CMD_FLAG_FAST_ZERO",
    "CMD_FLAG_PAYLOAD_LEN",
    "CMD_FLAG_MASK",
    "HANDSHAKE_FLAG_FIXED_NEWSTYLE",
    "HANDSHAKE_FLAG_NO_ZEROES",
    "HANDSHAKE_FLAG_MASK",
    "STRICT_COMMANDS",
    "STRICT_FLAGS",
    "STRICT_BOUNDS",
    "STRICT_ZERO_SIZE",
    "STRICT_ALIGN",
    "STRICT_PAYLOAD",
    "STRICT_AUTO_FLAG",
    "STRICT_MASK",
    "ALLOW_TRANSPORT_TCP",
    "ALLOW_TRANSPORT_UNIX",
    "ALLOW_TRANSPORT_VSOCK",
    "ALLOW_TRANSPORT_MASK",
    "SHUTDOWN_ABANDON_PENDING",
    "SHUTDOWN_MASK",
    "AIO_DIRECTION_READ",
    "AIO_DIRECTION_WRITE",
    "AIO_DIRECTION_BOTH",
    "READ_DATA",
    "READ_HOLE",
    "READ_ERROR",
    "NAMESPACE_BASE",
    "CONTEXT_BASE_ALLOCATION",
    "STATE_HOLE",
    "STATE_ZERO",
    "NAMESPACE_QEMU",
    "CONTEXT_QEMU_DIRTY_BITMAP",
    "STATE_DIRTY",
    "CONTEXT_QEMU_ALLOCATION_DEPTH",
]

# set_tls, set_uri_allow_tls
TLS_DISABLE = 0
TLS_ALLOW = 1
TLS_REQUIRE = 2

# get_block_size
SIZE_MINIMUM = 0
SIZE_PREFERRED = 1
SIZE_MAXIMUM = 2
SIZE_PAYLOAD = 3

# The flags argument of the data calls (the NBD command flags, spec "Command flags").
CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_DF = 0x04
CMD_FLAG_REQ_ONE = 0x08
CMD_FLAG_FAST_ZERO = 0x10
CMD_FLAG_PAYLOAD_LEN = 0x20
CMD_FLAG_MASK = 0x3F

# set_handshake_flags / get_handshake_flags (spec "Handshake flags").
HANDSHAKE_FLAG_FIXED_NEWSTYLE = 0x01
HANDSHAKE_FLAG_NO_ZEROES = 0x02
HANDSHAKE_FLAG_MASK = 0x03

# set_strict_mode: which requests are refused before anything is sent.
STRICT_COMMANDS = 0x01
STRICT_FLAGS = 0x02
STRICT_BOUNDS = 0x04
STRICT_ZERO_SIZE = 0x08
STRICT_ALIGN = 0x10
STRICT_PAYLOAD = 0x20
STRICT_AUTO_FLAG = 0x40
STRICT_MASK = 0x7F

# set_uri_allow_transports
ALLOW_TRANSPORT_TCP = 0x01
ALLOW_TRANSPORT_UNIX = 0x02
ALLOW_TRANSPORT_VSOCK = 0x04
ALLOW_TRANSPORT_MASK = 0x07

# shutdown
SHUTDOWN_ABANDON_PENDING = 0x10000
SHUTDOWN_MASK = 0x10000

# aio_get_direction
AIO_DIRECTION_READ = 1
AIO_DIRECTION_WRITE = 2
AIO_DIRECTION_BOTH = 3

# The status argument of pread_structured's chunk callback.
READ_DATA = 1
READ_HOLE = 2
READ_ERROR = 3

# Meta contexts, and the flags of their extents.
NAMESPACE_BASE = "base:"
CONTEXT_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1
STATE_ZERO = 2
NAMESPACE_QEMU = "qemu:"
CONTEXT_QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"
STATE_DIRTY = 1
CONTEXT_QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"

MAX_REQUEST_SIZE = 64 * 1024 * 1024
"""The largest read or write one call may ask for (libnbd's own limit; more is ERANGE)."""
