"""The calls that set and read a handle's settings: what to ask the server for, how strict to be, how to
log. Most may only be made before connecting (libnbd's rule: the handshake reads them once); the export
name, block-size request, full info and meta-context list may also change in option mode."""

from __future__ import annotations

import errno

from ._api import Allowed, HandleBase, api
from ._callbacks import Callback, check_callable
from ._constants import ALLOW_TRANSPORT_MASK, HANDSHAKE_FLAG_MASK, STRICT_MASK, TLS_DISABLE, TLS_REQUIRE
from ._errors import Failure
from ._tlscontext import login_name

__all__ = ["SettingsCalls", "check_flags", "check_string"]

_A = Allowed
_BEFORE = (_A.CREATED,)
_BEFORE_OR_OPTIONS = (_A.CREATED, _A.NEGOTIATING)
_AFTER_HANDSHAKE = (_A.NEGOTIATING, _A.CONNECTED, _A.CLOSED)


def check_flags(name: str, value: int, mask: int) -> int:
    """A flags argument (an unsigned 32-bit value, as the binding converts it), refused with libnbd's words
    when it holds bits outside ``mask``."""
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    value &= 0xFFFFFFFF
    if value & ~mask:
        raise Failure(errno.EINVAL, f"{name}: invalid value for flag: {value:#x}")
    return value


def check_enum(name: str, value: int, allowed: range) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if value not in allowed:
        raise Failure(errno.EINVAL, f"{name}: invalid value for parameter: {value}")
    return value


def check_string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    return value


