"""Certificate subjects as OpenSSL writes them, and the patterns ``--allow-client-dn`` takes, matched attribute
by attribute.

A subject is a sequence of RDNs (relative distinguished names), each one or more attributes (type and value).
Writing it as one string and matching a pattern against the string is unsound: the value of one attribute can
contain what looks like others (``CN=attacker\\,O=Example`` is one CN), so a ``*`` that may cross a comma
admits subjects nobody meant to. Here a subject stays a structure, ``Subject``, and a ``SubjectPattern``
matches it RDN by RDN: the same number of RDNs, each with the same number of attributes, each attribute's
type and value matched by their own glob (``*``, ``?``, ``[...]``), in order. A ``*`` never leaves the value
it is in.

The order and the spelling are OpenSSL's RFC 2253 form (``openssl x509 -noout -subject -nameopt RFC2253``),
so that a pattern can be written from what that prints: the most specific RDN first, and within a
multi-valued RDN the attributes in the reverse of their order in the certificate (OpenSSL writes every
attribute in reverse, ``DC=x+OU=\\#1+CN=z``); OpenSSL's short names (CN, O, OU, C, L, ST, street, DC, UID,
emailAddress, serialNumber, ...); values escaped as RFC 2253 asks (``,+"\\<>;`` with a backslash, ``#`` and
a space first, a space last), control characters and every byte of a non-ASCII character as ``\\XX``. An
attribute OpenSSL has no name for is written with its dotted OID and its value as ``#`` and the hex of its
DER encoding (taken to be a UTF8String: Python's ssl module hands over the decoded text only).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["Subject", "SubjectPattern", "subject_of", "write_subject", "parse_subject"]

Attribute = tuple[str, str]
"""One attribute of an RDN: its type as OpenSSL's short name (or dotted OID) and its value, unescaped."""
Subject = tuple[tuple[Attribute, ...], ...]
"""A subject's RDNs in OpenSSL's RFC 2253 order, each a tuple of attributes in OpenSSL's order."""

SHORT_NAMES = {
    "commonName": "CN",
    "surname": "SN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "street",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "givenName": "GN",
    "domainComponent": "DC",
    "userId": "UID",
    "uniqueIdentifier": "uid",
    "jurisdictionLocalityName": "jurisdictionL",
    "jurisdictionStateOrProvinceName": "jurisdictionST",
    "jurisdictionCountryName": "jurisdictionC",
    "countryCode3c": "c3",
    "countryCode3n": "n3",
}
"""OpenSSL's short name for each attribute type whose long name (what ``getpeercert()`` gives) differs; every
other type's short name is its long name (serialNumber, emailAddress, title, ...)."""

_SPECIAL = frozenset(',+"\\<>;')
_OID = re.compile(r"[0-9]+(\.[0-9]+)+")


def subject_of(certificate: Mapping[str, Any]) -> Subject | None:
    """The subject of a certificate as ``ssl.SSLSocket.getpeercert()`` gives it, in OpenSSL's order and with
    its names; None when there is none (an empty dict: no certificate was presented or verified)."""
    rdns = certificate.get("subject")
    if not rdns:
        return None
    return tuple(tuple((SHORT_NAMES.get(name, name), value) for name, value in reversed(rdn)) for rdn in reversed(rdns))


def write_subject(subject: Subject) -> str:
    """``subject`` as OpenSSL's RFC 2253 form writes it (see the module docstring)."""
    return ",".join("+".join(f"{name}={_written_value(name, value)}" for name, value in rdn) for rdn in subject)


