"""TLS side by side: nbdkit (`--tls=require`, the file plugin) against our two servers (the threads backend and
the anyio backend on asyncio), the same certificates, the same tmpfs image, the same clients; and OpenSSL's
own cost as the floor.

    .venv/bin/python bench/bench_tls.py                              # one round, every test
    .venv/bin/python bench/bench_tls.py --rounds 3 --runtime 8
    .venv/bin/python bench/bench_tls.py --size 256M --rounds 1 --runtime 2   # a quick look
    .venv/bin/python bench/bench_tls.py --baseline ../before/.venv/bin/python   # ours before and after

The tests: nbdcopy reads and writes of the whole export with --connections=4 over nbds:// (the CA trusted with
the URI's tls-certificates=DIR), and fio's nbd engine, 4 KiB random reads and writes at queue depth 16. fio's
URIs may not name local files, so fio finds the CA where libnbd looks when a URI names none ($HOME/.pki/libnbd/,
with HOME set to a directory made for the run). Beside each figure: the server's CPU per GiB (copies) or per
request (fio), user and system, read from /proc before and after, and the ratios of both to nbdkit's. Servers
are started afresh for each round, in an order reversed every other round, each waited for (bounded) with
nbdinfo and stopped after. With several rounds, each cell is the median.

The floor: `openssl speed -evp` of the cipher the connections negotiate (found with LIBNBD_DEBUG's line about
the connection) at 16 KiB, a whole record, encrypting (what a server does for reads) and decrypting (writes):
the CPU that a GiB through TLS costs at the very least, and each server's CPU per GiB against it.

The certificates are made with trustme (the test extra). Needs nbdkit, nbdcopy, nbdinfo (libnbd-bin), fio and
openssl; a server whose tool is missing is left out and said so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_table import GIB, free_port, image, ratio_range, tree_cpu, wait_answering, with_timeout_stop


@dataclass(frozen=True)
class Server:
    label: str
    command: list[str]  # {image}, {port} and {pki} are filled in
    tool: str


TESTS = ["nbdcopy read", "nbdcopy write", "randread 4k qd16", "randwrite 4k qd16"]


def servers(python: str, baseline: str = "") -> list[Server]:
    nbdkit = ["nbdkit", "-f", "--exit-with-parent", "-p", "{port}", "-i", "127.0.0.1", "--tls=require",
              "--tls-certificates={pki}", "file", "{image}"]  # fmt: skip
    tls = ["--tls", "require", "--tls-cert", "{pki}/server-cert.pem", "--tls-key", "{pki}/server-key.pem"]
    found = [Server("nbdkit file", nbdkit, "nbdkit")]
    for label, options in (
        ("threads", ["--backend", "threads"]),
        ("anyio asyncio", ["--backend", "anyio", "--loop", "asyncio"]),
    ):
        for name, py in ((label, python), *(((f"{label} (before)", baseline),) if baseline else ())):
            command = [py, "-m", "nbdproto", "serve", "{image}", "--port", "{port}", "--host", "127.0.0.1", *tls]
            found.append(Server(name, [*command, *options], py))
    return found


def make_certificates(directory: str) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1, under the names nbdkit, qemu and libnbd read."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(os.path.join(directory, "ca-cert.pem"))
    server.private_key_pem.write_to_path(os.path.join(directory, "server-key.pem"))
    server.cert_chain_pems[0].write_to_path(os.path.join(directory, "server-cert.pem"))
    # Where libnbd looks for a CA when the URI names no directory ($HOME/.pki/libnbd): fio's URIs cannot.
    home = os.path.join(directory, "home", ".pki", "libnbd")
    os.makedirs(home)
    shutil.copy(os.path.join(directory, "ca-cert.pem"), home)


@contextmanager
def running(server: Server, served: str, pki: str, startup: float = 30.0) -> Iterator[tuple[int, str]]:
    port = free_port()
    fill = {"{image}": served, "{port}": str(port), "{pki}": pki}
    command = [re.sub("|".join(map(re.escape, fill)), lambda m: fill[m.group(0)], part) for part in server.command]
    proc = subprocess.Popen(command, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    uri = f"nbds://127.0.0.1:{port}/"
    try:
        wait_answering(trusting(uri, pki), proc, server.label, startup)
        yield proc.pid, uri
    finally:
        with_timeout_stop(proc)


def trusting(uri: str, pki: str) -> str:
    return f"{uri}?tls-certificates={pki}"


def negotiated_cipher(uri: str, pki: str) -> str:
    """The cipher libnbd reports for a connection to ``uri`` ("AES-256-GCM"), or "?"."""
    done = subprocess.run(["nbdinfo", "--size", trusting(uri, pki)], capture_output=True, text=True,
                          env={**os.environ, "LIBNBD_DEBUG": "1"}, timeout=30)  # fmt: skip
    found = re.search(r"connection is using TLS: cipher (\S+)", done.stderr)
    return found.group(1) if found else "?"


def openssl_speed(cipher: str, decrypt: bool) -> float | None:
    """OpenSSL's MB/s (10^6 bytes) for ``cipher`` (GnuTLS's name, "AES-256-GCM") at 16 KiB blocks."""
    if shutil.which("openssl") is None:
        return None
    command = ["openssl", "speed", "-seconds", "1", "-bytes", "16384", "-evp", cipher.lower()]
    if decrypt:
        command.insert(2, "-decrypt")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    for line in done.stdout.splitlines():
        if line.upper().startswith(cipher.upper()):
            return float(line.split()[-1].rstrip("k")) / 1000
    return None


def measure(test: str, uri: str, pid: int, pki: str, source: str, size: int, runtime: int) -> tuple[float, float]:
    """The test's figure (MiB/s, or IOPS) and the server's CPU: ms per GiB for copies, us per request for fio."""
    before, started = tree_cpu(pid), time.monotonic()
    if test.startswith("nbdcopy"):
        ends = [trusting(uri, pki), "null:"] if test.endswith("read") else [source, trusting(uri, pki)]
        subprocess.run(["nbdcopy", "--connections=4", *ends], check=True, capture_output=True, timeout=600)
        seconds = time.monotonic() - started
        return size / (1 << 20) / seconds, (tree_cpu(pid) - before) * 1e3 * GIB / size
    rw, _, depth = test.split()
    home = os.path.join(pki, "home")
    done = subprocess.run(["fio", "--name=x", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
                           f"--runtime={runtime}", "--time_based", f"--rw={rw}", "--bs=4k", f"--iodepth={depth[2:]}",
                           "--output-format=terse", "--terse-version=3"], env={**os.environ, "HOME": home},
                          check=True, capture_output=True, text=True, timeout=runtime + 60)  # fmt: skip
    fields = next(line for line in done.stdout.splitlines() if line.count(";") > 8).split(";")
    figure = float(fields[7] if rw == "randread" else fields[48])
    requests = max(1.0, figure * (time.monotonic() - started))
    return figure, (tree_cpu(pid) - before) * 1e6 / requests


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--runtime", type=int, default=5, help="seconds of each fio test (default 5)")
    parser.add_argument("--size", default="1G", help="the image's size, copied whole by nbdcopy (default 1G)")
    parser.add_argument("--only", default="", help="comma-separated label prefixes to run (default: all)")
    parser.add_argument("--tests", default="", help="comma-separated test name prefixes to run (default: all)")
    parser.add_argument("--dir", default="/dev/shm/nbdproto-bench-tls", help="where the images are")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--baseline", default="", help="another installation's python: our servers again, before")
    args = parser.parse_args()
    args.python, args.baseline = (os.path.abspath(p) if os.sep in p else p for p in (args.python, args.baseline))
    for tool in ("nbdcopy", "nbdinfo", "fio"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    size = parse_size(args.size)
    chosen = [s for s in servers(args.python, args.baseline) if not args.only or s.label.startswith(
        tuple(args.only.split(",")))]  # fmt: skip
    missing = [s.label for s in chosen if shutil.which(s.tool) is None and not os.path.exists(s.tool)]
    if missing:
        print(f"left out (not installed): {', '.join(missing)}", file=sys.stderr)
    chosen = [s for s in chosen if s.label not in missing]
    tests = [t for t in TESTS if not args.tests or t.startswith(tuple(args.tests.split(",")))]
    served, source = sized_image(args.dir, "served.img", size), sized_image(args.dir, "source.img", size)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ciphers: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="nbdproto-bench-pki-") as pki:
        make_certificates(pki)
        for round_ in range(args.rounds):
            for server in chosen if round_ % 2 == 0 else chosen[::-1]:
                with running(server, served, pki) as (pid, uri):
                    ciphers.setdefault(server.label, negotiated_cipher(uri, pki))
                    for test in tests:
                        figure, cpu = measure(test, uri, pid, pki, source, size, args.runtime)
                        results.setdefault((server.label, test), []).append((figure, cpu))
                        unit, per = (
                            ("MiB/s", "ms CPU/GiB") if test.startswith("nbdcopy") else ("IOPS", "us CPU/request")
                        )
                        print(f"round {round_ + 1}\t{server.label}\t{test}\t{figure:.0f} {unit}\t{cpu:.1f} {per}",
                              file=sys.stderr, flush=True)  # fmt: skip
    print_table(chosen, tests, results, args.rounds)
    print_floor(chosen, results, ciphers)
    return 0


def sized_image(directory: str, name: str, size: int) -> str:
    if size == GIB:
        return image(directory, name)  # bench_table's, made the same way
    path = os.path.join(directory, name)
    if not os.path.exists(path) or os.path.getsize(path) != size:
        os.makedirs(directory, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(0, size, 1 << 24):
                f.write(os.urandom(min(1 << 24, size)))
    return path


def median(results: dict[tuple[str, str], list[tuple[float, float]]], label: str, test: str, i: int) -> float | None:
    got = results.get((label, test))
    return statistics.median(figures[i] for figures in got) if got else None


def print_table(
    chosen: list[Server], tests: list[str], results: dict[tuple[str, str], list[tuple[float, float]]], rounds: int
) -> None:
    base = "nbdkit file" if any(s.label == "nbdkit file" for s in chosen) else None
    head = ["server", *(f"{t} ({'MiB/s' if t.startswith('nbdcopy') else 'IOPS'})" for t in tests)]
    rows = [head]
    for server in chosen:
        row = [server.label]
        for test in tests:
            figure, cpu = median(results, server.label, test, 0), median(results, server.label, test, 1)
            if figure is None or cpu is None:
                row.append("-")
                continue
            ref, ref_cpu = (median(results, base, test, i) for i in range(2)) if base else (None, None)
            unit = "ms/GiB" if test.startswith("nbdcopy") else "us/req"
            cell = f"{figure:.0f} (cpu {cpu:.0f} {unit}" if unit == "ms/GiB" else f"{figure:.0f} (cpu {cpu:.1f} {unit}"
            if ref and ref_cpu and server.label != base:
                cell += (
                    f"; {figure / ref:.2f}x{ratio_range(results, server.label, base, test)}, cpu {cpu / ref_cpu:.2f}x"
                )
            row.append(cell + ")")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    print()
    print(f"medians of {rounds} round(s), TLS (nbds://, x509); ratios to nbdkit's file plugin: the figure (and its"
          " range over the rounds), and the"
          " server's CPU per GiB (copies) or per request (fio; below 1 is cheaper)")  # fmt: skip
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_floor(
    chosen: list[Server], results: dict[tuple[str, str], list[tuple[float, float]]], ciphers: dict[str, str]
) -> None:
    negotiated = sorted(set(ciphers.values()) - {"?"})
    print()
    print(f"negotiated: {', '.join(f'{label}: {cipher}' for label, cipher in ciphers.items())}")
    for cipher in negotiated or ["AES-128-GCM"]:
        floors = {}
        for test, decrypt in (("nbdcopy read", False), ("nbdcopy write", True)):
            speed = openssl_speed(cipher, decrypt)
            if speed is None:
                print(f"openssl speed -evp {cipher.lower()}: not measured")
                continue
            floors[test] = GIB / (speed * 1e6) * 1e3  # ms of CPU per GiB
            way = "decrypting (writes)" if decrypt else "encrypting (reads)"
            print(f"floor: openssl speed -evp {cipher.lower()}, 16 KiB blocks, {way}: {speed:.0f} MB/s ="
                  f" {floors[test]:.0f} ms CPU/GiB")  # fmt: skip
        for server in chosen:
            cells = []
            for test, floor in floors.items():
                cpu = median(results, server.label, test, 1)
                if cpu is not None:
                    cells.append(f"{test} {cpu:.0f} ms/GiB = {cpu / floor:.1f}x the floor")
            if cells and ciphers.get(server.label) in (cipher, None):
                print(f"  {server.label}: {'; '.join(cells)}")


if __name__ == "__main__":
    sys.exit(main())
