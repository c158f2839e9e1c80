"""Who a server serves: what it knows of each client, and the connection policy both servers apply.

A server started by another program is often told whom to serve: one client and then exit (qemu-nbd without
``--persistent``), at most N at a time (nbdkit's limit filter), only some addresses (nbdkit's ip filter), only
certificates with some subjects (qemu's ``tls-authz``). ``ConnectionPolicy`` holds those rules and answers each
question with the reason for a refusal, or None; ``ServerCore`` keeps the count of clients admitted and asks it
as each connection is accepted (before anything is sent: a refused client sees the connection closed before
the greeting) and again after the TLS upgrade (a certificate whose subject is not allowed ends the connection
there). Nothing here touches a socket: the backends describe each client as a ``ClientInfo``.

``ClientInfo`` is what a session knows of its client: its address, and once TLS is up, the subject of the
certificate it presented and the pre-shared key identity it used. The connection log names the credentials with
the export the client uses, and an export resolver that takes a second argument is given it.

``ClientCount`` is where a server keeps its counts when they are not its own alone: ``nbdproto serve --workers``
runs several processes on one listening socket, and ``--max-connections`` must count the clients of all of
them, exactly (an implementation over shared memory is ``nbdproto.sockets.SharedClientCount``).
"""

from __future__ import annotations

import ipaddress
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._subject import Subject, SubjectPattern, parse_subject, subject_of, write_subject

