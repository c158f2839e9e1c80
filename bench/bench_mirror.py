"""The mirror's background copy against ``nbdproto copy``: a 1 GiB file to a new file on tmpfs, alternating.

Two measures, ROUNDS rounds each (default 5), best and median printed with the ratio:

- command line, start-up included: ``nbdproto copy SRC DST`` until it exits, against ``nbdproto mirror
  --read-only SRC DST`` until it prints "mirror synchronised" (then it is stopped);
- in process, the copy alone: ``nbdproto_threads.copy(SRC, DST)`` against ``MirrorDevice(...).wait()``.

SRC is /dev/shm/nb/src.img (1 GiB of random data: ``head -c 1G /dev/urandom > /dev/shm/nb/src.img``), opened
read-only and never changed. DST is a file under /dev/shm/mirror-bench, removed after each run.

    .venv/bin/python bench/bench_mirror.py
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

from nbdproto.devices import FileDevice, MirrorDevice, MirrorState
from nbdproto_threads import copy

SRC = os.environ.get("SRC", "/dev/shm/nb/src.img")
WORK = "/dev/shm/mirror-bench"
DST = os.path.join(WORK, "dst.img")
ROUNDS = int(os.environ.get("ROUNDS", "5"))
CLI = [sys.executable, "-m", "nbdproto"]


def fresh() -> None:
    if os.path.exists(DST):
        os.unlink(DST)


def cli_copy() -> float:
    fresh()
    start = time.monotonic()
    subprocess.run([*CLI, "copy", "--no-progress", SRC, DST], check=True)
    return time.monotonic() - start


def cli_mirror() -> float:
    fresh()
    start = time.monotonic()
    args = [*CLI, "mirror", "--read-only", "--no-progress", "--port", "0", SRC, DST]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if line.strip() == "mirror synchronised":
                return time.monotonic() - start
            if line.startswith("mirror failed") or line.startswith("nbdproto"):
                raise RuntimeError(line)
        raise RuntimeError(f"nbdproto mirror ended without synchronising ({proc.wait()})")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def api_copy() -> float:
    fresh()
    start = time.monotonic()
    copy(SRC, DST)
    return time.monotonic() - start


def api_mirror() -> float:
    fresh()
    start = time.monotonic()
    with open(DST, "xb") as new:
        new.truncate(os.path.getsize(SRC))
    mirror = MirrorDevice(FileDevice(SRC, read_only=True), FileDevice(DST), secondary_is_zero=True)
    status = mirror.wait()
    elapsed = time.monotonic() - start
    mirror.close()
    assert status.state is MirrorState.SYNCHRONISED, status
    return elapsed


def main() -> None:
    os.makedirs(WORK, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    for name, ours, theirs in (("command line", cli_mirror, cli_copy), ("in process", api_mirror, api_copy)):
        mirrored: list[float] = []
        copied: list[float] = []
        for _ in range(ROUNDS):
            copied.append(theirs())
            mirrored.append(ours())
        fresh()
        best = min(mirrored) / min(copied)
        median = statistics.median(mirrored) / statistics.median(copied)
        print(
            f"{name}: mirror best {min(mirrored):.3f}s median {statistics.median(mirrored):.3f}s | "
            f"nbdproto copy best {min(copied):.3f}s median {statistics.median(copied):.3f}s | "
            f"ratio best {best:.2f} median {median:.2f}",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
