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

import ipaddress
import os
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from nbdproto.wire import DEFAULT_PORT

__all__ = ["NbdUri", "parse_uri", "format_uri", "looks_like_uri", "connect_error"]

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
    """Parse an NBD URI; raises ValueError naming what is wrong with it.

    The grammar is RFC 3986's, as libnbd's nbd_connect_uri reads it, and a URI is either read as libnbd reads
    it (the same host, port, socket, export name and TLS) or refused: never read as pointing somewhere else.
    So the scheme is lower case and followed by "//"; only the characters RFC 3986 allows appear, and every
    "%" starts an escape of two hex digits; the host is a name or an address (IPv6 in brackets), its
    escapes decoded; the port is digits (0 and none: 10809); the query's parameters are separated as libnbd
    separates them (``_query``) and "+" is a plus; the fragment is ignored. Refused where libnbd would read
    something we cannot serve the same way: escapes that are not UTF-8 or hold NUL (libnbd cuts the name
    there), a port above 65535 (libnbd hands it to getaddrinfo, which wraps it), a port without a host (libnbd
    ignores the port), ``socket=`` in a TCP URI, a host or port in a unix socket URI.
    """
    match = _SCHEME.match(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not an NBD URI: it must begin with a scheme such as nbd:// or nbd+unix:// "
                         "(a unix socket: nbd+unix:///EXPORT?socket=PATH)")  # fmt: skip
    scheme = match.group(1)
    if scheme not in _SCHEMES:
        if scheme.lower() in _SCHEMES:
            raise ValueError(f"{uri!r}: the scheme must be written in lower case: {scheme.lower()}://")
        raise ValueError(f"{uri!r}: unknown scheme {scheme!r}, not one of {', '.join(s + '://' for s in _SCHEMES)}")
    tls, unix = _SCHEMES[scheme]
    if not uri.startswith("//", len(scheme) + 1):
        raise ValueError(f"{uri!r}: an NBD URI must begin with {scheme}:// (the host, if any, follows the //)")
    bad = _FORBIDDEN.search(uri)
    if bad is not None:
        char = bad.group()
        if char == "%":
            raise ValueError(f"{uri!r}: the '%' at position {bad.start()} starts no escape (%XX: two hex digits)")
        hint = f" (percent-encode it: %{ord(char):02X})" if char.isascii() else " (percent-encode its UTF-8)"
        raise ValueError(f"{uri!r}: {char!r} at position {bad.start()} is not allowed in a URI{hint}")
    parts = _AUTHORITY_ON.fullmatch(uri, len(scheme) + 3)
    if parts is None:
        raise ValueError(f"{uri!r}: not a valid URI (after {scheme}://: [USER@]HOST[:PORT][/EXPORT][?QUERY])")
    user = _decoded(parts.group("user") or "", "the user", uri)
    export_name = _decoded(parts.group("path")[1:], "the export name", uri)
    query = _query(parts.group("query") or "", uri)
    host_text, port_text = parts.group("host"), parts.group("port")
    if unix:
        if host_text or port_text is not None:
            raise ValueError(f"{uri!r}: a {scheme} URI names no host or port: the socket is its only address "
                             f"({scheme}:///EXPORT?socket=PATH)")  # fmt: skip
        sock = query.pop("socket", "")
        if not sock:
            raise ValueError(f"{uri!r}: a {scheme} URI needs a socket= query parameter")
        return NbdUri(export_name, tls, True, socket=sock, query=query, user=user)
    if "socket" in query:
        raise ValueError(f"{uri!r}: socket= is for {scheme}+unix URIs ({scheme}+unix:///EXPORT?socket=PATH)")
    host = _host(host_text, uri)
    if port_text is None:
        port = DEFAULT_PORT
    elif not port_text or int(port_text) > 65535:
        raise ValueError(f"{uri!r}: the port is not a number from 0 to 65535")
    else:
        port = int(port_text) or DEFAULT_PORT
        if not host:
            raise ValueError(f"{uri!r}: names port {port_text} but no host (nbd://HOST:PORT/)")
    return NbdUri(export_name, tls, False, host or "localhost", port, query=query, user=user)


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_UNRESERVED = r"A-Za-z0-9\-._~"
_SUB_DELIMS = r"!$&'()*+,;="
_ESCAPE = r"%[0-9A-Fa-f]{2}"
_FORBIDDEN = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/?#\[\]%]|%(?![0-9A-Fa-f]{2})")
"""A character RFC 3986 never allows, or a "%" that starts no escape."""
_AUTHORITY_ON = re.compile(
    rf"(?:(?P<user>(?:[{_UNRESERVED}{_SUB_DELIMS}:]|{_ESCAPE})*)@)?"
    rf"(?P<host>\[[0-9A-Fa-f:.]*(?:%25(?:[{_UNRESERVED}]|{_ESCAPE})+)?\]|(?:[{_UNRESERVED}{_SUB_DELIMS}]|{_ESCAPE})*)"
    r"(?::(?P<port>[0-9]*))?"
    rf"(?P<path>(?:/(?:[{_UNRESERVED}{_SUB_DELIMS}:@/]|{_ESCAPE})*)?)"
    rf"(?:\?(?P<query>(?:[{_UNRESERVED}{_SUB_DELIMS}:@/?]|{_ESCAPE})*))?"
    rf"(?:#(?:[{_UNRESERVED}{_SUB_DELIMS}:@/?]|{_ESCAPE})*)?"
)
"""What follows ``scheme://``: RFC 3986's authority, path-abempty, query and fragment."""


