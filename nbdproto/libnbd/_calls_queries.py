"""What the server said about the export: size, flags, block sizes, names, meta contexts. These answer from
what the handshake stored and never wait; they work once an export was selected (or asked about with
opt_info in option mode) and keep working after the connection is shut down."""

from __future__ import annotations

import errno

import nbdproto.engine
import nbdproto.wire
from nbdproto.wire import DEFAULT_MAX_PAYLOAD, TransmissionFlags

from ._api import Allowed, HandleBase, api
from ._calls_settings import check_enum, check_string
from ._constants import MAX_REQUEST_SIZE, SIZE_MAXIMUM, SIZE_MINIMUM, SIZE_PAYLOAD, SIZE_PREFERRED
from ._errors import Failure

__all__ = ["QueryCalls"]

_A = Allowed
_KNOWN = (_A.NEGOTIATING, _A.CONNECTED, _A.CLOSED)
_TF = TransmissionFlags


class QueryCalls(HandleBase):
    """is_* / can_* / get_size / get_block_size / names (see the module docstring)."""

    def _export(self, what: str = "flags") -> nbdproto.engine.Export:
        export = self._m.facts.export
        if export is None:
            raise Failure(errno.EINVAL, f"server has not returned export {what}, you need to connect to the server "
                                        "first")  # fmt: skip
        return export

    def _flag(self, flag: TransmissionFlags) -> bool:
        return bool(self._export().flags & flag)

    @api(*_KNOWN)
    def is_read_only(self) -> bool:
        return self._flag(_TF.READ_ONLY)

    @api(*_KNOWN)
    def can_flush(self) -> bool:
        return self._flag(_TF.SEND_FLUSH)

    @api(*_KNOWN)
    def can_fua(self) -> bool:
        return self._flag(_TF.SEND_FUA)

    @api(*_KNOWN)
    def is_rotational(self) -> bool:
        return self._flag(_TF.ROTATIONAL)

    @api(*_KNOWN)
    def can_trim(self) -> bool:
        return self._flag(_TF.SEND_TRIM)

    @api(*_KNOWN)
    def can_zero(self) -> bool:
        return self._flag(_TF.SEND_WRITE_ZEROES)

    @api(*_KNOWN)
    def can_fast_zero(self) -> bool:
        """Fast zeroes: advertised, and meaningful only where zeroing is."""
        return self._flag(_TF.SEND_FAST_ZERO) and self._flag(_TF.SEND_WRITE_ZEROES)

    @api(*_KNOWN)
    def can_df(self) -> bool:
        """Don't-fragment reads: advertised, and possible only with structured replies."""
        return self._flag(_TF.SEND_DF) and self._m.facts.structured_replies

    @api(*_KNOWN)
    def can_multi_conn(self) -> bool:
        return self._flag(_TF.CAN_MULTI_CONN)

    @api(*_KNOWN)
    def can_cache(self) -> bool:
        return self._flag(_TF.SEND_CACHE)

    @api(*_KNOWN)
    def can_block_status_payload(self) -> bool:
        """Block status may name some of the agreed meta contexts (block_status_filter; libnbd 1.20)."""
        return self._flag(_TF.BLOCK_STATUS_PAYLOAD) and self._m.facts.extended_headers

    @api(*_KNOWN)
    def can_meta_context(self, metacontext: str) -> bool:
        """Whether the server agreed to ``metacontext`` (asked for with add_meta_context)."""
        name = check_string(metacontext, "metacontext")
        facts = self._m.facts
        if not facts.meta_contexts_set:
            self._export()
        return name in facts.meta_contexts.values()

    @api(*_KNOWN)
    def get_protocol(self) -> str:
        """``oldstyle``, ``newstyle`` or ``newstyle-fixed``."""
        protocol = self._m.facts.protocol
        if protocol is None:
            raise Failure(errno.EINVAL, "server has not returned the protocol yet")
        return protocol

    @api(*_KNOWN)
    def get_size(self) -> int:
        return self._export("size").size

    @api(*_KNOWN)
    def get_block_size(self, size_type: int) -> int:
        """The server's SIZE_MINIMUM, SIZE_PREFERRED or SIZE_MAXIMUM (0 where it stated none), or
        SIZE_PAYLOAD, the largest read or write this handle lets through."""
        kind = check_enum("size_type", size_type, range(SIZE_MINIMUM, SIZE_PAYLOAD + 1))
        export = self._export()
        if kind == SIZE_PAYLOAD:
            limit = export.maximum_payload if export.block_sizes_known else DEFAULT_MAX_PAYLOAD
            return min(limit, MAX_REQUEST_SIZE)
        if not export.block_sizes_known:
            return 0
        if kind == SIZE_MINIMUM:
            return export.minimum_block_size
        if kind == SIZE_PREFERRED:
            return export.preferred_block_size
        assert kind == SIZE_MAXIMUM
        return export.maximum_payload

    @api(*_KNOWN)
    def get_canonical_export_name(self) -> str:
        self._export()
        name = self._m.facts.canonical_name
        if name is None:
            raise Failure(errno.ENOTSUP, "server did not advertise a canonical name")
        return name

    @api(*_KNOWN)
    def get_export_description(self) -> str:
        self._export()
        description = self._m.facts.description
        if description is None:
            raise Failure(errno.ENOTSUP, "server did not advertise a description")
        return description
