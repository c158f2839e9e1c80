"""Client TLS contexts: the one place an NBD URI's TLS settings become an ``ssl.SSLContext``.

The URI keys are libnbd's (and qemu's, for the certificate directory):

- ``nbds://IDENTITY@host/?tls-psk-file=FILE``: a pre-shared key, IDENTITY's line in the psktool key FILE
  (without a user in the URI, the login name, as libnbd does). A key is used instead of certificates, as in
  libnbd.
- ``tls-certificates=DIR``: DIR/ca-cert.pem verifies the server; DIR/client-cert.pem with DIR/client-key.pem is
  the client's certificate when both are there; DIR/ca-crl.pem, when there, revokes certificates.
- ``tls-verify-peer=false``: encrypt without verifying the server at all.
- ``tls-hostname=NAME``: the name the server's certificate must carry (else the host; a unix socket URI
  without it verifies the chain only, as libnbd does). The clients pass it to the TLS layer.

Without any of them: the system's CAs verify the server, as any TLS client would.
"""

from __future__ import annotations

import os
import ssl
import sys

from nbdproto.client import NbdUri, parse_uri

from ._keys import MAX_IDENTITY_LENGTH, MAX_KEY_LENGTH, PskFileError, check_psk_support, read_psk_file
from ._pem import load_cert_chain, load_verify_locations

__all__ = ["client_context", "connection_context", "psk_client_context", "PSK_CIPHERS"]

PSK_CIPHERS = "kECDHEPSK+CHACHA20:kDHEPSK+AESGCM:kDHEPSK+CHACHA20:kPSK+AESGCM:kPSK+CHACHA20"
"""The TLS 1.2 PSK cipher suites we offer and accept: forward-secret ones first, then plain PSK for peers that
have nothing else; AEAD only. (Python 3.13 cannot configure TLS 1.3 suites; all of them work with a PSK.)
nbdkit, qemu and libnbd (GnuTLS, ``NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK``) agree on ECDHE-PSK-CHACHA20-POLY1305."""


def psk_client_context(identity: str, key: bytes) -> ssl.SSLContext:
    """A client context that authenticates with a pre-shared key (TLS 1.3 or 1.2) and with nothing else.

    It trusts no certificate authority and still requires a verified server certificate: a server that
    declines the key and presents a certificate instead (TLS 1.3 allows that) fails the handshake, so the
    client never talks to a server that did not prove it holds the key. PskUnavailableError below Python 3.13.
    """
    check_psk_support()
    if not identity or len(identity.encode()) > MAX_IDENTITY_LENGTH:
        raise ValueError(f"PSK identity {identity!r}: must be 1 to {MAX_IDENTITY_LENGTH} bytes")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise ValueError(f"the key of {identity!r} is {len(key)} bytes; it must be 1 to {MAX_KEY_LENGTH}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # a PSK session has no certificate to carry a name
    context.set_ciphers(PSK_CIPHERS)
    if sys.version_info >= (3, 13):
        context.set_psk_client_callback(lambda hint: (identity, key))
    return context


def client_context(
    uri: NbdUri | str,
    *,
    cafile: str | os.PathLike[str] | None = None,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    psk: tuple[str, bytes] | None = None,
) -> ssl.SSLContext:
    """The client context for ``uri``'s TLS settings (see the module docstring), which ``cafile``, ``certfile``
    / ``keyfile`` (a client certificate) and ``psk`` ((identity, key)) override.

    Reads the files the URI names. Raises ValueError for settings that contradict each other, PskFileError
    for a bad key file or an identity it lacks, OSError for a file that cannot be read, ssl.SSLError for a
    bad certificate, and PskUnavailableError for a PSK below Python 3.13.
    """
    target = parse_uri(uri) if isinstance(uri, str) else uri
    if psk is not None or target.tls_psk_file:
        if cafile is not None or certfile is not None:
            raise ValueError("a client authenticates with a pre-shared key or with certificates, not both")
        if psk is None:
            psk = _psk_from(target)
        return psk_client_context(*psk)
    crlfile = None
    if target.tls_certificates:
        directory = target.tls_certificates
        ca = os.path.join(directory, "ca-cert.pem")
        if cafile is None:
            if not os.path.exists(ca):
                raise FileNotFoundError(f"tls-certificates={directory}: it has no ca-cert.pem to verify the server")
            cafile = ca
        cert, key = os.path.join(directory, "client-cert.pem"), os.path.join(directory, "client-key.pem")
        if certfile is None and os.path.exists(cert) and os.path.exists(key):
            certfile, keyfile = cert, key
        crl = os.path.join(directory, "ca-crl.pem")
        crlfile = crl if os.path.exists(crl) else None
    try:
        context = ssl.create_default_context(cafile=cafile)  # the system's CAs only without cafile
    except OSError:
        if cafile is not None:
            load_verify_locations(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cafile)  # raises, naming the file
        raise
    if certfile is not None:
        load_cert_chain(context, certfile, keyfile)
    if crlfile is not None:
        context.load_verify_locations(crlfile)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if not target.tls_verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif target.tls_hostname is None:
        context.check_hostname = False  # a unix socket without tls-hostname: the chain is still verified
    return context


def connection_context(
    target: NbdUri, needed: bool, given: ssl.SSLContext | None = None, psk: tuple[str, bytes] | None = None
) -> ssl.SSLContext | None:
    """The context a client's connection to ``target`` upgrades with: ``given`` when the caller gave one, else,
    when TLS is ``needed`` (the connection plan says so), the URI's own settings (``client_context``, with
    ``psk``); None for a plaintext connection. Both clients decide it here, so they cannot differ."""
    if given is not None or not needed:
        return given
    return client_context(target, psk=psk)


def _psk_from(target: NbdUri) -> tuple[str, bytes]:
    path = target.tls_psk_file
    assert path is not None
    identity = target.tls_username or _login_name()
    keys = read_psk_file(path)
    key = keys.get(identity)
    if key is None:
        source = "the URI's user" if target.tls_username else "the login name (the URI names no user)"
        raise PskFileError(f"{path}: no key for identity {identity!r}, {source}")
    return identity, key


def _login_name() -> str:
    import getpass

    return getpass.getuser()