def _decoded(text: str, what: str, uri: str) -> str:
    """``text`` with its escapes decoded, which must be UTF-8 and must not hold NUL (a C string ends there)."""
    try:
        value = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{uri!r}: {what} {text!r} is not UTF-8 once decoded") from None
    if "\0" in value:
        raise ValueError(f"{uri!r}: {what} {text!r} holds a NUL byte (%00)")
    return value


def _query(text: str, uri: str) -> dict[str, str]:
    """The query's parameters, "+" a plus (not form encoding), the last of a key counting. Each ends at the
    next "&", or where none follows, at the next ";" (libnbd's rule, from qemu's: "a;b&c" is "a;b" and "c")."""
    query: dict[str, str] = {}
    while text:
        end = text.find("&")
        if end < 0:
            end = text.find(";")
        item, text = (text, "") if end < 0 else (text[:end], text[end + 1 :])
        key, _, value = item.partition("=")
        if key:
            query[_decoded(key, "a query key", uri)] = _decoded(value, f"the value of {key}", uri)
    return query


def _host(text: str, uri: str) -> str:
    if text.startswith("["):
        address, _, zone = text[1:-1].partition("%25")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"{uri!r}: {text} is not an IPv6 address in brackets") from None
        return address + ("%" + _decoded(zone, "the IPv6 zone", uri) if zone else "")
    host = _decoded(text, "the host", uri)
    if any(c.isspace() for c in host):
        raise ValueError(f"{uri!r}: the host {host!r} holds white space")
    return host


def format_uri(uri: NbdUri) -> str:
    """The URI text for ``uri`` (the inverse of parse_uri)."""
    scheme = ("nbds" if uri.tls else "nbd") + ("+unix" if uri.unix else "")
    path = "/" + quote(uri.export_name, safe="")
    query = dict(uri.query)
    if uri.unix:
        query = {"socket": uri.socket, **query}
        authority = ""
    else:
        host = f"[{uri.host.replace('%', '%25')}]" if ":" in uri.host else quote(uri.host, safe="!$&'()*+,;=")
        authority = host if uri.port == DEFAULT_PORT else f"{host}:{uri.port}"
    if uri.user:
        authority = quote(uri.user, safe="") + "@" + authority
    text = f"{scheme}://{authority}{path}"
    if query:
        text += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='/')}" for k, v in query.items())
    return text


_LIBNBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")


def looks_like_uri(text: str) -> bool:
    """Whether a command-line argument is meant as an NBD URI, not a file name: any URL (``scheme://``), and, as
    nbdcopy decides, anything that starts with an NBD scheme and a colon, so that a mistyped ``nbd:/host/disk``
    is refused as a URI (parse_uri says why) instead of taken for a file that does not exist."""
    scheme, colon, _ = text.partition(":")
    return "://" in text or (bool(colon) and scheme in _LIBNBD_SCHEMES)


def connect_error(exc: OSError, uri: NbdUri) -> OSError:
    """``exc``, raised connecting to where ``uri`` points, as an error of the same type that names the place:
    its ``filename`` is ``host:port`` (``[v6]:port``) or the socket path, its ``strerror`` says it was the
    connect that failed ("cannot connect: Connection refused"), so that every message says which server
    could not be reached. Both clients raise what this returns."""
    where = uri.socket if uri.unix else (f"[{uri.host}]:{uri.port}" if ":" in uri.host else f"{uri.host}:{uri.port}")
    code = exc.errno
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else exc.strerror or str(exc) or "timed out"
    try:
        return type(exc)(code, f"cannot connect: {reason}", where)
    except TypeError:  # a subclass with a constructor of its own
        return OSError(code, f"cannot connect: {reason}", where)
