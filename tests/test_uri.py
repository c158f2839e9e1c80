"""NBD URIs, with the examples of doc/uri.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdproto.client._uri import NbdUri, format_uri, parse_uri


@pytest.mark.parametrize(
    ("uri", "export_name"),
    [
        ("nbd://example.com/disk", "disk"),
        ("nbd+unix:///disk?socket=sock", "disk"),
        ("nbd://example.com/", ""),
        ("nbd://example.com", ""),
        ("nbd://example.com//disk", "/disk"),
        ("nbd://example.com/hello%20world", "hello world"),
    ],
)
def test_export_names_from_the_uri_spec(uri: str, export_name: str) -> None:
    assert parse_uri(uri).export_name == export_name


def test_tcp_uris() -> None:
    assert parse_uri("nbd://example.com/d") == NbdUri("d", host="example.com", port=10809)
    assert parse_uri("nbds://127.0.0.1:1234/d") == NbdUri("d", tls=True, host="127.0.0.1", port=1234)
    six = parse_uri("nbd://[::1]:99/")
    assert (six.host, six.port) == ("::1", 99)
    assert str(six) == "nbd://[::1]:99/"


def test_unix_uris_need_a_socket() -> None:
    uri = parse_uri("nbds+unix:///e?socket=/run/nbd.sock&tls-hostname=srv")
    assert (uri.unix, uri.tls, uri.socket, uri.tls_hostname) == (True, True, "/run/nbd.sock", "srv")
    with pytest.raises(ValueError, match="socket"):
        parse_uri("nbd+unix:///e")


@pytest.mark.parametrize("bad", ["http://x/", "nbd://x:99999/", "nbd://x:port/", "x"])
def test_bad_uris_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_uri(bad)


def test_tls_verify_peer_defaults_on() -> None:
    assert parse_uri("nbds://h/").tls_verify_peer
    assert not parse_uri("nbds://h/?tls-verify-peer=0").tls_verify_peer


def test_the_tls_keys_of_libnbd_and_qemu() -> None:
    uri = parse_uri("nbds://alice@h:99/d?tls-psk-file=/k/keys.psk&tls-certificates=/pki&tls-hostname=n.example")
    assert (uri.user, uri.tls_username, uri.host, uri.port) == ("alice", "alice", "h", 99)
    assert (uri.tls_psk_file, uri.tls_certificates, uri.tls_hostname) == ("/k/keys.psk", "/pki", "n.example")
    assert str(uri) == "nbds://alice@h:99/d?tls-psk-file=/k/keys.psk&tls-certificates=/pki&tls-hostname=n.example"
    unix = parse_uri("nbds+unix://bob@/d?socket=/s&tls-psk-file=k")
    assert (unix.tls_username, unix.socket, unix.tls_psk_file, unix.tls_hostname) == ("bob", "/s", "k", None)
    assert str(unix) == "nbds+unix://bob@/d?socket=/s&tls-psk-file=k"
    plain = parse_uri("nbds://h/")
    assert (plain.tls_username, plain.tls_psk_file, plain.tls_certificates) == (None, None, None)
    assert parse_uri("nbds://a%40b%3Ac@h/").user == "a@b:c"
    for off in ("0", "false", "no", "off", "FALSE"):
        assert not parse_uri(f"nbds://h/?tls-verify-peer={off}").tls_verify_peer


@given(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30),
    st.booleans(),
    st.booleans(),
    st.integers(1, 65535),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=10),
)
def test_format_then_parse_round_trips(name: str, tls: bool, unix: bool, port: int, user: str) -> None:
    uri = (
        NbdUri(name, tls, unix, socket="/tmp/s 1.sock", user=user)
        if unix
        else NbdUri(name, tls, False, "10.0.0.1", port, user=user)
    )
    assert parse_uri(format_uri(uri)) == uri


def test_plan_connection_from_a_uri_or_from_parts() -> None:
    from nbdproto.client import plan_connection

    target, plan = plan_connection("nbds+unix:///disk?socket=/run/nbd.sock", {})
    assert (target.unix, target.socket, plan.export_name) == (True, "/run/nbd.sock", "disk")
    assert plan.tls and plan.require_tls  # an nbds URI requires TLS; the backend makes a default context
    target, plan = plan_connection("nbds://h/d", {"require_tls": False})
    assert not plan.tls and not plan.require_tls
    options = {"host": "h", "port": 1234, "export_name": "e", "tls": object(), "meta_contexts": ()}
    target, plan = plan_connection(None, options)
    assert (target.host, target.port, plan.export_name) == ("h", 1234, "e")
    assert plan.tls and not plan.require_tls and plan.meta_contexts == ()
    _, plan = plan_connection("nbd://h/", {}, list_exports=True)
    assert plan.list_exports and not plan.tls
