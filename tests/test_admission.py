"""Who a server serves, alone (nbdproto.serving._admission): ConnectionPolicy's answers and their words,
ClientInfo as logs show it, certificate subjects as RFC 4514 writes them, and which resolvers take the client.
tests/test_policy.py shows the same policy kept by servers of every backend."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest

import nbdproto as n
import nbdproto.serving
from nbdproto.serving._admission import certificate_subject, takes_client

Policy, Client = n.ConnectionPolicy, n.ClientInfo


def client(ip: str | None = "192.0.2.7", *, unix: bool = False) -> n.ClientInfo:
    return Client("unix" if unix else f"{ip}:40000", ip, unix=unix)


def test_the_default_policy_serves_everyone() -> None:
    policy = Policy()
    assert (policy.oneshot, policy.max_connections, policy.allow_addresses, policy.allow_client_dn) == (
        False, 0, (), ()
    )  # fmt: skip
    assert policy.refusal(client(), open_connections=1000, admitted=10**6) is None
    assert policy.refusal(client(None), open_connections=0, admitted=0) is None
    assert policy.address_allowed("203.0.113.1") and policy.address_allowed("not an address")


def test_a_policy_is_frozen_and_compares_by_its_rules() -> None:
    policy = Policy(max_connections=2, allow_addresses=["10.0.0.0/8"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.oneshot = True  # type: ignore[misc]
    assert policy.allow_addresses == ("10.0.0.0/8",) and isinstance(policy.allow_client_dn, tuple)
    assert Policy(allow_client_dn=["CN=*"]).allow_client_dn == ("CN=*",)  # kept as given, as a tuple
    assert policy == Policy(max_connections=2, allow_addresses=("10.0.0.0/8",))
    assert Policy(allow_client_dn=["CN=a"]) == Policy(allow_client_dn=("CN=a",))  # not by the patterns made of them
    assert Policy(allow_client_dn=["CN=a"]) != Policy(allow_client_dn=["CN=b"])


def test_a_policy_shows_its_rules_alone() -> None:
    policy = Policy(max_connections=2, allow_addresses=["10.0.0.0/8"], allow_client_dn=["CN=a"])
    assert repr(policy) == (
        "ConnectionPolicy(oneshot=False, max_connections=2, allow_addresses=('10.0.0.0/8',), allow_client_dn=('CN=a',))"
    )  # neither the networks nor the patterns made of the rules


def test_oneshot_serves_the_first_client_only() -> None:
    policy = Policy(oneshot=True)
    assert policy.refusal(client(), open_connections=0, admitted=0) is None
    assert policy.refusal(client(), open_connections=0, admitted=1) == "this server serves one client only (oneshot)"


def test_max_connections_refuses_at_the_limit_and_admits_below_it() -> None:
    policy = Policy(max_connections=2)
    assert policy.refusal(client(), open_connections=1, admitted=50) is None
    assert policy.refusal(client(), open_connections=2, admitted=50) == "too many connections (at most 2 at a time)"
    assert policy.refusal(client(), open_connections=3, admitted=50) == "too many connections (at most 2 at a time)"


@pytest.mark.parametrize("limit", [-1, -10])
def test_a_negative_limit_is_refused(limit: int) -> None:
    with pytest.raises(ValueError) as refused:
        Policy(max_connections=limit)
    assert str(refused.value) == f"max_connections {limit} must be 0 (no limit) or more"


@pytest.mark.parametrize("text", ["10.0.0.0/33", "nowhere", "::1/129", ""])
def test_an_address_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        Policy(allow_addresses=[text])
    assert str(refused.value) == f"{text!r} is not an address or network (examples: 192.0.2.0/24, ::1)"


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("192.0.2.7", True),
        ("192.0.2.255", True),
        ("192.0.3.1", False),
        ("::ffff:192.0.2.9", True),  # an IPv4 client on an IPv6 socket counts as its IPv4 address
        ("::ffff:198.51.100.1", False),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("fe80::1%eth0", True),  # a link-local address with its zone
        ("10.1.2.3", True),  # " 10.1.2.3 " is allowed, its spaces aside
        ("10.1.2.4", False),
        ("no address", False),
    ],
)
def test_allowed_addresses(ip: str, allowed: bool) -> None:
    policy = Policy(allow_addresses=["192.0.2.0/24", "2001:db8::/32", "fe80::/10", " 10.1.2.3 "])
    assert policy.address_allowed(ip) == allowed
    expected = None if allowed else f"address {ip} is not among the allowed ones"
    assert policy.refusal(client(ip), open_connections=0, admitted=0) == expected


@pytest.mark.parametrize(
    ("network", "inside", "outside"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1", "192.0.2.2"),
        ("::ffff:10.0.0.0/104", "10.255.0.1", "11.0.0.1"),
        ("::ffff:0.0.0.0/96", "203.0.113.9", None),  # /96: every IPv4 address
        ("::ffff:128.0.0.0/97", "203.0.113.9", "10.0.0.1"),  # /97: half of them
    ],
)
def test_an_ipv4_mapped_network_is_the_ipv4_network_it_maps(network: str, inside: str, outside: str | None) -> None:
    """Clients' IPv4-mapped addresses are compared as IPv4 ones, so an IPv4-mapped network is too, at every
    prefix from /96 (the whole IPv4 space) down."""
    policy = Policy(allow_addresses=[network])
    assert policy.address_allowed(inside) and policy.address_allowed(f"::ffff:{inside}")
    if outside is not None:
        assert not policy.address_allowed(outside) and not policy.address_allowed(f"::ffff:{outside}")
    assert not policy.address_allowed("2001:db8::1")


def test_an_ipv6_network_shorter_than_96_bits_is_kept_as_it_is() -> None:
    policy = Policy(allow_addresses=["::ffff:0:0/95"])  # ::fffe:0:0 to ::ffff:ffff:ffff
    assert policy.address_allowed("::fffe:1:2")
    assert not policy.address_allowed("192.0.2.1")  # an IPv4 client is compared as IPv4: not in an IPv6 network


def test_a_network_given_by_a_host_address_inside_it() -> None:
    assert Policy(allow_addresses=["192.0.2.7/24"]).address_allowed("192.0.2.200")  # not strict


def test_allowed_addresses_bind_tcp_clients_only() -> None:
    policy = Policy(allow_addresses=["192.0.2.0/24"])
    assert policy.refusal(client(None, unix=True), open_connections=0, admitted=0) is None
    assert policy.refusal(client(None), open_connections=0, admitted=0) == (
        "its address is unknown, and only some addresses are allowed"
    )


def test_the_address_is_checked_before_the_counts() -> None:
    policy = Policy(oneshot=True, max_connections=1, allow_addresses=["10.0.0.0/8"])
    assert policy.refusal(client(), open_connections=5, admitted=5) == "address 192.0.2.7 is not among the allowed ones"
    assert policy.refusal(client("10.0.0.1"), open_connections=5, admitted=5) == (
        "this server serves one client only (oneshot)"
    )
    assert policy.refusal(client("10.0.0.1"), open_connections=5, admitted=0) == (
        "too many connections (at most 1 at a time)"
    )


def _tls_client(subject: str | None, psk: str | None = None) -> n.ClientInfo:
    info = client()
    info.certificate_subject = subject
    info.psk_identity = psk
    return info


def test_certificate_subjects_against_patterns() -> None:
    policy = Policy(allow_client_dn=["CN=backup.example.com,O=*", "CN=?dmin,O=Example"])
    assert policy.certificate_refusal(_tls_client("CN=backup.example.com,O=Example")) is None
    assert policy.certificate_refusal(_tls_client("CN=admin,O=Example")) is None
    assert policy.certificate_refusal(_tls_client("CN=Admin,O=example")) == (
        "certificate subject 'CN=Admin,O=example' matches no allowed pattern"  # case matters
    )
    assert policy.certificate_refusal(_tls_client(None)) is None  # no certificate: the TLS context decides
    assert policy.certificate_refusal(_tls_client("CN=other", psk="alice")) is None  # a PSK client
    assert Policy().certificate_refusal(_tls_client("CN=anyone")) is None


def test_a_pattern_that_is_not_one_is_refused_in_words() -> None:
    with pytest.raises(ValueError) as refused:
        Policy(allow_client_dn=["CN=fine", "garbage"])
    assert str(refused.value) == "client DN pattern 'garbage' in 'garbage' is not TYPE=VALUE (e.g. CN=*.example.com)"


def test_patterns_match_the_certificates_rdns_and_a_subject_string_is_read_as_rdns() -> None:
    """The session sets certificate_name (the RDNs) with the subject: the patterns match those; the subject, as
    written, names the certificate in a refusal. A subject set by hand alone is read back as RDNs."""
    policy = Policy(allow_client_dn=["CN=backup,O=Example"])
    info = _tls_client("CN=backup\\,O=Example")  # one CN holding a comma, as written: not the RDNs allowed
    assert policy.certificate_refusal(info) == (
        "certificate subject 'CN=backup\\\\,O=Example' matches no allowed pattern"
    )
    info.certificate_name = nbdproto.serving.parse_subject("CN=backup,O=Example")
    assert policy.certificate_refusal(info) is None
    assert policy.certificate_refusal(_tls_client("CN=backup,")) == (
        "certificate subject 'CN=backup,' cannot be read as RDNs"
    )


def test_client_info_as_logs_show_it() -> None:
    plain = Client("192.0.2.7:40000", "192.0.2.7")
    assert (str(plain), repr(plain), plain.credentials) == ("192.0.2.7:40000", "ClientInfo('192.0.2.7:40000')", "")
    assert not plain.unix and plain.certificate_subject is None and plain.psk_identity is None
    plain.certificate_subject = "CN=client"
    assert plain.credentials == "certificate 'CN=client'"
    assert repr(plain) == "ClientInfo('192.0.2.7:40000', certificate 'CN=client')"
    plain.psk_identity = "alice"
    assert plain.credentials == "PSK identity 'alice'"  # the key it used says more than a certificate
    unix = Client("unix", unix=True)
    assert unix.unix and unix.ip is None and str(unix) == "unix"
    assert str(Client()) == "?"


def test_certificate_subjects_are_written_as_rfc_4514_does() -> None:
    """The most specific RDN first; a multi-valued RDN's attributes in the order OpenSSL writes them (the last
    first: tests/test_client_dn.py checks it against ``openssl x509 -nameopt RFC2253``)."""
    peer = {"subject": ((("countryName", "GB"),), (("organizationName", "Example, Ltd"),),
                        (("commonName", "client"), ("userId", "u1")))}  # fmt: skip
    assert certificate_subject(peer) == "UID=u1+CN=client,O=Example\\, Ltd,C=GB"
    every = [(("stateOrProvinceName", "s"),), (("localityName", "l"),), (("organizationalUnitName", "ou"),),
             (("streetAddress", "st"),), (("domainComponent", "dc"),), (("emailAddress", "e@x"),)]  # fmt: skip
    assert certificate_subject({"subject": tuple(every)}) == "emailAddress=e@x,DC=dc,street=st,OU=ou,L=l,ST=s"
    assert certificate_subject({}) is None
    assert certificate_subject({"subject": ()}) is None


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ('a"b+c,d;e<f>g\\h', 'a\\"b\\+c\\,d\\;e\\<f\\>g\\\\h'),
        ("#lead", "\\#lead"),
        (" lead", "\\ lead"),
        ("trail ", "trail\\ "),
        ("mid # dle", "mid # dle"),
        ("XX", "XX"),  # nothing else is escaped
        ("nul\x00", "nul\\00"),
        (" ", "\\ "),
    ],
)
def test_rfc_4514_escapes(value: str, written: str) -> None:
    assert certificate_subject({"subject": ((("commonName", value),),)}) == f"CN={written}"


def _name_only(name: str) -> Any:
    return name


def _name_and_client(name: str, client: Any) -> Any:
    return name, client


def _name_and_maybe_client(name: str, client: Any = None) -> Any:
    return name


def _anything(*args: Any) -> Any:
    return args


def test_which_resolvers_take_the_client() -> None:
    assert takes_client(_name_and_client)
    assert takes_client(lambda name, client: None)
    assert takes_client(functools.partial(_name_and_client))
    assert not takes_client(_name_only)
    assert not takes_client(_name_and_maybe_client)  # callable with the name alone: given the name alone
    assert not takes_client(_anything)
    assert not takes_client({}.get)
    assert not takes_client(lambda: None)  # takes neither: called as it always was, with the name
    assert not takes_client(lambda a, b, c: None)
    assert not takes_client(print)  # a builtin function: no signature needed
    assert not takes_client(dict)  # a callable with no signature at all: called with the name, as always


def test_a_refused_client_carries_its_reason() -> None:
    refused = n.serving.ClientRefused("too many connections (at most 2 at a time)")
    assert refused.reason == str(refused) == "too many connections (at most 2 at a time)"