class SettingsCalls(HandleBase):
    """set_* / get_* (see the module docstring)."""

    # --- Debugging and bookkeeping ----------------------------------------------------------------------------

    @api()
    def set_debug(self, debug: bool) -> None:
        """Turn debug messages on or off (on by default when LIBNBD_DEBUG=1)."""
        self._s.debug = bool(debug)

    @api()
    def get_debug(self) -> bool:
        return self._s.debug

    @api()
    def set_debug_callback(self, debug: Callback) -> None:
        """Send debug messages to ``debug(context, message)`` instead of stderr."""
        check_callable(debug, "debug")
        self._s.debug_callback = debug

    @api()
    def clear_debug_callback(self) -> None:
        self._s.debug_callback = None

    @api()
    def stats_bytes_sent(self) -> int:
        """Bytes of NBD protocol sent so far (before any TLS encryption)."""
        return self._m.bytes_sent

    @api()
    def stats_chunks_sent(self) -> int:
        """Messages sent so far: the client flags, each option and each request."""
        return self._m.chunks_sent

    @api()
    def stats_bytes_received(self) -> int:
        """Bytes of NBD protocol received so far (after any TLS decryption)."""
        return self._m.bytes_received

    @api()
    def stats_chunks_received(self) -> int:
        """Answers received so far: the greeting, each option's answer and each complete reply."""
        return self._m.chunks_received

    @api()
    def set_handle_name(self, handle_name: str) -> None:
        self._s.handle_name = check_string(handle_name, "handle_name")

    @api()
    def get_handle_name(self) -> str:
        return self._s.handle_name

    @api()
    def set_private_data(self, private_data: int) -> int:
        """Store an integer of the script's own; returns the one stored before."""
        old, self._s.private_data = self._s.private_data, int(private_data) & 0xFFFFFFFFFFFFFFFF
        return old

    @api()
    def get_private_data(self) -> int:
        return self._s.private_data

    @api()
    def set_wait_timeout(self, seconds: float | None) -> None:
        """nbdproto's own (libnbd has no such call): bound every synchronous call's wait on the server to
        ``seconds`` (None, the default: wait as long as the server takes, as libnbd does). A call that runs out
        of time fails with ETIMEDOUT and leaves the handle dead, its state with the server unknown."""
        if seconds is not None and not seconds > 0:
            raise Failure(errno.EINVAL, f"wait timeout {seconds!r} must be positive or None")
        self._s.wait_timeout = seconds

    # --- What to connect to and ask for -----------------------------------------------------------------------

    @api(*_BEFORE_OR_OPTIONS)
    def set_export_name(self, export_name: str) -> None:
        name = check_string(export_name, "export_name")
        if len(name.encode()) > 4096:
            raise Failure(errno.ENAMETOOLONG, "export name too long for NBD protocol")
        self._s.export_name = name

    @api()
    def get_export_name(self) -> str:
        return self._s.export_name

    @api(*_BEFORE_OR_OPTIONS)
    def set_request_block_size(self, request: bool) -> None:
        self._s.request_block_size = bool(request)

    @api()
    def get_request_block_size(self) -> bool:
        return self._s.request_block_size

    @api(*_BEFORE_OR_OPTIONS)
    def set_full_info(self, request: bool) -> None:
        """Ask the server for the export's canonical name and description too."""
        self._s.full_info = bool(request)

    @api()
    def get_full_info(self) -> bool:
        return self._s.full_info

    @api(*_BEFORE)
    def set_request_structured_replies(self, request: bool) -> None:
        self._s.request_structured_replies = bool(request)

    @api()
    def get_request_structured_replies(self) -> bool:
        return self._s.request_structured_replies

    @api(*_AFTER_HANDSHAKE)
    def get_structured_replies_negotiated(self) -> bool:
        return self._m.facts.structured_replies

    @api(*_BEFORE)
    def set_request_extended_headers(self, request: bool) -> None:
        """Ask for 64-bit (extended) headers, on by default (libnbd 1.20)."""
        self._s.request_extended_headers = bool(request)

    @api()
    def get_request_extended_headers(self) -> bool:
        return self._s.request_extended_headers

    @api(*_AFTER_HANDSHAKE)
    def get_extended_headers_negotiated(self) -> bool:
        return self._m.facts.extended_headers

    @api(*_BEFORE_OR_OPTIONS)
    def set_request_meta_context(self, request: bool) -> None:
        """Whether opt_go and opt_info set the added meta contexts first (on by default, libnbd 1.16)."""
        self._s.request_meta_context = bool(request)

    @api()
    def get_request_meta_context(self) -> bool:
        return self._s.request_meta_context

    @api(*_BEFORE)
    def set_handshake_flags(self, flags: int) -> None:
        """Which handshake flags (HANDSHAKE_FLAG_*) to accept from the server."""
        self._s.handshake_flags = check_flags("flags", flags, HANDSHAKE_FLAG_MASK)

    @api()
    def get_handshake_flags(self) -> int:
        """The flags offered before connecting; once the server answered, the flags both sides agreed on."""
        agreed = self._m.facts.handshake_flags
        return self._s.handshake_flags if agreed is None else agreed

    @api()
    def set_pread_initialize(self, request: bool) -> None:
        """Whether aio_pread zeroes the caller's buffer before the read (libnbd's protection for scripts that
        ignore errors; the synchronous pread's buffer is always new and zeroed here)."""
        self._s.pread_initialize = bool(request)

    @api()
    def get_pread_initialize(self) -> bool:
        return self._s.pread_initialize

    @api()
    def set_strict_mode(self, flags: int) -> None:
        """Which requests (STRICT_*) are refused before being sent."""
        self._s.strict = check_flags("flags", flags, STRICT_MASK)

    @api()
    def get_strict_mode(self) -> int:
        return self._s.strict

    @api(*_BEFORE)
    def set_opt_mode(self, enable: bool) -> None:
        """Stop in the negotiating state after the automatic options, for opt_* calls."""
        self._s.opt_mode = bool(enable)

    @api()
    def get_opt_mode(self) -> bool:
        return self._s.opt_mode

    @api(*_BEFORE_OR_OPTIONS)
    def add_meta_context(self, name: str) -> None:
        """Add a meta context (CONTEXT_BASE_ALLOCATION, ``qemu:dirty-bitmap:NAME``, ...) to ask for."""
        text = check_string(name, "name")
        if len(text.encode()) > 4096:
            raise Failure(errno.ENAMETOOLONG, "meta context name too long for NBD protocol")
        self._s.meta_contexts.append(text)

    @api()
    def get_nr_meta_contexts(self) -> int:
        return len(self._s.meta_contexts)

    @api()
    def get_meta_context(self, i: int) -> str:
        contexts = self._s.meta_contexts
        if not isinstance(i, int) or not 0 <= i < len(contexts):
            raise Failure(errno.EINVAL, "meta context request out of range")
        return contexts[i]

    @api(*_BEFORE_OR_OPTIONS)
    def clear_meta_contexts(self) -> None:
        self._s.meta_contexts.clear()

    # --- TLS ------------------------------------------------------------------------------------------------

    @api(*_BEFORE)
    def set_tls(self, tls: int) -> None:
        """TLS_DISABLE (the default), TLS_ALLOW (use it if the server offers it) or TLS_REQUIRE."""
        self._s.tls = check_enum("tls", tls, range(TLS_DISABLE, TLS_REQUIRE + 1))

    @api()
    def get_tls(self) -> int:
        return self._s.tls

    @api(*_AFTER_HANDSHAKE)
    def get_tls_negotiated(self) -> bool:
        return self._m.facts.tls_negotiated

    @api(*_BEFORE)
    def set_tls_certificates(self, dir: str) -> None:  # the binding's parameter name
        """The directory of ca-cert.pem, client-cert.pem and client-key.pem."""
        self._s.tls_certificates = check_string(dir, "dir")

    @api()
    def get_tls_certificates(self) -> str | None:
        return self._s.tls_certificates

    @api(*_BEFORE)
    def set_tls_verify_peer(self, verify: bool) -> None:
        self._s.tls_verify_peer = bool(verify)

    @api()
    def get_tls_verify_peer(self) -> bool:
        return self._s.tls_verify_peer

    @api(*_BEFORE)
    def set_tls_username(self, username: str) -> None:
        """The identity a pre-shared key is looked up by (default: the login name)."""
        self._s.tls_username = check_string(username, "username")

    @api()
    def get_tls_username(self) -> str:
        return self._s.tls_username if self._s.tls_username is not None else login_name()

    @api(*_BEFORE)
    def set_tls_psk_file(self, filename: str) -> None:
        """A psktool key file: authenticate with the username's pre-shared key (Python 3.13 or newer)."""
        self._s.tls_psk_file = check_string(filename, "filename")

    @api()
    def get_tls_psk_file(self) -> str | None:
        return self._s.tls_psk_file

    # --- What connect_uri may do ----------------------------------------------------------------------------

    @api(*_BEFORE)
    def set_uri_allow_transports(self, mask: int) -> None:
        self._s.uri_allow_transports = check_flags("mask", mask, ALLOW_TRANSPORT_MASK)

    @api(*_BEFORE)
    def set_uri_allow_tls(self, tls: int) -> None:
        self._s.uri_allow_tls = check_enum("tls", tls, range(TLS_DISABLE, TLS_REQUIRE + 1))

    @api(*_BEFORE)
    def set_uri_allow_local_file(self, allow: bool) -> None:
        """Let connect_uri read the files a URI names (tls-psk-file, tls-certificates): off by default."""
        self._s.uri_allow_local_file = bool(allow)
