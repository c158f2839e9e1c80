"""NBD URIs (doc/uri.md of the NBD repository): parse them into what a client needs to connect, and format them.

    nbd://host[:port]/export          TCP, TLS if the server offers it and the client is configured for it
    nbds://host[:port]/export         TCP, TLS required
    nbd+unix:///export?socket=PATH    unix socket
    nbds+unix:///export?socket=PATH   unix socket, TLS required

The export name is the path without its leading "/", percent-decoded (so ``nbd://h//disk`` names "/disk").
A user before the host (``nbds://alice@host/``, ``nbds+unix://alice@/?socket=...``) is the TLS username, the
identity a client gives with a pre-shared key, as in libnbd. Query parameters other than ``socket`` are kept
for the client to interpret; the TLS ones libnbd and qemu know have properties here: ``tls-psk-file=FILE``
(a psktool key file), ``tls-certificates=DIR`` (ca-cert.pem, client-cert.pem, client-key.pem),
``tls-verify-peer=false``, ``tls-hostname=NAME``. Pure string handling: nothing here touches the network or
reads those files (nbdproto.tls does, when a client connects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from nbdproto.wire import DEFAULT_PORT

__all__ = ["NbdUri", "parse_uri", "format_uri"]

_SCHEMES = {"nbd": (False, False), "nbds": (True, False), "nbd+unix": (False, True), "nbds+unix": (True, True)}


@dataclass(frozen=True)
class NbdUri:
    """A parsed NBD URI. Exactly one of (``host``, ``port``) and ``socket`` is meaningful, as ``unix`` says;
    ``user`` is the URI's user ("" when it has none)."""

    export_name: str = ""
    tls: bool = False
    unix: bool = False
    host: str = "localhost"
    port: int = DEFAULT_PORT
    socket: str = ""
    query: dict[str, str] = field(default_factory=dict)
    user: str = ""

    @property
    def tls_hostname(self) -> str | None:
        """The name to check the server's certificate against: ``tls-hostname``, else the TCP host."""
        return self.query.get("tls-hostname") or (None if self.unix else self.host)

    @property
    def tls_verify_peer(self) -> bool:
        """Whether to verify the server's certificate (``tls-verify-peer``, on by default)."""
        return self.query.get("tls-verify-peer", "1").lower() not in ("0", "false", "no", "off")

    @property
    def tls_username(self) -> str | None:
        """The TLS username (the PSK identity): the URI's user, else None (libnbd then uses the login name)."""
        return self.user or None

    @property
    def tls_psk_file(self) -> str | None:
        """``tls-psk-file``: the psktool key file holding the key of ``tls_username``, if given."""
        return self.query.get("tls-psk-file") or None

    @property
    def tls_certificates(self) -> str | None:
        """``tls-certificates``: the directory of ca-cert.pem (and client-cert.pem, client-key.pem), if given."""
        return self.query.get("tls-certificates") or None

    def __str__(self) -> str:
        return format_uri(self)


def parse_uri(uri: str) -> NbdUri:
    """Parse an NBD URI; raises ValueError naming what is wrong with it."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"{uri!r}: scheme {parts.scheme!r} is not one of {', '.join(_SCHEMES)}")
    tls, unix = _SCHEMES[scheme]
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    export_name = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    user = unquote(parts.username) if parts.username else ""
    if unix:
        sock = query.pop("socket", "")
        if not sock:
            raise ValueError(f"{uri!r}: a {scheme} URI needs a socket= query parameter")
        return NbdUri(export_name, tls, True, socket=sock, query=query, user=user)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{uri!r}: the port is not a number from 0 to 65535") from None
    host = parts.hostname or "localhost"
    return NbdUri(export_name, tls, False, host, port or DEFAULT_PORT, query=query, user=user)


def format_uri(uri: NbdUri) -> str:
    """The URI text for ``uri`` (the inverse of parse_uri)."""
    scheme = ("nbds" if uri.tls else "nbd") + ("+unix" if uri.unix else "")
    path = "/" + quote(uri.export_name, safe="")
    query = dict(uri.query)
    if uri.unix:
        query = {"socket": uri.socket, **query}
        authority = ""
    else:
        host = f"[{uri.host}]" if ":" in uri.host else uri.host
        authority = host if uri.port == DEFAULT_PORT else f"{host}:{uri.port}"
    if uri.user:
        authority = quote(uri.user, safe="") + "@" + authority
    text = f"{scheme}://{authority}{path}"
    if query:
        text += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='/')}" for k, v in query.items())
    return text