def _written_value(name: str, value: str) -> str:
    if _OID.fullmatch(name):  # no name known to OpenSSL: dumped as DER (see the module docstring)
        return "#" + _utf8_string_der(value).hex().upper()
    out = []
    last = len(value) - 1
    for index, char in enumerate(value):
        if ord(char) > 0x7F:
            out.append("".join(f"\\{byte:02X}" for byte in char.encode("utf-8", "surrogatepass")))
        elif ord(char) < 0x20 or char == "\x7f":
            out.append(f"\\{ord(char):02X}")
        elif char in _SPECIAL or (index == 0 and char in "# ") or (index == last and char == " "):
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def _utf8_string_der(value: str) -> bytes:
    content = value.encode("utf-8", "surrogatepass")
    size = len(content)
    if size < 0x80:
        return bytes((0x0C, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x0C, 0x80 | len(length))) + length + content


def _split(text: str, separator: str) -> list[str]:
    """``text`` cut at each ``separator`` that no backslash escapes (the escapes are kept)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise ValueError(f"{text!r} ends with a lone backslash")
    parts.append("".join(current))
    return parts


def _unescape(text: str, *, glob: bool) -> str:
    """An attribute value as RFC 4514 (and OpenSSL) escape it, unescaped: ``\\,`` is a comma, ``\\C3\\A9`` the
    UTF-8 bytes of "é". With ``glob`` the result is an fnmatch pattern in which an escaped ``*``, ``?`` or
    ``[`` stands for itself."""
    out = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            out += char.encode("utf-8", "surrogatepass")
            index += 1
            continue
        pair = text[index + 1 : index + 3]
        if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
            byte = int(pair, 16)
            out += f"[{chr(byte)}]".encode() if glob and chr(byte) in "*?[" else bytes((byte,))
            index += 3
            continue
        escaped = text[index + 1]
        out += (f"[{escaped}]" if glob and escaped in "*?[" else escaped).encode("utf-8", "surrogatepass")
        index += 2
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{text!r}: its \\XX escapes are not UTF-8") from None


def _attributes(text: str, *, glob: bool) -> Subject:
    rdns = []
    for rdn_text in _split(text, ","):
        attributes = []
        for attribute in _split(rdn_text, "+"):
            name, equals, value = attribute.partition("=")
            if not equals or not name.strip():
                raise ValueError(f"{attribute.strip()!r} in {text!r} is not TYPE=VALUE (e.g. CN=*.example.com)")
            attributes.append((name.strip(), _unescape(value, glob=glob)))
        rdns.append(tuple(attributes))
    return tuple(rdns)


def parse_subject(text: str) -> Subject:
    """A subject written as OpenSSL's RFC 2253 form (or RFC 4514) back as its structure. ValueError for text
    that is not one."""
    return _attributes(text, glob=False)


class SubjectPattern:
    """A pattern a client certificate's subject must match (the syntax: module docstring, docs/howto/tls.md):
    RDNs separated by ``,``, attributes within one by ``+``, each ``TYPE=VALUE`` where TYPE and VALUE are
    globs (``*`` any run of characters, ``?`` one, ``[...]`` one of a set) escaped as RFC 4514 escapes values
    (``\\,`` a comma, ``\\+`` a plus, ``\\*`` a star). Types are OpenSSL's short names, case and all (UID is
    userId, uid uniqueIdentifier).
    ValueError for a pattern that is not one."""

    __slots__ = ("text", "_rdns")

    def __init__(self, text: str) -> None:
        self.text = text
        self._rdns = tuple(
            tuple((re.compile(fnmatch.translate(name)), re.compile(fnmatch.translate(value))) for name, value in rdn)
            for rdn in _attributes(text, glob=True)
        )

    def matches(self, subject: Subject) -> bool:
        """Whether ``subject`` (OpenSSL's order, see ``subject_of``) has exactly as many RDNs, each with as many
        attributes, and every attribute's type and value match this pattern's in the same place."""
        if len(subject) != len(self._rdns):
            return False
        for rdn, patterns in zip(subject, self._rdns, strict=True):
            if len(rdn) != len(patterns):
                return False
            for (name, value), (name_pattern, value_pattern) in zip(rdn, patterns, strict=True):
                if not name_pattern.match(name) or not value_pattern.match(value):
                    return False
        return True

    def __repr__(self) -> str:
        return f"SubjectPattern({self.text!r})"
