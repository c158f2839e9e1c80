"""TLS with pre-shared keys (Python 3.13+): handshakes on TLS 1.3 and 1.2, the identity each connection used,
refusals (wrong key, unknown identity, no authentication at all), and the real tools: nbdinfo, nbdcopy and
qemu-img against our servers, our clients against nbdkit and qemu-nbd, and ``nbdproto serve --tls-psk``.

Below Python 3.13 the ssl module has no PSK at all; test_tls_config.py checks the error given there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import trustme
from anyio.streams.tls import TLSStream

import nbdproto
import nbdproto_anyio as na
import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from nbdproto.tls import TLSAuthenticationError, psk_client_context, psk_identity, server_context
from tests.capture import nbdkit
from tests.conftest import PEER_ENV
from tests.serving import BACKENDS, Export, serve_exports
from tests.test_cli import cli_json, run_cli, serving
from tests.test_interop_client import qemu_nbd
from tests.threaded import run_threads

pytestmark = [
    pytest.mark.skipif(
        sys.version_info < (3, 13),
        reason="TLS-PSK needs Python 3.13+ (ssl.SSLContext.set_psk_*_callback); CI runs this module on 3.13",
    ),
    pytest.mark.timeout(120),
]

MIB = 1 << 20
KEYS = {"alice": bytes(range(32)), "bob": bytes(range(100, 132))}
TLS_VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


def write_keys(path: Any, keys: dict[str, bytes]) -> str:
    path.write_text("".join(f"{identity}:{key.hex()}\n" for identity, key in keys.items()))
    return str(path)


@pytest.fixture
def key_file(tmp_path: Any) -> str:
    return write_keys(tmp_path / "keys.psk", KEYS)


def client(identity: str, key: bytes, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    context = psk_client_context(identity, key)
    context.maximum_version = version
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str | None = None) -> tuple[Any, Any]:
    """Both ends of one handshake over a socket pair: (server outcome, client outcome), each the connection's
    (version, cipher, PSK identity) or the exception it raised. The client then reads, so a server that refuses
    after the handshake shows as an end of stream (b"") there."""
    ends = socket.socketpair()
    outcome: dict[str, Any] = {}

    def serve() -> None:
        try:
            conn = server.wrap_socket(ends[0], server_side=True)
            outcome["server"] = (conn.version(), conn.cipher()[0], psk_identity(conn))  # type: ignore[index]
            conn.sendall(b"!")
            conn.close()
        except (OSError, ssl.SSLError) as exc:
            outcome["server"] = exc
            ends[0].close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        ends[1].settimeout(30)
        conn = client.wrap_socket(ends[1], server_hostname=hostname)
        outcome["client"] = (conn.version(), conn.cipher()[0], conn.recv(1))  # type: ignore[index]
        conn.close()
    except (OSError, ssl.SSLError) as exc:
        outcome["client"] = exc
        ends[1].close()
    thread.join(30)
    return outcome["server"], outcome["client"]


# --- Handshakes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_the_server_learns_the_identity_on_tls13_and_tls12(version: ssl.TLSVersion, caplog: Any) -> None:
    caplog.set_level(logging.INFO, "nbdproto.tls")
    server = server_context(psk=KEYS)
    for identity in ("alice", "bob"):
        served, got = handshake(server, client(identity, KEYS[identity], version))
        expected = "TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2"
        assert served[0] == got[0] == expected and served[2] == identity and got[2] == b"!"
        if version == ssl.TLSVersion.TLSv1_2:
            assert got[1] == "ECDHE-PSK-CHACHA20-POLY1305"  # forward secret, and what GnuTLS peers pick too
        assert f"TLS-PSK identity {identity!r} ({expected}" in caplog.text


def test_concurrent_handshakes_each_learn_their_own_identity() -> None:
    server = server_context(psk=KEYS)
    names = ["alice", "bob"] * 6
    outcomes: list[Any] = [None] * len(names)

    def one(i: int) -> None:
        outcomes[i] = handshake(server, client(names[i], KEYS[names[i]]))[0]

    run_threads(one, len(names))
    assert [outcome[2] for outcome in outcomes] == names


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_a_wrong_key_and_an_unknown_identity_are_refused_alike_and_logged(version: ssl.TLSVersion, caplog: Any) -> None:
    server = server_context(psk=KEYS)
    wrong_served, wrong = handshake(server, client("alice", KEYS["bob"], version))
    unknown_served, unknown = handshake(server, client("mallory", KEYS["alice"], version))
    assert isinstance(wrong_served, ssl.SSLError) and isinstance(unknown_served, ssl.SSLError)
    # An unknown name fails exactly like a wrong key, so a client cannot probe which names exist.
    assert isinstance(wrong, ssl.SSLError) and isinstance(unknown, ssl.SSLError)
    assert wrong.reason == unknown.reason  # type: ignore[attr-defined]
    assert "TLS-PSK identity 'alice' refused: the client's key is not the one in the key file" in caplog.text
    assert "TLS-PSK identity 'mallory' refused: not in the key file" in caplog.text


def test_a_changed_key_file_counts_from_the_next_handshake(tmp_path: Any, caplog: Any) -> None:
    # As nbdkit: its GnuTLS reads the key file at every handshake (a key removed is refused at once).
    caplog.set_level(logging.INFO, "nbdproto.tls")
    path = tmp_path / "keys.psk"
    server = server_context(psk=write_keys(path, {"alice": KEYS["alice"]}))

    def change(text: str) -> None:  # a new modification time, as any later write has
        stamp = os.stat(path).st_mtime_ns
        path.write_text(text)
        os.utime(path, ns=(stamp + 10**9, stamp + 10**9))

    def accepted(identity: str) -> bool:
        served, _ = handshake(server, client(identity, KEYS[identity]))
        return not isinstance(served, Exception) and served[2] == identity

    assert accepted("alice") and not accepted("bob")
    change(f"bob:{KEYS['bob'].hex()}\n")
    assert accepted("bob") and not accepted("alice")
    assert f"TLS-PSK key file {path} changed: read again (1 identities)" in caplog.text
    change("bob:not-hex\n")  # a broken file leaves no key valid, not the last good ones
    assert not accepted("bob") and not accepted("alice")
    assert f"TLS-PSK key file {path} changed and cannot be used" in caplog.text
    path.unlink()
    assert not accepted("bob")
    write_keys(path, KEYS)
    assert accepted("alice") and accepted("bob")


@contextlib.contextmanager
def pki(tmp_path: Any) -> Iterator[tuple[str, str, ssl.SSLContext]]:
    """A CA, a server certificate for localhost and a client certificate: (server certfile, cafile, a client
    context that trusts the CA and presents the client certificate)."""
    ca = trustme.CA()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    ca.issue_cert("client.example").configure_cert(with_cert)
    yield str(tmp_path / "server.pem"), str(tmp_path / "ca.pem"), with_cert


def test_a_server_with_a_certificate_and_keys_never_serves_an_unauthenticated_client(
    tmp_path: Any, caplog: Any
) -> None:
    with pki(tmp_path) as (certfile, cafile, with_cert):
        server = server_context(psk=KEYS, certfile=certfile, cafile=cafile)
        served, got = handshake(server, client("alice", KEYS["alice"]))
        assert served == ("TLSv1.2", "ECDHE-PSK-CHACHA20-POLY1305", "alice") and got[2] == b"!"
        # Under TLS 1.3 an unknown identity would be declined and the handshake go on with the certificate;
        # here it fails.
        served, got = handshake(server, client("mallory", KEYS["alice"]))
        assert isinstance(served, ssl.SSLError) and isinstance(got, ssl.SSLError)
        # A client with no key must present a certificate the CA signed...
        without_cert = ssl.create_default_context(cafile=cafile)
        served, got = handshake(server, without_cert, "localhost")
        assert isinstance(served, ssl.SSLError) and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(served)
        served, got = handshake(server, with_cert, "localhost")
        assert served[2] is None and got[2] == b"!"  # authenticated by its certificate: no PSK identity
        # ... and even where someone loosens the context, a session with neither is refused once it completes.
        server.verify_mode = ssl.CERT_OPTIONAL
        served, got = handshake(server, without_cert, "localhost")
        assert isinstance(served, TLSAuthenticationError)
        assert isinstance(got, ssl.SSLError) or got[2] == b""  # the server hung up without serving
        assert "used neither a known pre-shared key nor a certificate" in caplog.text
        with pytest.raises(ValueError, match="needs a CA"):
            server_context(psk=KEYS, certfile=certfile)


def test_a_psk_client_never_accepts_a_server_that_declines_its_key(tmp_path: Any) -> None:
    """A server without our key may answer with a certificate under TLS 1.3; the client refuses it (it trusts
    no CA), rather than talking to a server that never proved it holds the key."""
    with pki(tmp_path) as (certfile, _, _):
        certificate_only = server_context(certfile=certfile)
        _, got = handshake(certificate_only, client("alice", KEYS["alice"]))
        assert isinstance(got, ssl.SSLCertVerificationError)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_psk_identity_of_an_anyio_tls_stream(backend: str, tmp_path: Any) -> None:
    server = server_context(psk=KEYS)

    async def main() -> tuple[str | None, str | None]:
        path = str(tmp_path / "s")
        async with await anyio.create_unix_listener(path) as listener, anyio.create_task_group() as tasks:
            tasks.start_soon(_psk_client, path)
            raw = await listener.accept()
            stream = await TLSStream.wrap(raw, server_side=True, ssl_context=server, standard_compatible=False)
            await stream.send(b"!")
            await stream.aclose()
        return psk_identity(stream), psk_identity(stream.extra(anyio.streams.tls.TLSAttribute.ssl_object))

    assert anyio.run(main, backend=backend) == ("bob", "bob")


async def _psk_client(path: str) -> None:
    context = client("bob", KEYS["bob"])
    stream = await TLSStream.wrap(
        await anyio.connect_unix(path), server_side=False, ssl_context=context, standard_compatible=False
    )
    assert await stream.receive() == b"!"
    await stream.aclose()


# --- The real tools against our servers -----------------------------------------------------------------------


def psk_uri(base: str, export: str, identity: str, keys: str) -> str:
    return base.format(export).replace("nbds://", f"nbds://{identity}@") + f"?tls-psk-file={keys}"


def plaintext_go(port: int, export: str) -> nbdproto.OptionError:
    """NBD_OPT_GO sent in plaintext straight after the greeting (no other option first): the server's answer."""
    engine = nbdproto.ClientConnection()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        while True:
            event = engine.next_event()
            if event is nbdproto.NEED_DATA:
                sock.sendall(b"".join(engine.data_to_send()))
                engine.receive_data(sock.recv(65536))
            elif isinstance(event, nbdproto.ServerGreeting):
                engine.send(nbdproto.OptionGo(export))
            elif isinstance(event, nbdproto.OptionError):
                return event
            else:
                raise AssertionError(f"plaintext GO got {event!r}")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=PEER_ENV, check=check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nbdinfo_nbdcopy_and_qemu_img_with_a_key_file(
    backend: str, peers: Any, key_file: str, tmp_path: Any, caplog: Any
) -> None:
    peers("nbdinfo", "nbdcopy", "qemu-img")
    caplog.set_level(logging.INFO, "nbdproto.tls")
    device = MemoryDevice(4 * MIB)
    with serve_exports(backend, {"disk": Export(device)}, tls=server_context(psk=key_file)) as base:
        uri = psk_uri(base, "disk", "alice", key_file)
        info = json.loads(run("nbdinfo", "--json", uri).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MIB
        source = tmp_path / "source.img"
        source.write_bytes(os.urandom(MIB) + bytes(2 * MIB) + os.urandom(MIB))
        run("nbdcopy", str(source), psk_uri(base, "disk", "bob", key_file))
        run("nbdcopy", uri, str(tmp_path / "back.img"))
        assert (tmp_path / "back.img").read_bytes() == source.read_bytes()
        qemu_keys = tmp_path / "qemu"
        qemu_keys.mkdir()
        write_keys(qemu_keys / "keys.psk", {"alice": KEYS["alice"]})  # qemu reads DIR/keys.psk
        port = base.split(":")[2].split("/")[0]
        qemu = run(
            "qemu-img", "info", "--output=json",
            "--object", f"tls-creds-psk,id=tls0,dir={qemu_keys},endpoint=client,username=alice",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0",
        )  # fmt: skip
        assert json.loads(qemu.stdout)["virtual-size"] == 4 * MIB
        # Refused: a key the server does not have for that name, a name it does not know, and plaintext.
        wrong = write_keys(tmp_path / "wrong.psk", {"alice": KEYS["bob"], "mallory": KEYS["alice"]})
        for identity in ("alice", "mallory"):
            assert run("nbdinfo", psk_uri(base, "disk", identity, wrong), check=False).returncode != 0
        refused = plaintext_go(int(port), "disk")
        assert (refused.option, refused.reply_type) == (nbdproto.Option.GO, nbdproto.OptionReplyType.ERR_TLS_REQD)
    assert "TLS-PSK identity 'alice' (TLSv1.3" in caplog.text
    assert "TLS-PSK identity 'bob' (TLSv1.3" in caplog.text
    assert "TLS-PSK identity 'alice' refused: the client's key is not the one in the key file" in caplog.text
    assert "TLS-PSK identity 'mallory' refused: not in the key file" in caplog.text
    # Each line names the client as the server's own lines do (anyio's TLS has no socket to ask).
    assert re.search(r"client 127\.0\.0\.1:\d+: TLS-PSK identity 'mallory' refused", caplog.text), caplog.text


# --- Our clients against nbdkit and qemu-nbd ------------------------------------------------------------------


def _our_clients_against(port: int, export: str, key_file: str) -> None:
    uri = f"nbds://alice@127.0.0.1:{port}/{export}?tls-psk-file={key_file}"
    with nt.connect(uri) as c:
        c.pwrite(b"pre-shared", 4096)
        assert c.pread(10, 4096) == b"pre-shared"
        assert c.stream.sock.version() == "TLSv1.3"  # type: ignore[attr-defined]
    for version in TLS_VERSIONS:
        with nt.connect(f"nbds://127.0.0.1:{port}/{export}", tls=client("bob", KEYS["bob"], version)) as c:
            assert c.pread(10, 4096) == b"pre-shared"
            assert c.stream.sock.version() == ("TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2")  # type: ignore[attr-defined]

    with nt.connect(f"nbd://127.0.0.1:{port}/{export}", tls_psk=("bob", KEYS["bob"])) as c:  # the argument
        assert c.pread(10, 4096) == b"pre-shared" and c.engine.tls_active

    async def with_anyio() -> bytes:
        async with await na.connect(uri) as c:
            first = await c.pread(10, 4096)
        async with await na.connect(f"nbd://127.0.0.1:{port}/{export}", tls_psk=("bob", KEYS["bob"])) as c:
            assert c.engine.tls_active and await c.pread(10, 4096) == first
        return first

    assert anyio.run(with_anyio) == b"pre-shared"
    for identity, key in (("alice", KEYS["bob"]), ("mallory", KEYS["alice"])):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            nt.connect(f"nbds://127.0.0.1:{port}/{export}", tls=client(identity, key))
    refused = plaintext_go(port, export)
    assert (refused.option, refused.reply_type) == (nbdproto.Option.GO, nbdproto.OptionReplyType.ERR_TLS_REQD)


def test_our_clients_against_nbdkit_with_a_key_file(peers: Any, key_file: str) -> None:
    peers("nbdkit")
    with nbdkit(["--tls=require", f"--tls-psk={key_file}", "memory", "size=1M"]) as port:
        _our_clients_against(port, "", key_file)


def test_our_clients_against_qemu_nbd_with_a_key_file(peers: Any, key_file: str, tmp_path: Any) -> None:
    peers("qemu-nbd")
    (tmp_path / "qemu").mkdir()
    write_keys(tmp_path / "qemu" / "keys.psk", KEYS)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MIB))
    tls = f"tls-creds-psk,id=tls0,dir={tmp_path / 'qemu'},endpoint=server"
    with qemu_nbd(str(image), "raw", "--object", tls, "--tls-creds", "tls0") as port:
        _our_clients_against(port, "disk", key_file)


