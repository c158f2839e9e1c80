"""Pre-shared key files as GnuTLS's psktool writes them, and whether this Python can use such keys at all.

The format nbdkit (``--tls-psk``), qemu (``tls-creds-psk``) and libnbd (``tls-psk-file``) all read: one
``identity:hexkey`` per line, the identity up to the first ``:``, the key in hexadecimal (psktool writes 32
random bytes, lower case). GnuTLS looks a name up by scanning for a line that starts with it, so it silently
skips lines that name no one; we are stricter where that would hide a mistake: blank lines and lines starting
with ``#`` are comments, and any other line that is not a valid entry (no ``:``, no identity, a key that is
not whole bytes of hexadecimal, an identity given twice) is an error naming the file and line.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Mapping

__all__ = [
    "PskKeys",
    "PskFileError",
    "PskUnavailableError",
    "parse_psk_keys",
    "read_psk_file",
    "check_psk_support",
    "MAX_PSK_FILE_SIZE",
    "MAX_IDENTITY_LENGTH",
    "MAX_KEY_LENGTH",
    "PSK_PYTHON",
]

PskKeys = Mapping[str, bytes]
"""Identities and their keys, as a server holds them."""

MAX_PSK_FILE_SIZE = 1 << 20
"""A key file larger than this is refused before it is read (a few thousand identities fit in far less)."""

MAX_IDENTITY_LENGTH = 255
"""The longest identity OpenSSL sends or accepts (PSK_MAX_IDENTITY_LEN, with its terminating NUL)."""

MAX_KEY_LENGTH = 512
"""The longest key OpenSSL takes (PSK_MAX_PSK_LEN); psktool writes 32 bytes."""

PSK_PYTHON = (3, 13)
"""The first Python whose ssl module has PSK (SSLContext.set_psk_client_callback / set_psk_server_callback)."""


class PskFileError(ValueError):
    """A key file that cannot be used; the message names the file, the line and what is wrong with it."""


class PskUnavailableError(NotImplementedError):
    """This Python (or the OpenSSL it is built with) cannot do TLS with pre-shared keys."""


def check_psk_support() -> None:
    """Raise PskUnavailableError (one line, naming the version needed) unless this Python can use PSK."""
    if sys.version_info >= (3, 13):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_psk_client_callback(None)
        except NotImplementedError:
            raise PskUnavailableError(
                f"TLS with pre-shared keys is not available: this Python's {ssl.OPENSSL_VERSION} was built without PSK"
            ) from None
        return
    have = ".".join(map(str, sys.version_info[:3]))
    raise PskUnavailableError(
        f"TLS with pre-shared keys needs Python {PSK_PYTHON[0]}.{PSK_PYTHON[1]} or newer (this is Python {have})"
    )


def parse_psk_keys(text: str | bytes, source: str = "<psk keys>") -> dict[str, bytes]:
    """The identities and keys of a key file's contents; PskFileError naming ``source`` and the line otherwise.

    An empty result is an error too: a server with no identity could never complete a handshake.
    """
    if isinstance(text, str):
        text = text.encode()
    keys: dict[str, bytes] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.split(b"\n"), 1):
        line = raw.rstrip(b"\r")
        where = f"{source}, line {number}"
        if not line.strip() or line.startswith(b"#"):
            continue
        name, colon, hexkey = line.partition(b":")
        if not colon:
            raise PskFileError(f"{where}: expected IDENTITY:HEXKEY, but there is no ':'")
        try:
            identity = name.decode()
        except UnicodeDecodeError:
            raise PskFileError(f"{where}: the identity is not UTF-8") from None
        if not identity:
            raise PskFileError(f"{where}: no identity before the ':'")
        if len(name) > MAX_IDENTITY_LENGTH:
            raise PskFileError(f"{where}: identity {identity[:20]!r}... is longer than {MAX_IDENTITY_LENGTH} bytes")
        if identity in keys:
            raise PskFileError(f"{where}: identity {identity!r} is already given on line {lines[identity]}")
        keys[identity] = _key(hexkey.strip(b" \t"), identity, where)
        lines[identity] = number
    if not keys:
        raise PskFileError(f"{source}: no IDENTITY:HEXKEY line (psktool -u NAME -p {source} makes one)")
    return keys


def _key(hexkey: bytes, identity: str, where: str) -> bytes:
    if not hexkey:
        raise PskFileError(f"{where}: identity {identity!r} has no key after the ':'")
    bad = next((i for i, byte in enumerate(hexkey) if chr(byte) not in "0123456789abcdefABCDEF"), None)
    if bad is not None:
        raise PskFileError(
            f"{where}: the key of {identity!r} is not hexadecimal ({hexkey[bad : bad + 1].decode(errors='replace')!r} "
            f"at position {bad + 1} of the key)"
        )
    if len(hexkey) % 2:
        raise PskFileError(f"{where}: the key of {identity!r} has an odd number of hex digits ({len(hexkey)})")
    key = bytes.fromhex(hexkey.decode())
    if len(key) > MAX_KEY_LENGTH:
        raise PskFileError(f"{where}: the key of {identity!r} is {len(key)} bytes; at most {MAX_KEY_LENGTH} work")
    return key


def read_psk_file(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Read a psktool key file: its identities and keys. OSError if it cannot be read, PskFileError if it is not
    a key file (or is larger than MAX_PSK_FILE_SIZE)."""
    name = os.fspath(path)
    with open(name, "rb") as file:
        data = file.read(MAX_PSK_FILE_SIZE + 1)
    if len(data) > MAX_PSK_FILE_SIZE:
        raise PskFileError(f"{name}: larger than {MAX_PSK_FILE_SIZE} bytes: not a key file")
    return parse_psk_keys(data, name)
