"""Our URI parser against libnbd's nbd_connect_uri (Debian's python3-libnbd, libnbd 1.14), on the malformed URIs
libnbd refuses and on random mutations of valid URIs.

The rule: a URI we accept is one libnbd accepts too, and we read from it the same (host, port) or socket, the
same export name and the same TLS requirement that libnbd connects with; a URI we refuse may be one libnbd
accepts (we refuse more: ports above 65535, which libnbd hands to getaddrinfo to wrap, a port without a host,
which libnbd ignores, escapes that are not UTF-8 or hold NUL, upper-case schemes). So nothing we parse connects
anywhere libnbd would not.

What libnbd read is learnt without it connecting anywhere: it runs in a network namespace of its own
(``unshare -n``, where every TCP connect fails and its error names the host and port it tried), and unix socket
paths are under a directory that does not exist; strace records the socket path of each connect (libnbd's
error does not name it, and ``nbd_get_uri`` does not escape it). Every URI is tried in one process, so
thousands take a second or two.
"""

from __future__ import annotations

import functools
import json
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nbdproto import NbdUri, parse_uri
from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(120)

_PROBE = r"""
import json, os, sys, nbd
for index, line in enumerate(sys.stdin):
    uri = json.loads(line)
    os.access("/nbdproto-uri-marker/%d" % index, os.F_OK)   # in strace's log: what follows is this URI's
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)   # as nbdinfo and nbdcopy do: ?tls-psk-file, ?tls-certificates
    out = {"uri": uri}
    try:
        h.connect_uri(uri)
        out["error"] = None
    except nbd.Error as e:
        out["error"] = e.string
    except UnicodeDecodeError:   # the binding cannot decode libnbd's message (it quotes bytes that are not UTF-8)
        out["error"] = "undecodable"
    try:
        out["export"] = h.get_export_name()
    except Exception:
        out["export"] = None   # not UTF-8
    out["tls"] = h.get_tls()
    try:
        out["libnbd_uri"] = h.get_uri()
    except Exception:
        out["libnbd_uri"] = None
    print(json.dumps(out), flush=True)
    del h
"""

MISSING = "/nonexistent-nbdproto-uri-test"
"""Where every unix socket of these URIs is: a directory that does not exist, so no connect can succeed."""

VALID = [
    "nbd://127.0.0.1:10809/disk",
    "nbd://127.0.0.1/",
    "nbd://localhost",
    "nbds://alice@127.0.0.1:9/a%20b?tls-psk-file=" + MISSING + "/k.psk",
    "nbd://[::1]:10810/x/y",
    "nbd://[::1]/",
    "nbds://127.0.0.2:1234/%2Fdisk#frag",
    "nbd://u:p@127.0.0.1:3/d;x?a=1&b=%2B",
    "nbd+unix:///disk?socket=" + MISSING + "/nbd.sock",
    "nbds+unix://bob@/e?socket=" + MISSING + "/s&tls-certificates=" + MISSING + "/pki",
    "nbd+unix:///?socket=" + MISSING + "/a%20b+c;tls-hostname=h",
    "nbd://127.0.0.1:10809/%C3%A9t%C3%A9?x",
]

MALFORMED = [
    "nbd:/127.0.0.1:31818/big",  # the issue's: one slash
    "nbd:127.0.0.1/big",
    "nbd+unix:/x?socket=" + MISSING + "/s",
    "nbd://127.0.0.1:-1/x",
    "nbd://127.0.0.1:/x",
    "nbd://127.0.0.1:1x/",
    "nbd://127.0.0.1:4294967297/x",
    "nbd://127.0.0.1:1/%zz",
    "nbd://127.0.0.1:1/a%2",
    "nbd://127.0.0.1:1/a b",
    "nbd://127.0.0.1:1/a|b",
    "nbd://[::1/",
    "nbd://a@b@127.0.0.1:1/",
    "nbd://127.0.0.1:1/x#a#b",
    "nbd://127.0.0.1:1/x?socket=/a",
    "nbd+unix:///e",
    "foo://127.0.0.1/",
    "NBD://127.0.0.1/",
    "nbd+ssh://127.0.0.1/",
    "127.0.0.1:10809",
    "",
]
"""URIs libnbd 1.14 refuses before connecting; we must refuse every one."""

_TOKENS = [*":/?#[]@!$&'()*+,;=%-._~ aZ09fF\\\"é", "%2", "%25", "%00", "%ff", "%41", "%2F", "::", "//", "s"]
_TOKENS += ["+unix", "socket=", "?socket=" + MISSING + "/q", "&", "[::1]", "65536", "99999", "0", "00", "nbd", "tls-"]


def mutations(count: int) -> list[str]:
    """``count`` URIs, each a valid one changed by one to three random edits (a fixed sequence: reproducible)."""
    rng = random.Random(29)
    out = []
    for _ in range(count):
        uri = rng.choice(VALID)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(uri) + 1)
            edit = rng.randrange(5)
            if edit == 0:  # insert
                uri = uri[:at] + rng.choice(_TOKENS) + uri[at:]
            elif edit == 1:  # delete a few characters
                uri = uri[:at] + uri[at + rng.randint(1, 3) :]
            elif edit == 2:  # replace one
                uri = uri[:at] + rng.choice(_TOKENS) + uri[at + 1 :]
            elif edit == 3:  # repeat a piece
                end = min(len(uri), at + rng.randint(1, 6))
                uri = uri[:end] + uri[at:end] + uri[end:]
            elif at < len(uri):  # change the case of one
                uri = uri[:at] + uri[at].swapcase() + uri[at + 1 :]
        out.append(uri)
    return out


