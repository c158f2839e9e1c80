"""Client-certificate subjects and ``--allow-client-dn`` patterns, on certificates made here for each case:
subjects written exactly as ``openssl x509 -nameopt RFC2253`` writes them (multi-valued RDNs included), and
patterns matched RDN by RDN, so that the crafted subjects of issue 34 are refused by a real server while the
honest ones are served."""

from __future__ import annotations

import datetime
import os
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

import nbdproto as n
import nbdproto.serving
import nbdproto_threads
from nbdproto.devices import MemoryDevice
from tests.conftest import require_peers
from tests.test_policy import running

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20


def _name(*rdns: list[tuple[ObjectIdentifier, str]]) -> x509.Name:
    """A name from its RDNs in the certificate's (DER) order: the most general first."""
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oid, v) for oid, v in rdn]) for rdn in rdns])


class Pki:
    """A CA made for the test, a server certificate, and client certificates with any subject."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = _name([(NameOID.COMMON_NAME, "test CA")])
        self.ca = self._certificate(self.ca_name, self.ca_key, ca=True)
        self.ca_path = self._write("ca.pem", self.ca, self.ca_key)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = self._certificate(_name([(NameOID.COMMON_NAME, "127.0.0.1")]), server_key, server=True)
        self.server_path = self._write("server.pem", server, server_key)
        self.count = 0

    def _certificate(self, subject: x509.Name, key: Any, *, ca: bool = False, server: bool = False) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            # Key identifiers: Python 3.13 verifies with VERIFY_X509_STRICT, which refuses a chain without them.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                critical=False,
            )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        return builder.sign(self.ca_key, hashes.SHA256())

    def _write(self, name: str, certificate: x509.Certificate, key: Any) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(certificate.public_bytes(serialization.Encoding.PEM))
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        return path

    def client(self, subject: x509.Name) -> str:
        """The path of a client certificate (and key) for ``subject``, signed by the CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.count += 1
        return self._write(f"client{self.count}.pem", self._certificate(subject, key), key)

    def server_context(self) -> ssl.SSLContext:
        return n.tls.server_context(certfile=self.server_path, cafile=self.ca_path, verify_client=True)

    def client_context(self, client_path: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_path)
        context.load_cert_chain(client_path)
        return context


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory(prefix="nbdproto-dn-") as directory:
        yield Pki(directory)


def _openssl_subject(path: str) -> str:
    require_peers("openssl")
    out = subprocess.run(
        ["openssl", "x509", "-in", path, "-noout", "-subject", "-nameopt", "RFC2253"],
        capture_output=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    text = out.decode("utf-8").rstrip("\n")
    assert text.startswith("subject=")
    return text[len("subject=") :]


def _peer_certificate(pki: Pki, client_path: str) -> dict[str, Any]:
    """What a server's ``getpeercert()`` gives for this client certificate: a TLS handshake in memory."""
    pipes = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]  # (incoming, outgoing) of each side
    server = pki.server_context().wrap_bio(*pipes[0], server_side=True)
    client = pki.client_context(client_path).wrap_bio(*pipes[1], server_hostname="127.0.0.1")
    for _ in range(20):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        pipes[0][0].write(pipes[1][1].read())
        pipes[1][0].write(pipes[0][1].read())
        if done == 2:
            break
    certificate = server.getpeercert()
    assert certificate
    return certificate


UNKNOWN = ObjectIdentifier("1.3.6.1.4.1.55555.1")

SUBJECTS = {
    "plain": _name(
        [(NameOID.COUNTRY_NAME, "GB")], [(NameOID.ORGANIZATION_NAME, "Example")], [(NameOID.COMMON_NAME, "a")]
    ),
    "specials": _name(
        [(NameOID.ORGANIZATION_NAME, 'Example, "Ltd" + <Co>; \\ =')],
        [(NameOID.ORGANIZATIONAL_UNIT_NAME, "#1 ")],
        [(NameOID.COMMON_NAME, " lead")],
    ),
    "multi-valued": _name(
        [(NameOID.ORGANIZATION_NAME, "Example")],
        [(NameOID.COMMON_NAME, "z"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "ops"), (NameOID.DOMAIN_COMPONENT, "x")],
    ),
    "non-ascii and controls": _name(
        [(NameOID.LOCALITY_NAME, "Zürich")], [(NameOID.COMMON_NAME, "東京\x01\x7f🙂")], [(NameOID.USER_ID, "é")]
    ),
    "named types": _name(
        [(NameOID.STREET_ADDRESS, "1 Road")],
        [(NameOID.EMAIL_ADDRESS, "a@example.com")],
        [(NameOID.SERIAL_NUMBER, "42")],
        [(NameOID.GIVEN_NAME, "Ann"), (NameOID.SURNAME, "Lee")],
        [(NameOID.STATE_OR_PROVINCE_NAME, "Kent")],
    ),
    "unknown type": _name([(NameOID.COMMON_NAME, "a")], [(UNKNOWN, "hello")]),
}


@pytest.mark.parametrize("case", SUBJECTS)
def test_subjects_are_written_exactly_as_openssl_writes_rfc_2253(pki: Pki, case: str) -> None:
    path = pki.client(SUBJECTS[case])
    written = n.serving.certificate_subject(_peer_certificate(pki, path))
    assert written == _openssl_subject(path)
    # ... and read back to the same RDNs, so that a pattern copied from openssl's output matches.
    subject = n.serving.subject_of(_peer_certificate(pki, path))
    assert subject is not None
    if case != "unknown type":
        assert n.serving.parse_subject(written) == subject
        assert n.serving.SubjectPattern(written).matches(subject)