# --- The command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_nbdproto_serve_with_a_key_file_logs_each_identity(
    backend: str, peers: Any, key_file: str, tmp_path: Any
) -> None:
    peers("nbdinfo")
    args = ("--memory", "2M", "--name", "d", "--backend", backend, "-v", "--tls", "require", "--tls-psk", key_file)
    with serving(*args) as (proc, (uri,)):
        assert uri.startswith("nbds://")
        alice = uri.replace("nbds://", "nbds://alice@") + f"?tls-psk-file={key_file}"
        assert json.loads(run("nbdinfo", "--json", alice).stdout)["exports"][0]["export-size"] == 2 * MIB
        bob = uri.replace("nbds://", "nbds://bob@") + f"?tls-psk-file={key_file}"
        assert cli_json("info", "--json", bob)["TLS"] is True
        assert cli_json("list", "--json", bob)["exports"][0]["name"] == "d"
        (tmp_path / "in.img").write_bytes(os.urandom(2 * MIB))
        assert run_cli("copy", str(tmp_path / "in.img"), alice).returncode == 0
        assert run_cli("copy", bob, str(tmp_path / "out.img")).returncode == 0
        assert (tmp_path / "out.img").read_bytes() == (tmp_path / "in.img").read_bytes()
        wrong = write_keys(tmp_path / "wrong.psk", {"alice": KEYS["bob"]})
        failed = run_cli("info", uri.replace("nbds://", "nbds://alice@") + f"?tls-psk-file={wrong}")
        assert failed.returncode == 1 and len(failed.stderr.splitlines()) == 1
        # Bob's key taken out of the server's file while it serves: refused from the next connection on.
        bob_only = write_keys(tmp_path / "bob.psk", {"bob": KEYS["bob"]})
        stamp = os.stat(key_file).st_mtime_ns
        write_keys(pathlib.Path(key_file), {"alice": KEYS["alice"]})
        os.utime(key_file, ns=(stamp + 10**9, stamp + 10**9))
        bob = uri.replace("nbds://", "nbds://bob@") + f"?tls-psk-file={bob_only}"
        assert run_cli("info", bob).returncode == 1
        assert run_cli("info", alice).returncode == 0
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert "TLS-PSK identity 'bob' refused: not in the key file" in log
    assert "TLS-PSK identity 'alice'" in log and "TLS-PSK identity 'bob'" in log
    assert "TLS-PSK identity 'alice' refused: the client's key is not the one in the key file" in log


