"""What a client is told when a device fails: the NBD error and its errno text, nothing of the server's internals
(an upstream's socket path, an object store's endpoint and keys); the detail is in the server's log, one line.

Real components: ``nbdproto serve nbd+unix://...`` proxying to a server on a unix socket that goes away, and an
S3 export on SeaweedFS reached through a proxy that stalls."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
import uuid
from typing import Any

import pytest

import nbdproto
import nbdproto_threads as nt
from nbdproto.devices import S3Device, S3Settings
from tests.remotes import cli
from tests.s3server import SeaweedFS, stall_proxy
from tests.serving import Export, serve_exports

KIB, MIB = 1 << 10, 1 << 20
pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("backend", ["anyio", "threads"])
def test_a_proxied_read_fails_without_the_upstreams_socket_path(backend: str) -> None:
    with tempfile.TemporaryDirectory(prefix="nbdproto-secret-upstream-") as directory:
        sock = os.path.join(directory, "upstream.sock")
        upstream_uri = f"nbd+unix:///?socket={sock}"
        with cli("serve", "--memory", "1M", "--socket", sock) as upstream:
            upstream.uri()
            with cli("serve", upstream_uri, "--port", "0", "--remote-timeout", "5", "--backend", backend) as proxy:
                with nt.connect(proxy.uri(), timeout=30) as client:
                    client.pread(512, 0)
                    assert upstream.stop() == 0  # the upstream goes away (and its socket with it)
                    with pytest.raises(nbdproto.NBDError) as raised:
                        client.pread(4 * KIB, 0)
                    assert raised.value.errno == errno.EIO
                    assert raised.value.strerror == os.strerror(errno.EIO)
                    assert directory not in str(raised.value)
                    # ... while the server's log has the detail, naming the upstream.
                    proxy.wait_for("err", lambda line: sock in line and "READ" in line, 30)
                assert proxy.stop() == 0
    assert not any("Traceback" in line for line in proxy.err), proxy.err


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_an_s3_write_fails_without_the_endpoint_or_key(
    backend: str, s3_store: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"secret-key-{uuid.uuid4().hex[:12]}"
    with stall_proxy(s3_store.endpoint) as proxy:
        settings = S3Settings(endpoint=proxy.endpoint, timeout=2.0, retries=1, retry_timeout=3.0)
        device: Any = S3Device(s3_store.bucket, key, size=MIB, object_size=64 * KIB, settings=settings)
        with (
            serve_exports(backend, {"disk": Export(device)}) as base,
            nt.connect(base.format("disk"), timeout=30) as client,
        ):
            client.pwrite(b"a" * 100, 0, fua=True)
            caplog.set_level(logging.WARNING)
            proxy.stalled.set()
            started = time.monotonic()
            with pytest.raises(nbdproto.NBDError) as raised:
                client.pwrite(b"b" * 100, 64 * KIB, fua=True)
            assert time.monotonic() - started < 30
            proxy.stalled.clear()
            assert raised.value.errno == errno.EIO
            assert raised.value.strerror == os.strerror(errno.EIO)
            said = str(raised.value)
            assert str(proxy.port) not in said and key not in said and s3_store.bucket not in said
        device.close()
    # The server's log line for the failed request says what went wrong.
    lines = [r.getMessage() for r in caplog.records if r.name.endswith(".server")]  # the backend's server log
    assert any("WRITE of 100 bytes at 65536 failed: EIO" in line and key in line for line in lines), lines
