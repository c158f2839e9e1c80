"""nbdproto.tls on every Python: psktool key files, the URI's TLS keys turned into client contexts (used by the
clients through the URI alone), and the one-line error for pre-shared keys below Python 3.13.

The handshakes with pre-shared keys themselves are in test_psk.py (Python 3.13+).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from typing import Any

import anyio
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

import nbdproto
import nbdproto_anyio as na
import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from nbdproto.tls import (
    MAX_IDENTITY_LENGTH,
    MAX_KEY_LENGTH,
    MAX_PSK_FILE_SIZE,
    PskFileError,
    PskUnavailableError,
    client_context,
    parse_psk_keys,
    read_psk_file,
)
from tests.conftest import PEER_ENV
from tests.serving import Export, make_pki, serve_exports

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20
OLD_PYTHON = pytest.mark.skipif(
    sys.version_info >= (3, 13), reason="checks the error below Python 3.13; this Python has TLS-PSK (test_psk.py)"
)


# --- Key files ------------------------------------------------------------------------------------------------


def test_several_identities_comments_blank_lines_and_line_endings() -> None:
    text = (
        "# made with psktool -u alice -p keys.psk\n"
        "alice:00112233445566778899AABBCCDDEEFF\r\n"
        "\n"
        "   \t\n"
        "bob:0a0b \n"
        "carol:ff"  # no final newline
    )
    assert parse_psk_keys(text) == {
        "alice": bytes.fromhex("00112233445566778899aabbccddeeff"),
        "bob": b"\x0a\x0b",
        "carol": b"\xff",
    }


def test_the_identity_is_everything_before_the_first_colon() -> None:
    # GnuTLS, libnbd and qemu all split at the first ':'; an identity keeps its spaces.
    assert parse_psk_keys(" spaced name :abcd") == {" spaced name ": b"\xab\xcd"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice:00\nbob\n", "line 2: expected IDENTITY:HEXKEY, but there is no ':'"),
        ("# c\n:0011\n", "line 2: no identity before the ':'"),
        ("alice:\n", "line 1: identity 'alice' has no key"),
        ("alice:001\n", "line 1: the key of 'alice' has an odd number of hex digits (3)"),
        ("alice:00zz\n", "line 1: the key of 'alice' is not hexadecimal ('z' at position 3 of the key)"),
        ("alice:00\nbob:11\nalice:22\n", "line 3: identity 'alice' is already given on line 1"),
        ("alice:00 11\n", "not hexadecimal (' ' at position 3"),
        (f"alice:{'00' * (MAX_KEY_LENGTH + 1)}\n", f"is {MAX_KEY_LENGTH + 1} bytes; at most {MAX_KEY_LENGTH} work"),
        (f"{'a' * (MAX_IDENTITY_LENGTH + 1)}:00\n", f"longer than {MAX_IDENTITY_LENGTH} bytes"),
        (b"\xff\xfe:00\n", "line 1: the identity is not UTF-8"),
        ("", "no IDENTITY:HEXKEY line"),
        ("# only a comment\n\n", "no IDENTITY:HEXKEY line"),
    ],
)
def test_a_bad_key_file_names_the_line_and_the_fault(text: str | bytes, message: str) -> None:
    with pytest.raises(PskFileError) as caught:
        parse_psk_keys(text, "keys.psk")
    assert str(caught.value).startswith("keys.psk")
    assert message in str(caught.value)


def test_the_longest_identity_and_key_are_accepted() -> None:
    keys = parse_psk_keys(f"{'i' * MAX_IDENTITY_LENGTH}:{'ab' * MAX_KEY_LENGTH}")
    assert keys == {"i" * MAX_IDENTITY_LENGTH: b"\xab" * MAX_KEY_LENGTH}


def test_reading_key_files(tmp_path: Any) -> None:
    path = tmp_path / "keys.psk"
    path.write_text("alice:0011\n")
    assert read_psk_file(path) == {"alice": b"\x00\x11"}
    with pytest.raises(FileNotFoundError):
        read_psk_file(tmp_path / "missing.psk")
    path.write_bytes(b"a" * (MAX_PSK_FILE_SIZE + 1))
    with pytest.raises(PskFileError, match="larger than"):
        read_psk_file(path)  # refused after reading at most one byte past the limit


identities = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=":#"), min_size=1,
                     max_size=40).filter(lambda s: s.strip() != "")  # fmt: skip


@given(st.dictionaries(identities, st.binary(min_size=1, max_size=64), min_size=1, max_size=8), st.booleans())
def test_key_files_round_trip(keys: dict[str, bytes], upper: bool) -> None:
    lines = [f"{identity}:{key.hex().upper() if upper else key.hex()}" for identity, key in keys.items()]
    assert parse_psk_keys("\n".join(lines) + "\n") == keys


# --- Client contexts from URIs --------------------------------------------------------------------------------


def _key_file(tmp_path: Any, text: str = "alice:00112233\n") -> str:
    path = tmp_path / "keys.psk"
    path.write_text(text)
    return str(path)


def test_a_psk_uri_looks_the_identity_up_in_the_key_file(tmp_path: Any, monkeypatch: Any) -> None:
    keys = _key_file(tmp_path)
    with pytest.raises(PskFileError, match=r"no key for identity 'bob', the URI's user"):
        client_context(f"nbds://bob@h/?tls-psk-file={keys}")
    monkeypatch.setenv("LOGNAME", "dave")  # libnbd's default identity is the login name
    with pytest.raises(PskFileError, match=r"no key for identity 'dave', the login name"):
        client_context(f"nbds://h/?tls-psk-file={keys}")
    with pytest.raises(FileNotFoundError):
        client_context(f"nbds://alice@h/?tls-psk-file={tmp_path}/nothing.psk")


def test_a_key_and_certificates_are_not_combined(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="pre-shared key or with certificates, not both"):
        client_context(f"nbds://alice@h/?tls-psk-file={_key_file(tmp_path)}", cafile="ca.pem")


@OLD_PYTHON
def test_below_python_3_13_a_psk_is_a_one_line_error_naming_the_version(tmp_path: Any) -> None:
    keys = _key_file(tmp_path)
    with pytest.raises(PskUnavailableError, match=r"needs Python 3\.13 or newer \(this is Python 3\.1\d\.\d+\)"):
        client_context(f"nbds://alice@h/?tls-psk-file={keys}")
    with pytest.raises(PskUnavailableError, match=r"3\.13"):
        nt.connect(f"nbds://alice@127.0.0.1:1/?tls-psk-file={keys}")  # before any connection is tried
    from nbdproto.tls import server_context

    with pytest.raises(PskUnavailableError, match=r"3\.13"):
        server_context(psk=keys)
    cli = [sys.executable, "-m", "nbdproto"]
    for args, status in (
        (["serve", "--port", "0", "--tls", "require", "--tls-psk", keys], 1),  # a usage error: 1, as nbdkit
        (["info", f"nbds://alice@127.0.0.1:1/?tls-psk-file={keys}"], 1),
        (["copy", f"nbds://alice@127.0.0.1:1/?tls-psk-file={keys}", "null:"], 1),
    ):
        result = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60, env=PEER_ENV)
        assert result.returncode == status
        (line,) = result.stderr.splitlines()
        assert "needs Python 3.13 or newer" in line, line


def test_tls_certificates_directory_through_the_uri_alone(tmp_path: Any) -> None:
    """``tls-certificates=DIR``: ca-cert.pem verifies the server and client-cert.pem/client-key.pem prove who
    we are to a server that requires it; the clients read the directory without being given a context."""
    with make_pki(verify_client=True) as pki:
        with serve_exports("threads", {"disk": Export(MemoryDevice(MIB))}, tls=pki.server_context) as base:
            uri = base.format("disk") + f"?tls-certificates={pki.directory}"
            with nt.connect(uri) as client:
                assert client.engine.tls_active and client.size == MIB
            assert [e.name for e in nt.list_exports(uri)] == ["disk"]

            async def with_anyio() -> int:
                async with await na.connect(uri) as client:
                    return client.size

            assert anyio.run(with_anyio) == MIB
            assert [e.name for e in anyio.run(na.list_exports, uri)] == ["disk"]
            os.rename(os.path.join(pki.directory, "client-key.pem"), os.path.join(pki.directory, "gone.pem"))
            with pytest.raises((ssl.SSLError, ConnectionError)):
                nt.connect(uri)  # no client certificate now: the server refuses us
        os.remove(os.path.join(pki.directory, "ca-cert.pem"))
        with pytest.raises(FileNotFoundError, match=r"has no ca-cert\.pem"):
            client_context(uri)


def test_tls_verify_peer_false_and_tls_hostname(tmp_path: Any) -> None:
    stranger = trustme.CA().issue_cert("127.0.0.1", "nbd.example")  # signed by a CA no one trusts
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger.configure_cert(server)
    with serve_exports("asyncio", {"disk": Export(MemoryDevice(MIB))}, tls=server) as base:
        uri = base.format("disk")
        with pytest.raises(ssl.SSLCertVerificationError):
            nt.connect(uri)  # the system's CAs do not know it
        with nt.connect(uri + "?tls-verify-peer=false") as client:
            assert client.engine.tls_active
    with make_pki() as pki, serve_exports("trio", {"disk": Export(MemoryDevice(MIB))}, tls=pki.server_context) as base:
        uri = base.format("disk") + f"?tls-certificates={pki.directory}"
        with nt.connect(uri + "&tls-hostname=localhost") as client:  # the certificate names localhost too
            assert client.engine.tls_active
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            nt.connect(uri + "&tls-hostname=elsewhere.example")


def test_the_cli_flags_add_to_the_uri(tmp_path: Any) -> None:
    with make_pki() as pki:
        context = client_context(
            f"nbds://h/?tls-certificates={pki.directory}", cafile=os.path.join(pki.directory, "ca-cert.pem")
        )
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        unix = client_context(f"nbds+unix:///?socket=/s&tls-certificates={pki.directory}")
        assert unix.verify_mode == ssl.CERT_REQUIRED and not unix.check_hostname  # no name to check, as libnbd
        assert client_context("nbds://h/?tls-verify-peer=false").verify_mode == ssl.CERT_NONE


def test_nbdproto_tls_is_not_part_of_import_nbdproto() -> None:
    probe = "import sys, nbdproto; print('nbdproto.tls' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
    assert nbdproto.parse_uri("nbds://alice@h/").tls_username == "alice"
