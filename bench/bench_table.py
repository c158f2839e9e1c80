"""One command, one table: our servers (each backend and event loop, one process and N workers) against nbdkit's
file plugin and qemu-nbd, all serving the same kind of 1 GiB tmpfs file, measured side by side.

    .venv/bin/python bench/bench_table.py                        # every server, one round
    .venv/bin/python bench/bench_table.py --rounds 3 --runtime 8 --only nbdkit,threads
    .venv/bin/python bench/bench_table.py --rounds 3 --plot speed.svg   # and draw it (bench/bench_plot.py)
    .venv/bin/python bench/bench_table.py --baseline ../before/.venv/bin/python --only nbdkit,threads

Ours: `--backend threads`, the anyio backend on each event loop installed (asyncio, uvloop, trio), each as one
process and as N workers (--workers, default the cores), and the threads backend with --busy-poll 200 (the mode
for clients with one request at a time); and the python floor, bench/plain_server.py: the obvious Python loop
(a thread per connection, recv the header, pread or recv_into and pwrite, sendall), what Python itself costs
before any protocol engine. Each server is started afresh for each round (the order reversed every
other round, so none always follows the same one), waited for (bounded), measured by the real clients, and
stopped. The tests: nbdcopy reads and writes of the whole export with --connections=4 (nbdcopy opens at most
one per thread, and its threads default to the cores: 2 connections on 2 cores) and fio
(nbd engine) 4 KiB random reads at queue depth 1 and 16 and random writes at queue depth 16. Beside each
figure: the server's own CPU per request (user + system of the server and every worker process, read from
/proc before and after), the client's (nbdcopy's or fio's, from getrusage), and the ratio of each to nbdkit's.
Client and server share the cores, so a server that makes its client work harder is slower for it. With
several rounds, each cell is the median, and beside each ratio to nbdkit is its range over the rounds (each
round's figure against nbdkit's in the same round): a ratio whose range spans a tenth or more is the machine's
noise as much as the server's speed, and one round of another run may land anywhere in it.

Before and after: --baseline PYTHON runs each of our servers a second time from another installation (an
older checkout's virtual environment), labelled "(before)", in the same rounds, so a change is measured on one
machine in one run. Every server runs from /, so the installation a Python imports is its own and never the
checkout in the current directory.

Needs nbdkit, qemu-nbd (qemu-utils), nbdcopy (libnbd-bin) and fio; a server whose tool is missing is left out
and said so. The images are made at --dir (default /dev/shm/nbdproto-bench) if missing: 1 GiB of random data,
one served and one written from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

GIB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Server:
    label: str
    command: list[str]  # {image} and {port} are filled in
    tool: str  # the program that must be installed


@dataclass(frozen=True)
class Test:
    name: str
    unit: str


TESTS = [
    Test("nbdcopy read", "MiB/s"),
    Test("nbdcopy write", "MiB/s"),
    Test("randread 4k qd1", "IOPS"),
    Test("randread 4k qd16", "IOPS"),
    Test("randwrite 4k qd16", "IOPS"),
]


def servers(python: str, workers: int, baseline: str = "") -> list[Server]:
    ours = [python, "-m", "nbdproto", "serve", "{image}", "--port", "{port}", "--host", "127.0.0.1"]
    nbdkit = ["nbdkit", "-f", "--exit-with-parent", "-p", "{port}", "-i", "127.0.0.1", "file", "{image}"]
    qemu = ["qemu-nbd", "-f", "raw", "-t", "-p", "{port}", "-b", "127.0.0.1", "--shared=16", "-x", "", "{image}"]
    plain = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain_server.py"), "{image}", "{port}"]
    found = [Server("nbdkit file", nbdkit, "nbdkit"), Server("qemu-nbd", qemu, "qemu-nbd")]
    found.append(Server("python floor", plain, python))
    loops = ["asyncio", "trio"]
    if _imports(python, "uvloop"):
        loops.insert(1, "uvloop")
    backends = [("threads", ["--backend", "threads"])]
    backends += [(f"anyio {loop}", ["--backend", "anyio", "--loop", loop]) for loop in loops]
    for name, options in backends:
        for count in sorted({1, workers}):
            label = f"{name}, {count} workers" if count > 1 else name
            found.append(Server(label, [*ours, *options, "--workers", str(count)], python))
    # The mode for clients with one request at a time (bench/bench_qd1.sh varies it).
    busy = ["--backend", "threads", "--busy-poll", "200", "--workers", "1"]
    found.insert(4, Server("threads --busy-poll 200", [*ours, *busy], python))
    if not baseline:
        return found
    paired: list[Server] = []
    for server in found:
        paired.append(server)
        if server.command[:3] == [python, "-m", "nbdproto"]:
            loop = server.command[server.command.index("--loop") + 1] if "--loop" in server.command else None
            if loop not in (None, "asyncio") and not _imports(baseline, loop):
                continue  # the older installation lacks this event loop: no "before" row for it
            before = [baseline, *server.command[1:]]
            paired.append(Server(f"{server.label} (before)", before, baseline))
    return paired


def _imports(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, cwd="/").returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tree_cpu(pid: int) -> float:
    """Seconds of CPU used by ``pid`` and its children, living (workers) and reaped."""
    total = 0
    for each in [pid, *children(pid)]:
        try:
            with open(f"/proc/{each}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


@contextmanager
def running(server: Server, image: str, startup: float = 30.0) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    command = [part.replace("{image}", image).replace("{port}", str(port)) for part in server.command]
    proc = subprocess.Popen(command, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    uri = f"nbd://127.0.0.1:{port}/"
    try:
        deadline = wait_answering(uri, proc, server.label, startup)
        if "--workers" in command:  # every worker serving: their count of children
            want = int(command[command.index("--workers") + 1])
            while want > 1 and len(children(proc.pid)) < want and time.monotonic() < deadline:
                time.sleep(0.05)
        yield proc, uri
    finally:
        with_timeout_stop(proc)


def wait_answering(
    uri: str, proc: subprocess.Popen[bytes], label: str, startup: float = 30.0, env: dict[str, str] | None = None
) -> float:
    """Wait until nbdinfo gets the size of ``uri`` from ``proc``'s server, for ``startup`` seconds at most (then,
    or when the server died, RuntimeError with what it wrote on stderr, if piped). Returns the deadline."""
    deadline = time.monotonic() + startup
    while subprocess.run(["nbdinfo", "--size", uri], capture_output=True, env=env).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            error = proc.stderr.read().decode(errors="replace") if proc.poll() is not None and proc.stderr else ""
            raise RuntimeError(f"{label} did not start within {startup} s: {error.strip()}")
        time.sleep(0.1)
    return deadline


def with_timeout_stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


def client_cpu() -> float:
    """CPU seconds of this process's finished children: the clients (nbdcopy, fio), each waited for before the
    next is measured; the servers are still running while they are measured, so they are not in it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(test: Test, uri: str, pid: int, source: str, runtime: int) -> tuple[float, float, float]:
    """The test's figure, and the CPU microseconds per request (for copies: per MiB) of the server and of the
    client (on a machine whose cores client and server share, the two together decide the throughput)."""
    before, client_before, started = tree_cpu(pid), client_cpu(), time.monotonic()
    if test.name.startswith("nbdcopy"):
        ends = [uri, "null:"] if test.name.endswith("read") else [source, uri]
        subprocess.run(["nbdcopy", "--connections=4", *ends], check=True, capture_output=True, timeout=300)
        seconds = time.monotonic() - started
        figure = GIB / (1 << 20) / seconds
        per_mib = 1e6 / (GIB >> 20)
        return figure, (tree_cpu(pid) - before) * per_mib, (client_cpu() - client_before) * per_mib
    rw, _, depth = test.name.split()
    done = subprocess.run(["fio", "--name=x", "--ioengine=nbd", f"--uri={uri}", "--size=1g", f"--runtime={runtime}",
                           "--time_based", f"--rw={rw}", "--bs=4k", f"--iodepth={depth[2:]}",
                           "--output-format=terse", "--terse-version=3"],
                          check=True, capture_output=True, text=True, timeout=runtime + 60)  # fmt: skip
    fields = next(line for line in done.stdout.splitlines() if line.count(";") > 8).split(";")
    figure = float(fields[7] if rw == "randread" else fields[48])
    requests = max(1.0, figure * (time.monotonic() - started))
    return figure, (tree_cpu(pid) - before) * 1e6 / requests, (client_cpu() - client_before) * 1e6 / requests


