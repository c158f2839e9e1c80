"""Server TLS contexts (certificates, pre-shared keys, or both), and which identity each connection used.

Which identity: OpenSSL's PSK callback is told the identity a client offers, not the connection it offers it
on. So a PSK context made here creates its connections as our subclasses of ``ssl.SSLSocket`` (what
``wrap_socket`` returns: the threads server) and ``ssl.SSLObject`` (what ``wrap_bio`` returns: anyio's
TLSStream, on any event loop), whose ``do_handshake`` sets a context variable to the connection's record for
the length of the call. OpenSSL runs the callback inside that call, in the same thread and the same context,
so the callback writes the identity into the record of the connection being handshaken, however many
handshakes other threads or tasks run at the same time. The servers need do nothing; ``psk_identity()`` reads
the record afterwards.

Never an unauthenticated session: under TLS 1.3 a PSK is only offered, and a server that declines it (an
unknown identity, or a cipher suite whose hash does not suit the key) goes on to authenticate itself with a
certificate if it has one, leaving the client unauthenticated. So when a handshake completes, the record is
checked: a session keyed by a known PSK (TLS 1.3: the session was resumed from the PSK; TLS 1.2: a PSK cipher
suite) keeps its identity; any other session must carry a verified client certificate, or it is refused (a
TLSAuthenticationError, which the servers treat as a failed handshake). Session tickets are off, so a TLS
1.3 session is only ever resumed from a key in the file; a TLS 1.2 session resumed by its id (no NBD client
we know does that) looks no key up, so it is refused. An unknown identity is answered with a random key, as
GnuTLS does: the handshake fails just as for a wrong key, so a client cannot probe for names.

A server with both a certificate and keys speaks TLS 1.2 at most: Python 3.13's ssl cannot choose the TLS
1.3 cipher suites (``set_ciphers`` sets TLS 1.2's), and with a certificate loaded OpenSSL picks a SHA-384
suite, which declines every PSK made for SHA-256 (all of them: psktool's, nbdkit's, qemu's, libnbd's), as
CPython's documentation of ``set_psk_server_callback`` warns (measured here: with TLS 1.3 allowed, Python's
client and nbdinfo both fail, with and without the server's cipher preference). Under TLS 1.2 a PSK cipher
suite is chosen first and there is no fallback; clients that do not use a key must then present a
certificate the CA signed (the context requires one).
Without a certificate, OpenSSL prefers SHA-256 suites by itself and TLS 1.3 works with every peer we test.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

from nbdproto.sockets import peer_name

from ._client import PSK_CIPHERS
from ._keys import MAX_IDENTITY_LENGTH, MAX_KEY_LENGTH, PskFileError, check_psk_support, read_psk_file
from ._pem import load_cert_chain, load_verify_locations

if TYPE_CHECKING:
    from anyio import TypedAttributeProvider

__all__ = ["server_context", "psk_identity", "TLSAuthenticationError"]

log = logging.getLogger("nbdproto.tls")

_CERTIFICATE_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
"""The TLS 1.2 suites for certificate clients: forward-secret AEAD suites only, as modern servers offer (the CBC
suites OpenSSL's defaults still accept are refused; nbdkit, qemu and libnbd, on GnuTLS, all offer ECDHE with
AES-GCM). A server that also has keys puts them after PSK_CIPHERS, so a client that offers both gets a PSK
suite."""

_WRONG_KEY_REASONS = {"BINDER_DOES_NOT_VERIFY", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "BAD_RECORD_MAC"}
"""OpenSSL's reasons when the client's key is not ours: the TLS 1.3 binder, or the TLS 1.2 Finished MAC."""


class TLSAuthenticationError(ssl.SSLError):
    """A handshake that completed without authenticating the client (neither a known pre-shared key nor a
    verified certificate): the connection is refused."""


class _PskRecord:
    """What the callback learnt during one connection's handshake."""

    __slots__ = ("offered", "known", "identity", "peer")

    def __init__(self, peer: str) -> None:
        self.offered: str | None = None  # the identity the client offered, if it offered one
        self.known = False  # whether that identity is in the key file
        self.identity: str | None = None  # set once the handshake completed with its key
        self.peer = peer


_handshaking: ContextVar[_PskRecord | None] = ContextVar("nbdproto.tls handshaking", default=None)

handshake_peer: ContextVar[str] = ContextVar("nbdproto.tls handshake peer", default="a client")
"""Who the server-side TLS handshakes made in this context are with ("client 192.0.2.1:40000"), for the log
lines of connections that have no socket to ask: anyio's TLS runs over memory BIOs, so its server sets this
around the upgrade. A socket's handshake names its peer itself."""


