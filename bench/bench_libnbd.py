"""nbdproto.libnbd against libnbd's own binding, side by side, on the same nbdkit memory export (a unix socket):
a sequential loop of 1 MiB ``pread`` calls, and an aio loop keeping 16 ``aio_pread`` of 1 MiB in flight (the
poll / aio_command_completed loop libnbd(3) describes). The same script runs under /usr/bin/python3 with
``import nbd`` (Debian's python3-libnbd) and under this interpreter with ``from nbdproto import libnbd as nbd``,
alternating, each in a fresh process; MiB/s and CPU seconds per GiB of each, and ours as a ratio of libnbd's.

    .venv/bin/python bench/bench_libnbd.py [--rounds N] [--size MIB] [--profile FILE]

``--profile FILE`` also runs our side once under cProfile and writes the statistics to FILE (for looking at
the hot path). Needs nbdkit and python3-libnbd.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1 << 20
IN_FLIGHT = 16

WORKLOAD = """
import resource, sys, time
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
socket_path, size, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
CHUNK, IN_FLIGHT = 1 << 20, 16
h = nbd.NBD()
h.connect_unix(socket_path)
started, used = time.perf_counter(), cpu()
if kind == "pread":
    for offset in range(0, size, CHUNK):
        h.pread(CHUNK, offset)
else:
    buffers = [nbd.Buffer(CHUNK) for _ in range(IN_FLIGHT)]
    free = list(range(IN_FLIGHT))
    flying = {}
    offset = 0
    while offset < size or flying:
        while free and offset < size:
            slot = free.pop()
            flying[h.aio_pread(buffers[slot], offset)] = slot
            offset += CHUNK
        h.poll(-1)
        for cookie in [c for c in flying if h.aio_command_completed(c)]:
            free.append(flying.pop(cookie))
elapsed, used = time.perf_counter() - started, cpu() - used
h.shutdown()
print(json.dumps({"seconds": elapsed, "cpu": used}))
"""

HEADERS = {
    "real": "import json, nbd\n",
    "ours": "import json\nfrom nbdproto import libnbd as nbd\n",
}
PYTHONS = {"real": "/usr/bin/python3", "ours": sys.executable}


def run(side: str, socket_path: str, size: int, kind: str) -> dict[str, float]:
    command = [PYTHONS[side], "-c", HEADERS[side] + WORKLOAD, socket_path, str(size), kind]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{side} {kind} failed: {done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def prefill(socket_path: str, size: int) -> None:
    """Data everywhere (no holes), written with our binding: both sides then read the same bytes."""
    sys.path.insert(0, str(ROOT))
    from nbdproto import libnbd

    h = libnbd.NBD()
    h.connect_unix(socket_path)
    block = bytes(range(256)) * (CHUNK // 256)
    for offset in range(0, size, CHUNK):
        h.pwrite(block, offset)
    h.shutdown()


def profile(socket_path: str, size: int, target: str) -> None:
    sys.path.insert(0, str(ROOT))
    from nbdproto import libnbd as nbd

    namespace = {"nbd": nbd, "json": json}
    code = WORKLOAD.replace("socket_path, size, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]", "")
    for kind in ("pread", "aio"):
        namespace.update(socket_path=socket_path, size=size, kind=kind)
        cProfile.runctx(code, namespace, namespace, f"{target}.{kind}")
    print(f"profiles written to {target}.pread and {target}.aio (python -m pstats)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="MiB read by each loop (default 1024)")
    parser.add_argument("--profile", help="also profile our side with cProfile, into FILE.pread / FILE.aio")
    args = parser.parse_args()
    size = args.size << 20
    with tempfile.TemporaryDirectory(prefix="bench-libnbd-") as directory:
        socket_path = os.path.join(directory, "nbdkit.sock")
        server = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", socket_path, "memory", str(size)], stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 15
            while not os.path.exists(socket_path):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("nbdkit did not start within 15 s")
                time.sleep(0.05)
            prefill(socket_path, size)
            results: dict[tuple[str, str], list[dict[str, float]]] = {}
            for _ in range(args.rounds):
                for kind in ("pread", "aio"):
                    for side in ("real", "ours"):
                        results.setdefault((kind, side), []).append(run(side, socket_path, size, kind))
            report(results, size, args.rounds)
            if args.profile:
                profile(socket_path, size, args.profile)
        finally:
            server.terminate()
            server.wait(10)


def report(results: dict[tuple[str, str], list[dict[str, float]]], size: int, rounds: int) -> None:
    print(f"{size >> 20} MiB read in 1 MiB requests, {rounds} round(s), medians; nbdkit memory over a unix socket")
    print(f"{'loop':<22} {'libnbd MiB/s':>13} {'ours MiB/s':>11} {'ratio':>6} {'libnbd cpu s/GiB':>17} {'ours':>6}")
    for kind, label in (("pread", "sequential pread"), ("aio", f"aio, {IN_FLIGHT} in flight")):
        rates, cpus = {}, {}
        for side in ("real", "ours"):
            runs = results[(kind, side)]
            rates[side] = statistics.median((size >> 20) / run["seconds"] for run in runs)
            cpus[side] = statistics.median(run["cpu"] / (size / (1 << 30)) for run in runs)
        ratio = rates["ours"] / rates["real"]
        print(f"{label:<22} {rates['real']:>13.0f} {rates['ours']:>11.0f} {ratio:>5.2f}x "
              f"{cpus['real']:>17.2f} {cpus['ours']:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
