"""The threads client never lets a send that waits keep its reader from taking replies in: a large write going
out while a large read's reply comes in, on one connection, to servers that stop reading requests while a
reply cannot be sent (ours do: a connection's replies go out before its next requests are read). Before, the
write's send held the lock the reader needed, the server's reply filled the socket, and both waited for ever
(the client's timeout turned it into TimeoutError); plaintext and TLS."""

from __future__ import annotations

import pytest

import nbdproto_threads as nt
from nbdproto.devices import MemoryDevice
from tests.serving import Export, make_pki, serve_exports
from tests.threaded import run_threads

pytestmark = pytest.mark.timeout(120)

BIG = 32 << 20  # well past what the sockets of a loopback connection buffer


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_big_write_goes_out_while_a_big_read_comes_in(backend: str, tls: bool) -> None:
    device = MemoryDevice(4 * BIG)
    with make_pki() as pki:
        server_tls = pki.server_context if tls else None
        exports = {"d": Export(device)}
        with (
            serve_exports(backend, exports, tls=server_tls, max_bytes_in_flight=4 * BIG) as base,
            nt.connect(base.format("d"), tls=pki.client_context if tls else None, timeout=20) as client,
        ):
            pattern = bytes(range(256)) * (BIG // 256)
            client.pwrite(pattern, 0)

            def work(me: int) -> None:
                for _ in range(3):
                    if me == 0:
                        assert client.pread(BIG, 0) == pattern
                    else:
                        client.pwrite(pattern, 2 * BIG)

            run_threads(work, 2)
    written = memoryview(bytearray(BIG))
    device.pread_into(written, 2 * BIG)
    assert written == pattern
