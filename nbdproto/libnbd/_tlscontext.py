"""The TLS context a handle's settings ask for (libnbd(3) "ENCRYPTION AND AUTHENTICATION").

The settings are libnbd's: ``set_tls_certificates(DIR)`` (ca-cert.pem, client-cert.pem, client-key.pem),
``set_tls_verify_peer``, ``set_tls_username`` and ``set_tls_psk_file`` (a psktool key file: the username's key
is used instead of certificates). Without a directory, or with one that has no ca-cert.pem, libnbd looks in
/etc/pki/libnbd (root) or ~/.pki/libnbd and ~/.config/pki/libnbd, and else trusts the system's authorities; so
does this. As in libnbd, the server's certificate is checked (its chain and the host name) on TCP connections
only, unless ``set_tls_verify_peer(False)``: over a unix socket, a socket pair or a passed socket the peer is
local and libnbd encrypts without checking. Unlike libnbd 1.14, a TCP connection that falls back to the system's
authorities checks the certificate too (docs/howto/libnbd.md). The context itself is nbdproto.tls's, made from
the same settings written as an NBD URI's TLS keys. Pre-shared keys need Python 3.13 or newer.
"""

from __future__ import annotations

import errno
import os
import ssl

import nbdproto.client
import nbdproto.tls

from ._errors import Failure
from ._settings import Settings

__all__ = ["tls_context", "login_name"]


def login_name() -> str:
    """The TLS username when none was set: the login name, as libnbd takes it (getlogin: a process without a
    controlling terminal has none, and fails as libnbd does there)."""
    try:
        return os.getlogin()
    except OSError as exc:
        raise Failure(exc.errno or errno.ENXIO, "getlogin_r") from None


def _certificates(given: str | None) -> str | None:
    """The directory whose ca-cert.pem is used: the one given, else libnbd's defaults; None for the system's
    authorities (a directory without ca-cert.pem does not count, as in libnbd)."""
    if given is not None:
        candidates = [given]
    elif os.geteuid() == 0:
        candidates = ["/etc/pki/libnbd"]
    else:
        home = os.path.expanduser("~")
        candidates = [os.path.join(home, ".pki", "libnbd"), os.path.join(home, ".config", "pki", "libnbd")]
    return next((path for path in candidates if os.access(os.path.join(path, "ca-cert.pem"), os.R_OK)), None)


def tls_context(settings: Settings, host: str | None) -> tuple[ssl.SSLContext, str | None]:
    """The client context and the name the server's certificate must carry (None: not checked) for a
    connection to ``host`` (None for a unix socket and the other transports without a host name)."""
    query: dict[str, str] = {}
    psk = settings.tls_psk_file
    if psk is not None:
        query["tls-psk-file"] = psk
    else:
        certificates = _certificates(settings.tls_certificates)
        if certificates is not None:
            query["tls-certificates"] = certificates
    if not settings.tls_verify_peer or host is None:
        query["tls-verify-peer"] = "false"
    user = settings.tls_username or (login_name() if psk is not None else "")
    target = nbdproto.client.NbdUri(
        settings.export_name, True, host is None, host or "localhost", query=query, user=user, socket="-"
    )
    try:
        context = nbdproto.tls.client_context(target)
    except nbdproto.tls.PskUnavailableError as exc:
        raise Failure(errno.ENOTSUP, str(exc)) from None
    except nbdproto.tls.PskFileError as exc:
        raise Failure(errno.EINVAL, str(exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise Failure(getattr(exc, "errno", 0) or 0, f"TLS credentials: {exc}") from None
    except ValueError as exc:
        raise Failure(errno.EINVAL, str(exc)) from None
    hostname = host if host is not None and psk is None and settings.tls_verify_peer else None
    if hostname is None:
        context.check_hostname = False
    return context, hostname