def test_multi_valued_rdns_are_matched_in_openssls_order(pki: Pki) -> None:
    path = pki.client(SUBJECTS["multi-valued"])
    subject = n.serving.subject_of(_peer_certificate(pki, path))
    assert subject is not None
    written = _openssl_subject(path)
    rdn = written.split(",")[0]
    assert written == f"{rdn},O=Example" and sorted(rdn.split("+")) == ["CN=z", "DC=x", "OU=ops"]
    assert n.serving.SubjectPattern(f"{rdn},O=Example").matches(subject)
    assert n.serving.SubjectPattern(rdn.replace("=z", "=*").replace("=x", "=?") + ",O=Ex*").matches(subject)
    reversed_rdn = "+".join(reversed(rdn.split("+")))
    assert not n.serving.SubjectPattern(f"{reversed_rdn},O=Example").matches(subject)
    assert not n.serving.SubjectPattern("CN=z,O=Example").matches(subject)  # one attribute of three


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("CN=*,O=Example", "CN=backup,O=Example", True),
        ("CN=*,O=Example", "CN=attacker\\,O=Example", False),  # one CN holding a comma
        ("CN=*,O=Example", "CN=a,OU=b,O=Example", False),  # * never spans an RDN
        ("CN=*,O=Example", "CN=a+UID=b,O=Example", False),  # ... nor an attribute
        ("CN=*.example.com,O=Example", "CN=host.example.com,O=Example", True),
        ("CN=*.example.com,O=Example", "CN=attacker,OU=z.example.com,O=Example", False),
        ("CN=a\\,b,O=X", "CN=a\\,b,O=X", True),
        ("CN=a\\*,O=X", "CN=ab,O=X", False),  # an escaped * is a star
        ("CN=a\\*,O=X", "CN=a*,O=X", True),
        ("CN=[ab]?,O=X", "CN=bz,O=X", True),
        ("cn=a,O=X", "CN=a,O=X", False),  # types as OpenSSL spells them
        ("CN=\\C3\\A9*", "CN=\\C3\\A9t\\C3\\A9", True),  # as openssl prints UTF-8
        ("CN=é*", "CN=\\C3\\A9t\\C3\\A9", True),
        ("CN=a", "CN=a\\0A", False),
    ],
)
def test_patterns_match_attribute_by_attribute(pattern: str, subject: str, expected: bool) -> None:
    assert n.serving.SubjectPattern(pattern).matches(n.serving.parse_subject(subject)) is expected


@pytest.mark.parametrize("pattern", ["*", "CN=a,*", "CN=a,,O=b", "=a", "CN=a\\"])
def test_a_pattern_that_is_not_one_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        n.ConnectionPolicy(allow_client_dn=[pattern])


CRAFTED = {
    # issue 34: one CN that contains ",O=Example" and no O at all
    "CN=*,O=Example": _name([(NameOID.COMMON_NAME, "attacker,O=Example")]),
    # issue 34: the suffix ".example.com" in an OU, not in the CN
    "CN=*.example.com,O=Example": _name(
        [(NameOID.ORGANIZATION_NAME, "Example")],
        [(NameOID.ORGANIZATIONAL_UNIT_NAME, "z.example.com")],
        [(NameOID.COMMON_NAME, "attacker")],
    ),
}
HONEST = {
    "CN=*,O=Example": _name([(NameOID.ORGANIZATION_NAME, "Example")], [(NameOID.COMMON_NAME, "backup")]),
    "CN=*.example.com,O=Example": _name(
        [(NameOID.ORGANIZATION_NAME, "Example")], [(NameOID.COMMON_NAME, "host.example.com")]
    ),
}


def _served(backend: str, pki: Pki, pattern: str, client_path: str) -> bool:
    policy = n.ConnectionPolicy(allow_client_dn=[pattern])
    exports = {"": n.ExportSpec(MemoryDevice(MIB))}
    with running(backend, policy, exports, tls=pki.server_context()) as server:
        try:
            client = nbdproto_threads.connect(server.uri, tls=pki.client_context(client_path), timeout=10)
        except (ConnectionError, ssl.SSLError, n.ProtocolError, OSError):
            return False
        with client:
            return client.export.size == MIB


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
@pytest.mark.parametrize("pattern", list(CRAFTED))
def test_the_crafted_subjects_are_refused_and_the_honest_ones_served(backend: str, pki: Pki, pattern: str) -> None:
    crafted, honest = pki.client(CRAFTED[pattern]), pki.client(HONEST[pattern])
    assert not _served(backend, pki, pattern, crafted), _openssl_subject(crafted)
    assert _served(backend, pki, pattern, honest), _openssl_subject(honest)


def test_a_multi_valued_rdn_is_served_in_openssls_order(pki: Pki) -> None:
    path = pki.client(SUBJECTS["multi-valued"])
    written = _openssl_subject(path)
    rdn = written.split(",")[0]
    assert _served("threads", pki, written, path)
    assert not _served("threads", pki, "+".join(reversed(rdn.split("+"))) + ",O=Example", path)