def _record(connection: ssl.SSLSocket | ssl.SSLObject, peer: str) -> _PskRecord:
    record: _PskRecord | None = connection.__dict__.get("_nbdproto_psk")
    if record is None:
        record = connection.__dict__["_nbdproto_psk"] = _PskRecord(peer)
    return record


def _handshake(connection: ssl.SSLSocket | ssl.SSLObject, record: _PskRecord, step: Callable[[], None]) -> None:
    token = _handshaking.set(record)
    try:
        step()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        raise  # a non-blocking handshake under way: it is called again
    except (ssl.SSLError, OSError) as exc:
        _log_failure(record, exc)
        raise
    finally:
        _handshaking.reset(token)
    _authenticate(connection, record)


def _authenticate(connection: ssl.SSLSocket | ssl.SSLObject, record: _PskRecord) -> None:
    version = connection.version()
    cipher = (connection.cipher() or ("?",))[0]
    keyed = connection.session_reused if version == "TLSv1.3" else "PSK" in cipher
    if keyed and record.known:
        record.identity = record.offered
        log.info("%s: TLS-PSK identity %r (%s, %s)", record.peer, record.identity, version, cipher)
        return
    if connection.getpeercert():
        return  # a client certificate, verified against the CA
    log.warning("%s: TLS handshake refused: the client used neither a known pre-shared key nor a certificate",
                record.peer)  # fmt: skip
    raise TLSAuthenticationError("the client authenticated with neither a pre-shared key nor a certificate")


def _log_failure(record: _PskRecord, exc: BaseException) -> None:
    reason = getattr(exc, "reason", None) or exc
    if record.offered is None:
        log.warning("%s: TLS handshake failed: %s", record.peer, reason)
    elif not record.known:
        log.warning("%s: TLS-PSK identity %r refused: not in the key file", record.peer, record.offered)
    elif getattr(exc, "reason", None) in _WRONG_KEY_REASONS:
        log.warning("%s: TLS-PSK identity %r refused: the client's key is not the one in the key file (%s)",
                    record.peer, record.offered, reason)  # fmt: skip
    else:
        log.warning("%s: TLS-PSK handshake with identity %r failed: %s", record.peer, record.offered, reason)


def _peer_of(sock: ssl.SSLSocket) -> str:
    return f"client {peer_name(sock)}"  # as the server's own lines name it


class _PskSSLSocket(ssl.SSLSocket):
    """The connections ``wrap_socket`` makes for a PSK context (see the module docstring)."""

    def do_handshake(self, block: bool = False) -> None:
        _handshake(self, _record(self, _peer_of(self)), lambda: ssl.SSLSocket.do_handshake(self, block))


class _PskSSLObject(ssl.SSLObject):
    """The connections ``wrap_bio`` makes for a PSK context (anyio's TLSStream); a memory BIO has no peer
    address, so its log lines name the one ``handshake_peer`` holds."""

    def do_handshake(self) -> None:
        _handshake(self, _record(self, handshake_peer.get()), lambda: ssl.SSLObject.do_handshake(self))


class _PskServerContext(ssl.SSLContext):
    sslsocket_class = _PskSSLSocket
    sslobject_class = _PskSSLObject


def psk_identity(connection: ssl.SSLSocket | ssl.SSLObject | TypedAttributeProvider) -> str | None:
    """The pre-shared key identity a server-side connection authenticated with, or None (no PSK, a client
    certificate, or a context not made by ``server_context``). ``connection`` is the ssl.SSLSocket (threads
    server), the ssl.SSLObject, or an anyio stream with TLS (``TLSAttribute.ssl_object``)."""
    if isinstance(connection, (ssl.SSLSocket, ssl.SSLObject)):
        ssl_object: ssl.SSLSocket | ssl.SSLObject | None = connection
    else:
        from anyio.streams.tls import TLSAttribute

        ssl_object = connection.extra(TLSAttribute.ssl_object, None)
    record = ssl_object.__dict__.get("_nbdproto_psk") if ssl_object is not None else None
    return record.identity if isinstance(record, _PskRecord) else None


