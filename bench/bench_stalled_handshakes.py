"""What connections that stall in their TLS handshake cost a server: its resident set (VmRSS, and the peak,
VmHWM) idle, with N connections that negotiated STARTTLS, sent a whole ClientHello and then nothing, and again
after they were all closed (memory a server does not give back stays out of reach of the next clients).

``nbdproto serve --memory 1M --tls require`` runs with each backend; the clients are raw sockets in this
process, opened as fast as the server takes them (well within the handshake timeout, 10 s by default). One
line per figure: backend, what, MiB (VmRSS, then VmHWM), and how many of the N connections the server still
held open when they were all made (the others it closed: --max-handshakes).

    python bench/bench_stalled_handshakes.py            CONNECTIONS=2000 BACKENDS="anyio threads" ...
    EXTRA="--max-handshakes 0" python bench/bench_stalled_handshakes.py     # without the cap
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

import trustme

IHAVEOPT = 0x49484156454F5054
STARTTLS = 5
MIB = 1 << 20


def _status(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise LookupError(field)


def _memory(pid: int) -> str:
    return f"{_status(pid, 'VmRSS'):.0f}\t{_status(pid, 'VmHWM'):.0f}"


def _client_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _stall(port: int, hello: bytes) -> socket.socket | None:
    """A connection that asked for STARTTLS and sent its ClientHello; None if the server closed it first."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        greeting = sock.recv(18, socket.MSG_WAITALL)
        if len(greeting) < 18:
            sock.close()
            return None
        sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, STARTTLS, 0))
        if len(sock.recv(20, socket.MSG_WAITALL)) < 20:
            sock.close()
            return None
        sock.sendall(hello)
    except OSError:
        sock.close()
        return None
    return sock


def _open(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server has not closed."""
    readable, _, _ = select.select(sockets, [], [], 0) if len(sockets) < 1000 else (_poll(sockets), [], [])
    still = 0
    readable_set = set(readable)
    for sock in sockets:
        if sock not in readable_set:
            still += 1
            continue
        try:
            data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            continue
        still += bool(data)
    return still


def _poll(sockets: list[socket.socket]) -> list[socket.socket]:
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in sockets}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(0)]


def measure(backend: str, connections: int, directory: str, extra: list[str]) -> None:
    tls = ["--tls", "require", "--tls-cert", f"{directory}/cert.pem", "--tls-key", f"{directory}/key.pem"]
    command = [sys.executable, "-m", "nbdproto", "serve", "--memory", "1M", "--port", "0", "--backend", backend,
               *tls, *extra]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        port = int(line.split(":")[2].split("/")[0])
        time.sleep(0.5)
        print(f"{backend}\tidle\t{_memory(server.pid)}", flush=True)
        hello = _client_hello()
        sockets = [sock for sock in (_stall(port, hello) for _ in range(connections)) if sock is not None]
        time.sleep(0.5)  # the last handshakes under way
        held = _open(sockets)
        print(f"{backend}\t{connections} stalled\t{_memory(server.pid)}\t({held} held open)", flush=True)
        for sock in sockets:
            sock.close()
        time.sleep(2)
        print(f"{backend}\tafter closing\t{_memory(server.pid)}", flush=True)
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    connections = int(os.environ.get("CONNECTIONS", "2000"))
    extra = os.environ.get("EXTRA", "").split()
    with tempfile.TemporaryDirectory(prefix="bench-handshakes-") as directory:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(f"{directory}/cert.pem")
        cert.private_key_pem.write_to_path(f"{directory}/key.pem")
        print("backend\twhat\tVmRSS MiB\tVmHWM MiB")
        for backend in os.environ.get("BACKENDS", "anyio threads").split():
            measure(backend, connections, directory, extra)


if __name__ == "__main__":
    main()