@dataclass(frozen=True)
class LibnbdRead:
    """What libnbd did with one URI: refused it (``refused``, with why), or tried to connect to ``address``
    ((host, port) or a socket path) for ``export`` (None: not UTF-8) with TLS ``tls`` (0 off, 2 required)."""

    refused: str | None
    address: tuple[str, int] | str | None
    export: str | None
    tls: int


_TCP = re.compile(r"connect: (.*):(\d+): could not connect")
_LOOKUP = re.compile(r'getaddrinfo: hostname "(.*)" port "(\d+)"')


def _read(result: dict[str, Any], socket: str | None) -> LibnbdRead:
    error = (result["error"] or "").removeprefix("nbd_connect_uri: ")
    address: tuple[str, int] | str | None = socket
    if match := _TCP.search(error) or _LOOKUP.search(error):
        address = (match.group(1), int(match.group(2)))
    # What libnbd said cannot be told apart ("undecodable"): counted as accepted, at an unknown address, so
    # that a URI we accept there fails the comparison.
    connected_or_tried = address is not None or error.startswith(("connect:", "undecodable")) or not error
    return LibnbdRead(None if connected_or_tried else error, address, result["export"], result["tls"])


_MARKER = re.compile(r'access\("((?:\\x[0-9a-f]{2})+)"')
_UNIX_CONNECT = re.compile(r'connect\(\d+, \{sa_family=AF_UNIX, sun_path="((?:\\x[0-9a-f]{2})*)"')


def _sockets(log: str) -> dict[int, str]:
    """The unix socket libnbd connected to for each URI (by its index), from strace's log (strings in hex)."""
    sockets: dict[int, str] = {}
    index = -1
    for line in log.splitlines():
        if match := _MARKER.search(line):
            path = _unhex(match.group(1))
            if path.startswith("/nbdproto-uri-marker/"):
                index = int(path.rpartition("/")[2])
        elif (match := _UNIX_CONNECT.search(line)) and index not in sockets:
            sockets[index] = _unhex(match.group(1))
    return sockets


def _unhex(text: str) -> str:
    return bytes.fromhex(text.replace("\\x", "")).decode(errors="surrogateescape")


def libnbd_reads(uris: list[str], tmp_path: Path) -> dict[str, LibnbdRead]:
    """How libnbd reads each URI, in a network namespace of its own where that can be made, under strace."""
    log = tmp_path / "strace.log"
    command = ["strace", "-f", "-qq", "-xx", "-s", "4096", "-e", "trace=connect,access,faccessat,faccessat2", "-o",
               str(log), "/usr/bin/python3", "-c", _PROBE]  # fmt: skip
    if _can_unshare():
        command = ["unshare", "-n", *command]
    done = subprocess.run(command, input="".join(json.dumps(u) + "\n" for u in uris), capture_output=True, text=True,
                          timeout=90, env=PEER_ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(uris)
    sockets = _sockets(log.read_text())
    return {result["uri"]: _read(result, sockets.get(i)) for i, result in enumerate(results)}


@functools.cache
def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ours(uri: str) -> NbdUri | None:
    try:
        return parse_uri(uri)
    except ValueError:
        return None


def check_agrees(uri: str, parsed: NbdUri, libnbd: LibnbdRead) -> None:
    """A URI we parsed: libnbd accepted it and read the same place, export and TLS."""
    assert libnbd.refused is None, f"{uri!r}: we read {parsed}, libnbd refuses it: {libnbd.refused}"
    assert libnbd.export == parsed.export_name, f"{uri!r}: export {parsed.export_name!r}, libnbd's {libnbd.export!r}"
    assert libnbd.tls == (2 if parsed.tls else 0), f"{uri!r}: tls {parsed.tls}, libnbd's {libnbd.tls}"
    expected: tuple[str, int] | str = parsed.socket if parsed.unix else (parsed.host, parsed.port)
    assert libnbd.address == expected, f"{uri!r}: we would connect to {expected}, libnbd to {libnbd.address}"


def test_what_libnbd_refuses_we_refuse(peers: Any, tmp_path: Path) -> None:
    peers("nbdsh", "strace")  # nbdsh: present only where /usr/bin/python3 can import nbd
    reads = libnbd_reads(MALFORMED, tmp_path)
    for uri in MALFORMED:
        assert reads[uri].refused, f"{uri!r}: libnbd 1.14 accepts it now: {reads[uri]}"
        assert ours(uri) is None, f"{uri!r}: libnbd refuses it ({reads[uri].refused}), we read {ours(uri)}"


def test_valid_uris_read_as_libnbd_reads_them(peers: Any, tmp_path: Path) -> None:
    peers("nbdsh", "strace")
    reads = libnbd_reads(VALID, tmp_path)
    for uri in VALID:
        parsed = ours(uri)
        assert parsed is not None, f"{uri!r} is valid"
        check_agrees(uri, parsed, reads[uri])


def test_mutated_uris_parse_as_libnbd_reads_them_or_are_refused(peers: Any, tmp_path: Path) -> None:
    peers("nbdsh", "strace")
    uris = mutations(3000)
    reads = libnbd_reads(sorted(set(uris)), tmp_path)
    accepted = 0
    for uri in set(uris):
        parsed = ours(uri)
        if parsed is not None:
            check_agrees(uri, parsed, reads[uri])
            accepted += 1
    # Not a trivial pass: many mutations are still valid URIs, and we read them as libnbd does.
    assert accepted > 300, accepted
    libnbd_accepted = sum(1 for r in reads.values() if r.refused is None)
    assert accepted > libnbd_accepted // 2, (accepted, libnbd_accepted)