def server_context(
    *,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    cafile: str | os.PathLike[str] | None = None,
    verify_client: bool = False,
    psk: str | os.PathLike[str] | Mapping[str, bytes] | None = None,
) -> ssl.SSLContext:
    """A server TLS context with a certificate (``certfile``, ``keyfile`` unless the key is in it), pre-shared
    keys (``psk``: a psktool key file, read again whenever it changes, or identities mapped to keys), or both.

    ``cafile`` verifies client certificates; ``verify_client`` requires one. With keys, every session is
    authenticated: by a known key, or (when there is a certificate too) by a client certificate ``cafile``
    signed, which is then required of clients that do not use a key (see the module docstring, also for why
    such a server speaks TLS 1.2). Raises ValueError for a combination that cannot work, PskFileError for a bad
    key file, OSError for a file that cannot be read, ssl.SSLError for a bad certificate or key, and
    PskUnavailableError for keys on a Python below 3.13.
    """
    if certfile is None and psk is None:
        raise ValueError("a TLS server needs a certificate or pre-shared keys")
    if verify_client and cafile is None:
        raise ValueError("verifying client certificates needs the CA that signs them (cafile)")
    if psk is None:
        assert certfile is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.set_ciphers(_CERTIFICATE_CIPHERS)  # TLS 1.2: AEAD suites only, no CBC (TLS 1.3 has only AEAD)
        load_cert_chain(context, certfile, keyfile)
        if cafile is not None:
            load_verify_locations(context, cafile)
        if verify_client:
            context.verify_mode = ssl.CERT_REQUIRED
        return context
    check_psk_support()
    keys = _keys(psk)
    if certfile is not None and cafile is None:
        raise ValueError(
            "a server with a certificate and pre-shared keys needs a CA (cafile) too: clients that use no key "
            "must then present a certificate it signed, or they would be served unauthenticated"
        )
    context = _PskServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    if certfile is not None:
        assert cafile is not None
        load_cert_chain(context, certfile, keyfile)
        load_verify_locations(context, cafile)
        context.verify_mode = ssl.CERT_REQUIRED
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(f"{PSK_CIPHERS}:{_CERTIFICATE_CIPHERS}")
    else:
        context.set_ciphers(PSK_CIPHERS)
    _set_server_callback(context, _lookup(keys))
    return context


def _keys(psk: str | os.PathLike[str] | Mapping[str, bytes]) -> Callable[[], Mapping[str, bytes]]:
    """What says the keys at each handshake: a key file's (read again whenever it changes), or the mapping's."""
    if not isinstance(psk, Mapping):
        return _KeyFile(psk).keys
    keys = dict(psk)
    if not keys:
        raise PskFileError("no pre-shared keys given")
    for identity, key in keys.items():
        if not identity or len(identity.encode()) > MAX_IDENTITY_LENGTH:
            raise PskFileError(f"identity {identity!r}: must be 1 to {MAX_IDENTITY_LENGTH} bytes")
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise PskFileError(f"the key of {identity!r} is {len(key)} bytes; it must be 1 to {MAX_KEY_LENGTH}")
    return lambda: keys


class _KeyFile:
    """A psktool key file, read at start (a bad one is an error then) and read again at the first handshake
    after it changed (its inode, size or modification time), as nbdkit's GnuTLS reads its key file at every
    handshake: keys added or removed count from the next handshake on, without a restart. A changed file that
    cannot be read, or is not a key file, leaves no key valid until it is fixed (a key removed from it must
    never stay valid because of a typo), and says why in the log."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.path.abspath(path)  # (a server that changes directory still finds it)
        self._lock = threading.Lock()
        self._seen = self._signature()
        self._keys = read_psk_file(self._path)

    def keys(self) -> Mapping[str, bytes]:
        signature = self._signature()
        if signature != self._seen:
            with self._lock:  # concurrent handshakes read the file once
                if signature != self._seen:
                    self._keys, self._seen = self._read(), signature
        return self._keys

    def _read(self) -> dict[str, bytes]:
        try:
            keys = read_psk_file(self._path)
        except (OSError, PskFileError) as exc:
            log.error("TLS-PSK key file %s changed and cannot be used (%s): no key is accepted until it is fixed",
                      self._path, exc)  # fmt: skip
            return {}
        log.info("TLS-PSK key file %s changed: read again (%d identities)", self._path, len(keys))
        return keys

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            status = os.stat(self._path)
        except OSError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns


def _lookup(keys_now: Callable[[], Mapping[str, bytes]]) -> Callable[[str | None], bytes]:
    def callback(identity: str | None) -> bytes:
        record = _handshaking.get()
        key = keys_now().get(identity) if identity is not None else None
        if record is not None:
            record.offered, record.known = identity, key is not None
        # An unknown name gets a random key, so it fails like a wrong key (GnuTLS does the same): an empty
        # answer would let TLS 1.3 go on without a PSK, and tell a prober which names exist.
        return key if key is not None else os.urandom(32)

    return callback


def _set_server_callback(context: ssl.SSLContext, callback: Callable[[str | None], bytes]) -> None:
    if sys.version_info >= (3, 13):
        context.set_psk_server_callback(callback)
    else:  # check_psk_support() has said so already
        raise AssertionError("unreachable below Python 3.13")
