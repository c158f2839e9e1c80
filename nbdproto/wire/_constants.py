"""Every number of the NBD protocol, named as the spec names it.

The spec is doc/proto.md of NetworkBlockDevice/nbd; the extended headers and RESIZE extensions live on its
extension-ext-header and extension-resize branches. All values are big-endian on the wire; these classes only
name them. Names drop the ``NBD_`` / ``NBD_OPT_`` style prefixes that the class name already says.
"""

from __future__ import annotations

import enum

__all__ = [
    "NBDMAGIC",
    "IHAVEOPT",
    "CLISERV_MAGIC",
    "OPTION_REPLY_MAGIC",
    "REQUEST_MAGIC",
    "EXTENDED_REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "EXTENDED_REPLY_MAGIC",
    "RESERVED_MAGICS",
    "Magic",
    "HandshakeFlags",
    "ClientFlags",
    "TransmissionFlags",
    "Option",
    "OptionReplyType",
    "InfoType",
    "Command",
    "CommandFlags",
    "ReplyFlags",
    "ChunkType",
    "Errno",
    "AllocationState",
    "DEFAULT_PORT",
    "BASE_ALLOCATION",
    "MAX_STRING_LENGTH",
    "MAX_OPTION_LENGTH",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_BLOCK_SIZES",
    "STATUS_SPAN",
]


class Magic(enum.IntEnum):
    """Magic numbers that open each message (spec: "Handshake", "Transmission", "Reserved Magic values")."""

    NBDMAGIC = 0x4E42444D41474943
    """"NBDMAGIC": the first eight bytes the server sends."""
    IHAVEOPT = 0x49484156454F5054
    """"IHAVEOPT": follows NBDMAGIC in a newstyle greeting and opens every option request."""
    CLISERV_MAGIC = 0x00420281861253
    """Follows NBDMAGIC in an oldstyle greeting."""
    OPTION_REPLY = 0x3E889045565A9
    """Opens every option reply of the fixed newstyle handshake."""
    REQUEST = 0x25609513
    """Opens a compact (28-byte) request."""
    EXTENDED_REQUEST = 0x21E41C71
    """Opens an extended (32-byte) request, after NBD_OPT_EXTENDED_HEADERS."""
    SIMPLE_REPLY = 0x67446698
    """Opens a simple (16-byte) reply."""
    STRUCTURED_REPLY = 0x668E33EF
    """Opens a structured reply chunk (20-byte header)."""
    EXTENDED_REPLY = 0x6E8A278C
    """Opens an extended reply chunk (32-byte header)."""
    HISTORIC_REQUEST = 0x12560953
    """Reserved: the request magic before Linux 2.1.116pre2. Never valid on the wire."""
    HISTORIC_REPLY = 0x96744668
    """Reserved: the reply magic before Linux 2.1.116pre2. Never valid on the wire."""
    DATA_LOG = 0x25609514
    """Reserved: nbd-server's transaction-log flag. Never valid on the wire."""


NBDMAGIC = Magic.NBDMAGIC
IHAVEOPT = Magic.IHAVEOPT
CLISERV_MAGIC = Magic.CLISERV_MAGIC
OPTION_REPLY_MAGIC = Magic.OPTION_REPLY
REQUEST_MAGIC = Magic.REQUEST
EXTENDED_REQUEST_MAGIC = Magic.EXTENDED_REQUEST
SIMPLE_REPLY_MAGIC = Magic.SIMPLE_REPLY
STRUCTURED_REPLY_MAGIC = Magic.STRUCTURED_REPLY
EXTENDED_REPLY_MAGIC = Magic.EXTENDED_REPLY
RESERVED_MAGICS = frozenset({Magic.HISTORIC_REQUEST, Magic.HISTORIC_REPLY, Magic.DATA_LOG})


class HandshakeFlags(enum.IntFlag):
    """The 16-bit flags a newstyle server sends after IHAVEOPT (spec: "Handshake flags")."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(enum.IntFlag):
    """The 32-bit flags a newstyle client answers the greeting with (spec: "Client flags")."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlags(enum.IntFlag):
    """The 16-bit per-export flags (spec: "Transmission flags"). HAS_FLAGS must always be set."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Option(enum.IntEnum):
    """Option codes of the fixed newstyle handshake (spec: "Option types")."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    """Withdrawn from the spec; a server answers it with NBD_REP_ERR_UNSUP."""
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class OptionReplyType(enum.IntEnum):
    """Option reply types (spec: "Option reply types"); values with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9
    ERR_EXT_HEADER_REQD = _REP_ERR + 10

    @property
    def is_error(self) -> bool:
        """True for the NBD_REP_ERR_* values (bit 31 set)."""
        return bool(self.value & _REP_ERR)


class InfoType(enum.IntEnum):
    """Information types of NBD_OPT_INFO / NBD_OPT_GO (spec: "NBD_OPT_INFO and NBD_OPT_GO")."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Request types of the transmission phase (spec: "Request types"); RESIZE is an extension."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlags(enum.IntFlag):
    """The 16-bit flags of a request (spec: "Command flags")."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlags(enum.IntFlag):
    """The 16-bit flags of a structured or extended reply chunk (spec: "Structured reply flags")."""

    DONE = 1 << 0


_ERROR_CHUNK = 1 << 15


class ChunkType(enum.IntEnum):
    """Structured reply chunk types (spec: "Structured reply types"); bit 15 marks an error chunk."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = _ERROR_CHUNK + 1
    ERROR_OFFSET = _ERROR_CHUNK + 2

    @property
    def is_error(self) -> bool:
        """True for error chunk types (bit 15 set)."""
        return bool(self.value & _ERROR_CHUNK)


class Errno(enum.IntEnum):
    """Error values of replies (spec: "Error values"); they match Linux errno numbers."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationState(enum.IntFlag):
    """Status flags of the ``base:allocation`` meta context (spec: "base:allocation metadata context")."""

    HOLE = 1 << 0
    ZERO = 1 << 1


DEFAULT_PORT = 10809
"""The IANA-assigned NBD port."""

BASE_ALLOCATION = "base:allocation"
"""The one meta context the spec itself defines."""

MAX_STRING_LENGTH = 4096
"""Export names, descriptions and meta context names longer than this are refused (spec: "Strings")."""

MAX_OPTION_LENGTH = 64 * 1024
"""Option payloads above this are refused without being buffered (no valid option comes near it)."""

DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
"""The payload cap when no NBD_INFO_BLOCK_SIZE says otherwise (spec: "Block size constraints")."""

DEFAULT_BLOCK_SIZES = (1, 4096, DEFAULT_MAX_PAYLOAD)
"""(minimum, preferred, maximum payload) when the server advertises none."""

STATUS_SPAN = (1 << 32) - (1 << 16)
"""The longest range a compact (32-bit) request can name that is a whole number of blocks of any minimum block
size (64 KiB at most): how much of a device one block-status question, or one WRITE_ZEROES, covers when a
client walks a whole device. Few large questions matter more than many small ones: a file server answers each
with SEEK_DATA / SEEK_HOLE, and on a fully allocated file SEEK_HOLE walks the page cache to the end of the file
whatever length was asked. A server may answer for less; the next question starts where its answer ended."""
