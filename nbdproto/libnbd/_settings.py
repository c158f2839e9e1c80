"""What a handle is told before (and, in option mode, during) its connection: the values the set_* calls store
and the get_* calls return, with libnbd's defaults. ``Facts`` is the other half: what the server told it."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import nbdproto.engine

from ._callbacks import Callback
from ._constants import (
    ALLOW_TRANSPORT_MASK,
    HANDSHAKE_FLAG_MASK,
    STRICT_ALIGN,
    STRICT_BOUNDS,
    STRICT_COMMANDS,
    STRICT_FLAGS,
    STRICT_ZERO_SIZE,
    TLS_ALLOW,
    TLS_DISABLE,
)

__all__ = ["Settings", "Facts", "next_handle_name", "STRICT_DEFAULT"]

STRICT_DEFAULT = STRICT_COMMANDS | STRICT_FLAGS | STRICT_BOUNDS | STRICT_ZERO_SIZE | STRICT_ALIGN
"""libnbd 1.14's default strictness (newer releases add STRICT_PAYLOAD and STRICT_AUTO_FLAG to it; a script
that wants them sets them)."""

_handle_numbers = itertools.count(1)


def next_handle_name() -> str:
    """``nbd1``, ``nbd2``, ...: unique in the process, as libnbd names its handles."""
    return f"nbd{next(_handle_numbers)}"


@dataclass
class Settings:
    """A handle's settings (each field is one set_*/get_* pair; docs/howto/libnbd.md lists the defaults)."""

    handle_name: str = field(default_factory=next_handle_name)
    debug: bool = field(default_factory=lambda: os.environ.get("LIBNBD_DEBUG") == "1")
    debug_callback: Callback | None = None
    private_data: int = 0
    export_name: str = ""
    request_block_size: bool = True
    full_info: bool = False
    tls: int = TLS_DISABLE
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_username: str | None = None
    tls_psk_file: str | None = None
    request_structured_replies: bool = True
    request_extended_headers: bool = True
    request_meta_context: bool = True
    handshake_flags: int = HANDSHAKE_FLAG_MASK
    pread_initialize: bool = True
    strict: int = STRICT_DEFAULT
    opt_mode: bool = False
    meta_contexts: list[str] = field(default_factory=list)
    uri_allow_transports: int = ALLOW_TRANSPORT_MASK
    uri_allow_tls: int = TLS_ALLOW
    uri_allow_local_file: bool = False
    wait_timeout: float | None = None


@dataclass
class Facts:
    """What the server said during the handshake (reset where libnbd resets it: a new export asked about)."""

    protocol: str | None = None
    handshake_flags: int | None = None
    """The flags both sides agreed on, once the greeting is answered."""
    tls_negotiated: bool = False
    structured_replies: bool = False
    extended_headers: bool = False
    export: nbdproto.engine.Export | None = None
    """Size, flags and block sizes of the export last selected (GO) or asked about (INFO)."""
    canonical_name: str | None = None
    description: str | None = None
    meta_contexts: dict[int, str] = field(default_factory=dict)
    """The contexts SET_META_CONTEXT agreed on (id -> name), for can_meta_context and block status."""
    meta_contexts_set: bool = False
    """Whether the contexts were set for the export now selected or asked about."""

    def forget_export(self) -> None:
        self.export = None
        self.canonical_name = self.description = None
        self.meta_contexts = {}
        self.meta_contexts_set = False
