"""The threads client over TLS with its reader thread: OpenSSL must never see one connection read in one thread
while another writes it or shuts it down (it corrupts memory: seen as SIGABRT and "free(): corrupted unsorted
chunks" in about three runs of four of the loop below, and as a request lost in the rest, before receives were
made under the senders' lock and close waited for the reader). Run in a process of its own, so that a crash
is this test's failure and not pytest's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(180)

_LOOP = r"""
import sys, threading
import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from tests.serving import Export, make_pki, serve_exports

with make_pki() as pki:
    with serve_exports("threads", {"d": Export(MemoryDevice(1 << 20))}, tls=pki.server_context) as base:
        uri = base.format("d").replace("nbd://", "nbds://")
        for i in range(1500):  # connect, read, close: the close races the reader's receive
            with nt.connect(uri, tls=pki.client_context, timeout=10) as c:
                assert c.pread(512, 0) == bytes(512)
        with nt.connect(uri, tls=pki.client_context, timeout=10) as c:  # many threads sending at once
            failures = []
            def work(k):
                try:
                    for j in range(200):
                        data = bytes([k]) * 4096
                        c.pwrite(data, k * 4096)
                        assert c.pread(4096, k * 4096) == data
                except BaseException as exc:
                    failures.append(exc)
            threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
            for t in threads: t.start()
            for t in threads: t.join(60)
            assert not any(t.is_alive() for t in threads) and not failures, failures
print("ok")
"""


def test_tls_connections_opened_used_from_threads_and_closed_at_once_are_never_corrupted() -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _LOOP], cwd=root, capture_output=True, text=True, timeout=170,
                          env=PEER_ENV)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-3000:])