def test_nbdproto_serve_tls_optional_with_keys(peers: Any, key_file: str) -> None:
    peers("nbdinfo")
    with serving("--memory", "1M", "--tls", "optional", "--tls-psk", key_file) as (_, (uri,)):
        plain = uri.replace("nbds://", "nbd://")
        assert json.loads(run("nbdinfo", "--json", plain).stdout)["TLS"] is False
        keyed = uri.replace("nbds://", "nbds://alice@") + f"?tls-psk-file={key_file}"
        assert json.loads(run("nbdinfo", "--json", keyed).stdout)["TLS"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-psk", "KEYS"], "--tls-psk needs --tls require"),
        (["--tls", "require", "--tls-psk", "/no/keys.psk"], "--tls-psk: cannot read /no/keys.psk"),
        (["--tls", "require", "--tls-psk", "no-keys.psk"], "--tls-psk: cannot read no-keys.psk"),
        (
            ["--tls", "require", "--tls-psk", "KEYS", "--tls-cert", "/no/c.pem", "--tls-ca", "/no/ca.pem"],
            "cannot load the TLS certificate or key",
        ),
        (["--tls", "require", "--tls-psk", "BAD"], "--tls-psk: BAD, line 1: expected IDENTITY:HEXKEY"),
        (["--tls", "require", "--tls-psk", "KEYS", "--tls-cert", "c.pem"], "--tls-cert with --tls-psk needs --tls-ca"),
    ],
)
def test_nbdproto_serve_psk_usage_errors(args: list[str], message: str, key_file: str, tmp_path: Any) -> None:
    (tmp_path / "bad.psk").write_text("no colon here\n")
    args = [{"KEYS": key_file, "BAD": str(tmp_path / "bad.psk")}.get(a, a) for a in args]
    result = run_cli("serve", "--port", "0", *args)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert message.replace("BAD", str(tmp_path / "bad.psk")) in line
