"""What a server holds in memory under load: its resident set (VmRSS, and the peak, VmHWM) idle, with 100 idle
connections, and while 16 connections each have 64 writes of 32 MiB in flight (32 GiB asked for at once; the
request budget, --memory-limit 512 MiB by default, must keep the server near its limit however much is asked).

Each backend serves a 1 GiB file on tmpfs, started as ``nbdproto serve``; the clients are raw sockets in this
process that pipeline their writes without reading a reply until all are sent. The server receives writes
straight into its mapping of the file (FileDevice.write_view), so VmRSS counts the file's pages it touched
(RssShmem: the page cache's, shared, there before the server and after it); RssAnon is the server's own
memory, the figure the budget bounds. One line per figure: backend, what, MiB (VmRSS, then RssAnon).

    python bench/bench_memory.py            BACKENDS="threads anyio" WRITES=64 python bench/bench_memory.py
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time

IMAGE = "/dev/shm/nb/ours.img"
MIB = 1 << 20
WRITE_SIZE = 32 * MIB
_GO_ACK = struct.pack(">QII", 0x3E889045565A9, 7, 1)


def _status(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise LookupError(field)


def _memory(pid: int) -> str:
    return f"{_status(pid, 'VmRSS'):.0f}\t{_status(pid, 'RssAnon'):.0f}"


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.recv(18, socket.MSG_WAITALL)
    name = b""
    info = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, len(info)) + info)
    seen = b""
    while not seen.endswith(_GO_ACK + bytes(4)):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the handshake")
        seen += chunk
    return sock


def _writer(port: int, writes: int, index: int, errors: list[BaseException]) -> None:
    payload = memoryview(bytes([index + 1]) * WRITE_SIZE)
    try:
        with _connect(port) as sock:
            for i in range(writes):
                offset = ((index * writes + i) * WRITE_SIZE) % (1 << 30)
                sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, i, offset, WRITE_SIZE))
                sock.sendall(payload)
            replies = b""
            while len(replies) < 16 * writes:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed before every write was answered")
                replies += chunk
            failed = [struct.unpack_from(">I", replies, at + 4)[0] for at in range(0, len(replies), 16)]
            if any(failed):
                raise OSError(f"writes failed with NBD errors {sorted(set(failed))}")
    except BaseException as exc:
        errors.append(exc)


def measure(backend: str, writes: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "nbdproto", "serve", IMAGE, "--port", str(port), "--backend", backend]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "serving ..." once it listens
        time.sleep(0.5)
        print(f"{backend}\tstarted\t{_memory(server.pid)}", flush=True)
        idle = [_connect(port) for _ in range(100)]
        time.sleep(0.5)
        print(f"{backend}\t100 idle connections\t{_memory(server.pid)}", flush=True)
        for sock in idle:
            sock.close()
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_writer, args=(port, writes, i, errors)) for i in range(16)]
        peak = peak_anon = 0.0
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, _status(server.pid, "VmRSS"))
            peak_anon = max(peak_anon, _status(server.pid, "RssAnon"))
            time.sleep(0.05)
        if errors:
            raise errors[0]
        gib = 16 * writes * WRITE_SIZE / (1 << 30)
        took = time.monotonic() - started
        print(f"{backend}\t16 connections x {writes} x 32 MiB writes ({gib:.0f} GiB in {took:.0f} s): peak RSS sampled"
              f"\t{peak:.0f}\t{peak_anon:.0f}", flush=True)  # fmt: skip
        print(f"{backend}\t... VmHWM (the kernel's peak)\t{_status(server.pid, 'VmHWM'):.0f}", flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    if not os.path.exists(IMAGE):
        sys.exit(f"needs {IMAGE} (1 GiB): mkdir -p /dev/shm/nb && head -c 1G /dev/urandom > {IMAGE}")
    for name in os.environ.get("BACKENDS", "threads anyio").split():
        measure(name, int(os.environ.get("WRITES", "64")))
