"""What a dirty bitmap costs: the same server with and without one active bitmap, side by side, and the price
of the first write to a granule (the durable mark in the sidecar) measured on its own.

    .venv/bin/python bench/bench_bitmap.py                                 # one round of everything
    .venv/bin/python bench/bench_bitmap.py --rounds 3 --runtime 8 --backends threads

Servers: ``nbdproto serve IMAGE`` on each backend (threads; anyio on its default loop), and the same with
``--bitmap b`` (64 KiB granules, a new bitmap each time the server starts). Tests, as bench/bench_table.py runs
them: fio 4 KiB random writes at queue depth 16 (nbd engine), and nbdcopy writing the whole 1 GiB export over 4
connections. Each test runs twice on each server and the second run is measured: a bitmap that has been active
for a while, whose writes land in granules dirty already (the common case, and the one the target is for).
With ``--fresh`` the first run is measured instead, where the new bitmap's first writes to each granule pay for
their durable mark (nbdcopy: every write). Each figure is shown beside the same server's without a bitmap, with
the ratio of the figures and of the server's CPU per request. The target is a ratio of at least 0.9. The image is
on tmpfs, so nbdcopy's large writes are received in place with the bitmap as without it (the bitmap filter
offers the file's write views, and marks each write when its header arrives).

Then the first write, in this process: 4 KiB pwrites to a FileDevice with a bitmap in its sidecar, to granules
not yet dirty (each marks the sidecar durably: a pwrite and an fdatasync) and to granules dirty already (a bit
test), beside pwrites to the file without a filter; on the tmpfs of --dir and on the disk of --disk-dir.

The images are bench_table's (--dir, default /dev/shm/nbdproto-bench: 1 GiB of random data each); the
sidecar a bitmap server leaves there is removed when it stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench_table import Server, Test, image, measure, running

TESTS = [Test("randwrite 4k qd16", "IOPS"), Test("nbdcopy write", "MiB/s")]


def servers(python: str, backends: list[str]) -> list[Server]:
    ours = [python, "-m", "nbdproto", "serve", "{image}", "--port", "{port}", "--host", "127.0.0.1"]
    out = []
    for backend in backends:
        plain = [*ours, "--backend", backend]
        out += [Server(backend, plain, python), Server(f"{backend} + bitmap", [*plain, "--bitmap", "b"], python)]
    return out


def first_write_costs(directory: str, writes: int) -> dict[str, float]:
    """Microseconds per 4 KiB pwrite: to the file alone, to fresh granules with a bitmap (the durable mark),
    to dirty granules with a bitmap (the bit test)."""
    from nbdproto.devices import FileDevice
    from nbdproto.devices.bitmaps import DirtyBitmapFilter, bitmap_store_for

    granule = 64 << 10
    data = os.urandom(4096)
    with tempfile.TemporaryDirectory(prefix="nbdproto-bench-bitmap-", dir=directory) as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            f.truncate(writes * granule)
        out: dict[str, float] = {}
        with FileDevice(path) as device:
            started = time.perf_counter()
            for i in range(writes):
                device.pwrite(data, i * granule + 4096)
            out["file alone"] = (time.perf_counter() - started) * 1e6 / writes
        plain = FileDevice(path)
        with DirtyBitmapFilter(plain, bitmap_store_for(plain)) as tracked:
            tracked.bitmap_add("b")
            started = time.perf_counter()
            for i in range(writes):
                tracked.pwrite(data, i * granule)
            out["first write to a granule"] = (time.perf_counter() - started) * 1e6 / writes
            started = time.perf_counter()
            for i in range(writes):
                tracked.pwrite(data, i * granule + 8192)
            out["later write to it"] = (time.perf_counter() - started) * 1e6 / writes
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--runtime", type=int, default=5, help="seconds of each fio test (default 5)")
    parser.add_argument("--backends", default="threads,anyio", help="comma-separated (default threads,anyio)")
    parser.add_argument("--tests", default="", help="comma-separated test name prefixes to run (default: all)")
    parser.add_argument("--dir", default="/dev/shm/nbdproto-bench", help="where the 1 GiB images are")
    parser.add_argument("--disk-dir", default="/var/tmp", help="a directory on a disk, for the first-write cost")
    parser.add_argument("--writes", type=int, default=2000, help="writes of each kind for the first-write cost")
    parser.add_argument("--fresh", action="store_true", help="measure the first run on a new bitmap")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    for tool in ("nbdcopy", "nbdinfo", "fio"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    chosen = servers(args.python, args.backends.split(","))
    served, source = image(args.dir, "served.img"), image(args.dir, "source.img")
    sidecar = served + ".bitmaps"
    tests = [t for t in TESTS if not args.tests or t.name.startswith(tuple(args.tests.split(",")))]
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for round_ in range(args.rounds):
        for server in chosen if round_ % 2 == 0 else chosen[::-1]:
            shutil.rmtree(sidecar, ignore_errors=True)  # a new bitmap: this run's first writes pay
            try:
                with running(server, served) as (proc, uri):
                    for test in tests:
                        if not args.fresh:  # the same run unmeasured first, on every server alike
                            measure(test, uri, proc.pid, source, args.runtime)
                        figure, cpu, client = measure(test, uri, proc.pid, source, args.runtime)
                        results.setdefault((server.label, test.name), []).append((figure, cpu, client))
                        print(f"round {round_ + 1}\t{server.label}\t{test.name}\t{figure:.0f} {test.unit}\t"
                              f"{cpu:.1f} us CPU", file=sys.stderr, flush=True)  # fmt: skip
            finally:
                shutil.rmtree(sidecar, ignore_errors=True)  # or the next server without --bitmap would track it
    state = "a new bitmap's first run" if args.fresh else "the second run, the bitmap's granules mostly dirty"
    print(f"\nmedians of {args.rounds} round(s), {state}; with a bitmap beside the same server without one")
    for test in tests:
        for backend in args.backends.split(","):
            without, with_ = results.get((backend, test.name)), results.get((f"{backend} + bitmap", test.name))
            if not without or not with_:
                continue
            figure = statistics.median(r[0] for r in without), statistics.median(r[0] for r in with_)
            cpu = statistics.median(r[1] for r in without), statistics.median(r[1] for r in with_)
            print(f"  {test.name:18} {backend:8} without {figure[0]:8.0f} {test.unit:5}  with {figure[1]:8.0f}  "
                  f"ratio {figure[1] / figure[0]:.2f}x  server CPU {cpu[1] / cpu[0]:.2f}x")  # fmt: skip
    print("\nthe first write to a granule (us per 4 KiB pwrite, in-process, 64 KiB granules):")
    for where in (args.dir, args.disk_dir):
        costs = first_write_costs(where, args.writes)
        print(f"  {where}: " + ", ".join(f"{name} {value:.1f}" for name, value in costs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
