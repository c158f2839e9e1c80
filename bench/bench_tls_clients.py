"""Our two clients reading over TLS, side by side: the threads client and the anyio client each read SIZE of
4 MiB reads from nbdkit (`--tls=require memory 1G`, a throwaway certificate authority), ROUNDS rounds; MiB/s and
the client's CPU seconds (this process: the server is nbdkit's).

    .venv/bin/python bench/bench_tls_clients.py [ROUNDS] [SIZE_MIB]

Needs nbdkit and the test extra (trustme makes the certificates).
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbdproto_anyio as na
import nbdproto_threads as nt
from tests.serving import make_pki

CHUNK = 4 << 20


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    size = (int(sys.argv[2]) if len(sys.argv) > 2 else 512) << 20
    with make_pki() as pki:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "--tls=require",
                   f"--tls-certificates={pki.directory}", "memory", "1G"]  # fmt: skip
        server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        uri = f"nbds://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 15
            while subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode and server.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("nbdkit did not start within 15 s")
                time.sleep(0.1)

            def threads_client() -> None:
                with nt.connect(uri, tls=pki.client_context) as client:
                    for offset in range(0, size, CHUNK):
                        client.pread(CHUNK, offset)

            async def anyio_client() -> None:
                async with await na.connect(uri, tls=pki.client_context) as client:
                    for offset in range(0, size, CHUNK):
                        await client.pread(CHUNK, offset)

            for _ in range(rounds):
                for label, run in (
                    ("threads client", threads_client),
                    ("anyio client", lambda: anyio.run(anyio_client)),
                ):
                    used, started = cpu(), time.monotonic()
                    run()
                    seconds = time.monotonic() - started
                    print(f"{label}\t{(size >> 20) / seconds:.0f} MiB/s\tCPU {cpu() - used:.2f} s", flush=True)
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