def image(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if not os.path.exists(path) or os.path.getsize(path) != GIB:
        os.makedirs(directory, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(GIB >> 24):
                f.write(os.urandom(1 << 24))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--runtime", type=int, default=5, help="seconds of each fio test (default 5)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="N (default: the cores)")
    parser.add_argument("--only", default="", help="comma-separated label prefixes to run (default: all)")
    parser.add_argument("--tests", default="", help="comma-separated test name prefixes to run (default: all)")
    parser.add_argument("--dir", default="/dev/shm/nbdproto-bench", help="where the 1 GiB images are")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--baseline", default="", help="another installation's python: our servers again, before")
    parser.add_argument(
        "--plot",
        metavar="FILE.svg",
        help="also draw the table (ratios to nbdkit, CPU per request; needs the bench extra's matplotlib), with the"
        " figures saved beside it as FILE.json (bench/bench_plot.py draws them again)",
    )
    args = parser.parse_args()
    # The servers run from /: a python named by a relative path is made absolute first.
    args.python, args.baseline = (os.path.abspath(p) if os.sep in p else p for p in (args.python, args.baseline))
    if args.plot:
        import matplotlib  # noqa: F401  (missing: say so now, not after the whole run)
    for tool in ("nbdcopy", "nbdinfo", "fio"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    chosen = [s for s in servers(args.python, args.workers, args.baseline) if not args.only or s.label.startswith(
        tuple(args.only.split(",")))]  # fmt: skip
    missing = [s.label for s in chosen if shutil.which(s.tool) is None and not os.path.exists(s.tool)]
    if missing:
        print(f"left out (not installed): {', '.join(missing)}", file=sys.stderr)
    chosen = [s for s in chosen if s.label not in missing]
    served, source = image(args.dir, "served.img"), image(args.dir, "source.img")
    tests = [t for t in TESTS if not args.tests or t.name.startswith(tuple(args.tests.split(",")))]
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for round_ in range(args.rounds):
        for server in chosen if round_ % 2 == 0 else chosen[::-1]:
            with running(server, served) as (proc, uri):
                for test in tests:
                    figure, cpu, client = measure(test, uri, proc.pid, source, args.runtime)
                    results.setdefault((server.label, test.name), []).append((figure, cpu, client))
                    per = "MiB" if test.unit == "MiB/s" else "request"
                    print(f"round {round_ + 1}\t{server.label}\t{test.name}\t{figure:.0f} {test.unit}\t"
                          f"{cpu:.1f} us CPU/{per}\tclient {client:.1f} us CPU/{per}",
                          file=sys.stderr, flush=True)  # fmt: skip
    print_table(chosen, tests, results, args)
    if args.plot:
        save_plot(args, chosen, tests, results)
    return 0


def save_plot(
    args: argparse.Namespace,
    chosen: list[Server],
    tests: list[Test],
    results: dict[tuple[str, str], list[tuple[float, float, float]]],
) -> None:
    from bench_plot import plot, results_document

    medians = {
        key: (
            statistics.median(f[0] for f in got),
            statistics.median(f[1] for f in got),
            statistics.median(f[2] for f in got),
        )
        for key, got in results.items()
    }
    options = " ".join(arg for arg in sys.argv[1:] if not arg.startswith("--plot") and arg != args.plot)
    how = f"bench/bench_table.py {options}: medians of {args.rounds} round(s), load average {os.getloadavg()[0]:.1f}"
    document = results_document([s.label for s in chosen], [(t.name, t.unit) for t in tests], medians, how)
    with open(os.path.splitext(args.plot)[0] + ".json", "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    plot(document, args.plot)
    print(f"drawn: {args.plot}", file=sys.stderr)


def ratio_range(
    results: Mapping[tuple[str, str], Sequence[tuple[float, ...]]], label: str, base: str | None, test: str
) -> str:
    """The range of ``label``'s ratio to ``base`` over the rounds, each round's figure (the first field) against
    ``base``'s of the same round, as " [lo-hi]"; "" with fewer than two rounds of both (or no ``base``)."""
    if base is None:
        return ""
    ours, theirs = results.get((label, test), []), results.get((base, test), [])
    ratios = [mine[0] / ref[0] for mine, ref in zip(ours, theirs, strict=False) if ref[0]]
    return f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else ""


def print_table(
    chosen: list[Server],
    tests: list[Test],
    results: dict[tuple[str, str], list[tuple[float, float, float]]],
    args: object,
) -> None:
    def median(label: str, test: str, index: int) -> float | None:
        got = results.get((label, test))
        return statistics.median(figures[index] for figures in got) if got else None

    base = chosen[0].label if chosen and chosen[0].label == "nbdkit file" else None
    head = ["server", *(f"{t.name} ({t.unit})" for t in tests)]
    rows = [head]
    for server in chosen:
        row = [server.label]
        for test in tests:
            figure, cpu, client = (median(server.label, test.name, i) for i in range(3))
            if figure is None or cpu is None or client is None:
                row.append("-")
                continue
            cell = f"{figure:.0f}"
            ref, ref_cpu, ref_client = (median(base, test.name, i) for i in range(3)) if base else (None,) * 3
            if ref and ref_cpu and ref_client and server.label != base:
                spread = ratio_range(results, server.label, base, test.name)
                cell += f" ({figure / ref:.2f}x{spread}, cpu {cpu / ref_cpu:.2f}x, client {client / ref_client:.2f}x)"
            else:
                cell += f" (cpu {cpu:.0f} us, client {client:.0f} us)"
            row.append(cell)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    print()
    print(f"medians of {getattr(args, 'rounds', 1)} round(s); ratios to nbdkit's file plugin: the figure (and its range"
          " over the rounds), the"
          " server's CPU per request (per MiB for copies; below 1 is cheaper), and the client's (nbdcopy's or"
          " fio's) against this server")  # fmt: skip
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
