"""NBD URIs as libnbd's connect_uri reads them and get_uri writes them (nbd_connect_uri(3)).

libnbd is stricter than a plain URI parser and says why in its own words: the scheme must be one of nbd,
nbds, nbd+unix, nbds+unix, nbd+vsock, nbds+vsock and be followed by ``://``; the handle's
``set_uri_allow_*`` settings may forbid a transport, TLS or plaintext, and the query keys that name local files
(``tls-certificates``, ``tls-psk-file``) unless allowed. A ``+unix`` URI needs ``socket=``, the others must not
have it. The user part is the TLS username; the path (without its leading ``/``, percent-decoded) the export.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ._constants import ALLOW_TRANSPORT_TCP, ALLOW_TRANSPORT_UNIX, ALLOW_TRANSPORT_VSOCK, TLS_DISABLE, TLS_REQUIRE
from ._errors import Failure
from ._settings import Settings

__all__ = ["ParsedUri", "parse_nbd_uri", "format_nbd_uri"]

_SCHEMES = {
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
    "nbd+vsock": ("vsock", False),
    "nbds+vsock": ("vsock", True),
}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_ALLOW = {"tcp": ALLOW_TRANSPORT_TCP, "unix": ALLOW_TRANSPORT_UNIX, "vsock": ALLOW_TRANSPORT_VSOCK}


@dataclass
class ParsedUri:
    transport: str
    tls: bool
    export_name: str
    host: str = "localhost"
    port: int = 10809
    socket: str = ""
    user: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    verify_peer: bool | None = None


def parse_nbd_uri(raw: str, settings: Settings) -> ParsedUri:
    """Parse ``raw`` by libnbd's rules, under the handle's ``set_uri_allow_*`` settings; Failure if refused."""
    match = _SCHEME.match(raw)
    if match is None:
        hint = ""
        if raw.startswith("/") and settings.uri_allow_transports & ALLOW_TRANSPORT_UNIX:
            hint = ': to open a local socket use "nbd+unix://?socket=PATH"'
        elif raw.lower().startswith("localhost") and settings.uri_allow_transports & ALLOW_TRANSPORT_TCP:
            hint = ': to open a local port use "nbd://localhost" or "nbd://localhost:PORT"'
        raise Failure(errno.EINVAL, "NBD URI does not have a scheme: valid NBD URIs should start with a scheme "
                                    f"like nbd://, nbds:// or nbd+unix://{hint}")  # fmt: skip
    scheme = match.group(1)
    if scheme not in _SCHEMES:
        raise Failure(errno.EINVAL, f"unknown NBD URI scheme: {scheme}")
    if not raw.startswith(scheme + "://"):
        raise Failure(errno.EINVAL, f"URI must begin with '{scheme}://'")
    transport, tls = _SCHEMES[scheme]
    if not settings.uri_allow_transports & _ALLOW[transport]:
        raise Failure(errno.EPERM, f"URI transport {scheme} is not permitted")
    if (tls and settings.uri_allow_tls == TLS_DISABLE) or (not tls and settings.uri_allow_tls == TLS_REQUIRE):
        raise Failure(errno.EPERM, f"URI TLS setting {scheme} is not permitted")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise Failure(errno.EINVAL, f"unable to parse URI: {raw}: {exc}") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    sock = query.get("socket")
    if transport == "unix" and not sock:
        raise Failure(errno.EINVAL, f'cannot parse socket parameter from NBD URI (did you mean to use "{scheme}:///'
                                    '?socket=..."?)')  # fmt: skip
    if transport != "unix" and sock is not None:
        raise Failure(errno.EINVAL, f'socket parameter is incompatible with "{scheme}:" (did you mean to use '
                                    f'"{"nbds" if tls else "nbd"}+unix:///?socket=..."?)')  # fmt: skip
    parsed = ParsedUri(transport, tls, unquote(parts.path[1:] if parts.path.startswith("/") else parts.path))
    for key in ("tls-certificates", "tls-psk-file"):
        if key in query:
            if not settings.uri_allow_local_file:
                raise Failure(errno.EPERM, f"local file access ({key}) is not allowed, call "
                                           "nbd_set_uri_allow_local_file to enable this")  # fmt: skip
            parsed.files[key] = query[key]
    if "tls-verify-peer" in query:
        parsed.verify_peer = query["tls-verify-peer"].lower() not in ("0", "false", "no", "off")
    parsed.user = unquote(parts.username) if parts.username else None
    parsed.socket = sock or ""
    parsed.host = parts.hostname or ("2" if transport == "vsock" else "localhost")
    parsed.port = port if port else 10809
    return parsed


def format_nbd_uri(settings: Settings, tls: bool, host: str | None, port: str | None, unix_path: str | None) -> str:
    """get_uri's answer: a URI that would connect back to the same place (``host``/``port`` for TCP, else
    ``unix_path``), with the export name, TLS username and the TLS files."""
    scheme = "nbds" if tls else "nbd"
    query: list[tuple[str, str]] = []
    if host is not None:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    else:
        assert unix_path is not None
        scheme += "+unix"
        authority = ""
        query.append(("socket", unix_path))
    if settings.tls_username:
        authority = quote(settings.tls_username, safe="") + "@" + authority
    if settings.tls_certificates:
        query.append(("tls-certificates", settings.tls_certificates))
    if settings.tls_psk_file:
        query.append(("tls-psk-file", settings.tls_psk_file))
    text = f"{scheme}://{authority}/{quote(settings.export_name, safe='/')}"
    if query:
        text += "?" + "&".join(f"{key}={quote(value, safe='/')}" for key, value in query)
    return text
