"""nbdproto.tls: TLS for NBD clients and servers: certificates, and pre-shared keys (TLS-PSK) as nbdkit
(``--tls-psk``), qemu (``tls-creds-psk``) and libnbd (``tls-psk-file``) use them.

Unlike the engine this package reads files (key files, certificates) and builds ``ssl.SSLContext`` objects,
so ``import nbdproto`` does not import it. What it offers:

- ``client_context(uri, ...)``: the client context an NBD URI's TLS settings ask for (``tls-psk-file``,
  ``tls-certificates``, ``tls-verify-peer``, ``tls-hostname``); the clients call it when a URI needs TLS and
  no context was given. ``psk_client_context(identity, key)`` for a key held in memory.
- ``server_context(certfile=..., psk=...)``: a server context with a certificate, pre-shared keys or both,
  which never completes an unauthenticated session; ``psk_identity(connection)`` says which identity a
  server-side connection used (how it knows: nbdproto/tls/_server.py); ``handshake_peer`` names the client
  in its log lines where the connection has no socket to ask (anyio's TLS).
- ``read_psk_file`` / ``parse_psk_keys``: the psktool key file format, with errors naming the line.

Pre-shared keys need Python 3.13 or newer (``ssl.SSLContext.set_psk_*_callback``); below it asking for one
raises PskUnavailableError, whose message names the version needed. The server half (and its logging) is
loaded on first use, so a client's start-up does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdproto.serving import lazy_names

from ._client import PSK_CIPHERS, client_context, connection_context, psk_client_context
from ._keys import (
    MAX_IDENTITY_LENGTH,
    MAX_KEY_LENGTH,
    MAX_PSK_FILE_SIZE,
    PSK_PYTHON,
    PskFileError,
    PskKeys,
    PskUnavailableError,
    check_psk_support,
    parse_psk_keys,
    read_psk_file,
)

if TYPE_CHECKING:
    from ._server import TLSAuthenticationError, handshake_peer, psk_identity, server_context

_WHERE = {
    "server_context": "._server",
    "psk_identity": "._server",
    "handshake_peer": "._server",
    "TLSAuthenticationError": "._server",
}

__all__ = [
    "client_context",
    "connection_context",
    "psk_client_context",
    "server_context",
    "psk_identity",
    "handshake_peer",
    "TLSAuthenticationError",
    "read_psk_file",
    "parse_psk_keys",
    "PskKeys",
    "PskFileError",
    "PskUnavailableError",
    "check_psk_support",
    "PSK_PYTHON",
    "PSK_CIPHERS",
    "MAX_PSK_FILE_SIZE",
    "MAX_IDENTITY_LENGTH",
    "MAX_KEY_LENGTH",
]

__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