__all__ = ["ClientInfo", "ConnectionPolicy", "ClientRefused", "ClientCount", "certificate_subject", "takes_client"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientInfo:
    """One client as a server session knows it.

    ``address``: how logs name it ("127.0.0.1:40000", "[::1]:40000", "unix"); ``ip``: its IP address without
    the port (None on a unix socket, or where the backend cannot tell); ``unix``: whether it came over a unix
    socket. Set by the session once TLS is up: ``certificate_subject`` (the verified client certificate's
    subject as OpenSSL's RFC 2253 form writes it, e.g. "CN=backup.example.com,O=Example"), ``certificate_name``
    (the same as RDNs) and ``psk_identity`` (the pre-shared key identity it authenticated with). Compared by
    identity: a server counts the clients it admitted in a set.
    """

    __slots__ = ("address", "ip", "unix", "certificate_subject", "certificate_name", "psk_identity")

    def __init__(self, address: str = "?", ip: str | None = None, *, unix: bool = False) -> None:
        self.address = address
        self.ip = ip
        self.unix = unix
        self.certificate_subject: str | None = None
        self.certificate_name: Subject | None = None
        """The same subject as its RDNs (nbdproto.serving.subject_of), which ``--allow-client-dn`` patterns match."""
        self.psk_identity: str | None = None

    @property
    def credentials(self) -> str:
        """How the client authenticated, for a log line: "" (plaintext, or TLS without a client identity),
        "certificate 'CN=...'", "PSK identity 'alice'"."""
        if self.psk_identity is not None:
            return f"PSK identity {self.psk_identity!r}"
        if self.certificate_subject is not None:
            return f"certificate {self.certificate_subject!r}"
        return ""

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        extra = f", {self.credentials}" if self.credentials else ""
        return f"ClientInfo({self.address!r}{extra})"


class ClientRefused(Exception):
    """The connection policy turned a client away during its handshake (``reason`` says why): the session
    ends, and the server logs a refusal rather than a failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ConnectionPolicy:
    """Which clients a server serves (the default: every one, any number, for as long as it runs).

    - ``oneshot``: serve one client, then stop (further clients are refused meanwhile).
    - ``max_connections``: at most this many clients at a time (0: no limit); more are refused, and admitted
      again once one leaves.
    - ``allow_addresses``: networks (CIDR: "192.0.2.0/24", "::1", "10.1.2.3") TCP clients must come from;
      empty: any. Clients on a unix socket are not subject to it: the socket's file permissions guard them.
      An IPv4 client on an IPv6 socket (::ffff:192.0.2.1) counts as its IPv4 address.
    - ``allow_client_dn``: patterns the subject of a client certificate must match, one of them at least
      (nbdproto.serving.SubjectPattern: RDN by RDN, attribute by attribute, each type and value a glob that never
      crosses into the next, written as OpenSSL's RFC 2253 form writes subjects, most specific first:
      "CN=*.example.com,OU=Storage,O=Example"; docs/howto/tls.md); empty: any certificate the server's CA
      verified. A client that authenticated with a pre-shared key (its identity is in the key file) or sent no
      certificate is not checked here: the TLS context decides whether it needs one (``--tls-verify-client``).

    Raises ValueError for a network that is not one, a pattern that is not one, or a negative limit.
    """

    oneshot: bool = False
    max_connections: int = 0
    allow_addresses: Sequence[str] = ()
    allow_client_dn: Sequence[str] = ()
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    _dn_patterns: tuple[SubjectPattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_connections < 0:
            raise ValueError(f"max_connections {self.max_connections} must be 0 (no limit) or more")
        networks = [_network(text) for text in self.allow_addresses]
        patterns = []
        for text in self.allow_client_dn:
            try:
                patterns.append(SubjectPattern(text))
            except ValueError as exc:
                raise ValueError(f"client DN pattern {exc}") from None
        object.__setattr__(self, "allow_addresses", tuple(self.allow_addresses))
        object.__setattr__(self, "allow_client_dn", tuple(self.allow_client_dn))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_dn_patterns", tuple(patterns))

    def refusal(self, client: ClientInfo, *, open_connections: int, admitted: int) -> str | None:
        """Why a newly accepted ``client`` is refused, or None to serve it. ``open_connections``: clients
        being served now; ``admitted``: clients admitted since the server started."""
        if self._networks and not client.unix:
            if client.ip is None:
                return "its address is unknown, and only some addresses are allowed"
            if not self.address_allowed(client.ip):
                return f"address {client.ip} is not among the allowed ones"
        if self.oneshot and admitted:
            return "this server serves one client only (oneshot)"
        if self.max_connections and open_connections >= self.max_connections:
            return f"too many connections (at most {self.max_connections} at a time)"
        return None

    def address_allowed(self, ip: str) -> bool:
        """Whether ``ip`` is in one of ``allow_addresses`` (True when there are none)."""
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])  # a link-local address may carry its zone
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def certificate_refusal(self, client: ClientInfo) -> str | None:
        """Why ``client`` is refused after its TLS handshake, or None (see ``allow_client_dn``)."""
        subject = client.certificate_subject
        if not self.allow_client_dn or subject is None or client.psk_identity is not None:
            return None
        name = client.certificate_name
        if name is None:  # a subject set by hand, as a string: read back as RDNs
            try:
                name = parse_subject(subject)
            except ValueError:
                return f"certificate subject {subject!r} cannot be read as RDNs"
        if any(pattern.matches(name) for pattern in self._dn_patterns):
            return None
        return f"certificate subject {subject!r} matches no allowed pattern"


class ClientCount(Protocol):
    """The clients a server admitted, counted where several servers share them (processes on one listening
    socket, ``nbdproto serve --workers``). A ``ServerCore`` given one asks it, rather than its own counts, how
    many clients are open and were admitted when it applies its ``ConnectionPolicy``, and numbers its
    connections from it (``nbdproto.serving.current_connection``), so that numbers in logs are unique server-wide.
    Thread-safe."""

    def enter(self, refusal: Callable[[int, int], str | None]) -> str | None:
        """Admit a client unless ``refusal(open_connections, admitted)``, asked with the counts of every
        sharer at this instant and atomically with the admission (no other sharer admits in between), gives
        a reason; the reason, or None once the client is counted in (it must leave() later)."""
        ...

    def leave(self) -> None:
        """A client admitted by ``enter`` has gone."""
        ...

    def number(self) -> int:
        """A connection number (from 1) no other connection of any sharer got."""
        ...

    def busier(self) -> bool:
        """Whether another sharer serves fewer connections than this one, and so should take the next (a moment's
        picture: it balances, it does not decide who is served)."""
        ...


def certificate_subject(certificate: Mapping[str, Any]) -> str | None:
    """The subject of a certificate as ``ssl.SSLSocket.getpeercert()`` gives it, written exactly as OpenSSL's
    RFC 2253 form writes it (``openssl x509 -noout -subject -nameopt RFC2253``; nbdproto/serving/_subject.py):
    the most specific name first, "CN=client,O=Example"; None when the certificate has no subject (an empty
    dict: none was presented or verified)."""
    subject = subject_of(certificate)
    return write_subject(subject) if subject is not None else None


def _network(text: str) -> IPNetwork:
    """An ``allow_addresses`` entry as a network; an IPv4-mapped IPv6 one (::ffff:192.0.2.1, ::ffff:10.0.0.0/104)
    as the IPv4 network it maps, since clients' IPv4-mapped addresses are compared as IPv4 ones."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an address or network (examples: 192.0.2.0/24, ::1)") from None
    # A mapped network address means a prefix of /96 or longer: a shorter one clears a bit of its ffff.
    if isinstance(network, ipaddress.IPv6Network) and (mapped := network.network_address.ipv4_mapped) is not None:
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def takes_client(resolver: Callable[..., Any]) -> bool:
    """Whether an export resolver wants the client as its second argument: it cannot be called with the name
    alone, and can with the name and a ClientInfo (``def resolve(name, client)``). ``dict.get`` and
    ``def resolve(name)`` take the name alone."""
    if isinstance(resolver, types.BuiltinMethodType):  # a mapping's get: the name alone
        return False
    import inspect  # costly to import, and needed only by servers with a resolver of their own

    try:
        signature = inspect.signature(resolver)
    except (TypeError, ValueError):  # some builtins have no signature: they are called as they always were
        return False
    try:
        signature.bind("")
    except TypeError:
        pass
    else:
        return False
    try:
        signature.bind("", None)
    except TypeError:
        return False
    return True
