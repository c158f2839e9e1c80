"""Loading certificates and keys into an SSLContext with errors that say which file is not what.

OpenSSL reports a certificate file that holds a key, a key file that holds a certificate, or a key that is not
the certificate's as "[SSL] PEM lib (_ssl.c:3905)" or "key values mismatch", naming neither file, and Python's
ssl raises FileNotFoundError without the path. When a load fails, the files are looked at (PEM block headers
only: nothing is parsed here that OpenSSL did not already refuse) so that the error names the file and what
it lacks. The exception types stay those of ``ssl`` (OSError for a file that cannot be read, ssl.SSLError
for one whose contents are refused), so callers catch what they caught before.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["load_cert_chain", "load_verify_locations"]

_CERTIFICATE = (b"-----BEGIN CERTIFICATE-----", b"-----BEGIN TRUSTED CERTIFICATE-----")
_KEY = b"PRIVATE KEY-----"

Path = str | os.PathLike[str]


def load_cert_chain(context: ssl.SSLContext, certfile: Path, keyfile: Path | None = None) -> None:
    """``context.load_cert_chain(certfile, keyfile)``; on failure an error naming the file at fault."""
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        raise _contents_error(exc, certfile, keyfile) from None
    except OSError as exc:
        raise _unreadable(exc, certfile, keyfile) from None


def load_verify_locations(context: ssl.SSLContext, cafile: Path) -> None:
    """``context.load_verify_locations(cafile)``; on failure an error naming it."""
    try:
        context.load_verify_locations(cafile)
    except ssl.SSLError as exc:
        head = _head(cafile)
        what = "no certificate" if head is not None and not any(h in head for h in _CERTIFICATE) else "no usable CA"
        raise ssl.SSLError(exc.errno, f"{os.fspath(cafile)} holds {what} (a PEM 'BEGIN CERTIFICATE' block)") from None
    except OSError as exc:
        raise _unreadable(exc, cafile) from None


def _unreadable(exc: OSError, *paths: Path | None) -> OSError:
    """The OSError of the first of ``paths`` that cannot be read (Python's names none)."""
    for path in paths:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as failure:
            return type(failure)(failure.errno, failure.strerror, os.fspath(path))
    return exc


def _contents_error(exc: ssl.SSLError, certfile: Path, keyfile: Path | None) -> ssl.SSLError:
    cert, key = os.fspath(certfile), os.fspath(keyfile) if keyfile is not None else None
    cert_head, key_head = _head(certfile), _head(keyfile) if keyfile is not None else None
    cert_has_cert = cert_head is not None and any(h in cert_head for h in _CERTIFICATE)
    key_source, key_text = (key, key_head) if key is not None else (cert, cert_head)
    key_has_key = key_text is not None and _KEY in key_text
    key_is_cert = key_head is not None and any(h in key_head for h in _CERTIFICATE)
    if not cert_has_cert and key_is_cert and cert_head is not None and _KEY in cert_head:
        message = f"{cert} holds a private key and {key} a certificate: the certificate and key files are swapped"
        return ssl.SSLError(exc.errno, message)
    if not cert_has_cert:
        return ssl.SSLError(exc.errno, f"{cert} holds no certificate (a PEM 'BEGIN CERTIFICATE' block)")
    if not key_has_key:
        where = key_source if key is not None else f"{cert} (no key file was given)"
        return ssl.SSLError(exc.errno, f"{where} holds no private key (a PEM 'PRIVATE KEY' block)")
    if exc.reason == "KEY_VALUES_MISMATCH":
        return ssl.SSLError(exc.errno, f"{key_source}: the private key does not belong to the certificate in {cert}")
    reason = exc.reason or str(exc)
    return ssl.SSLError(exc.errno, f"{cert}{' or ' + key if key else ''}: cannot be loaded ({reason})")


def _head(path: Path | None) -> bytes | None:
    """The file's first 1 MiB (PEM headers), None if it cannot be read."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return None
