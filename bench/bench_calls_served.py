"""How many calls `nbdproto serve` makes for each request of fio's nbd engine at queue depth 16: Python
functions and built-in ones, counted by a profile hook, as bench/bench_calls.py counts them for one request at a
time. This one runs the server as the command line does, so that what bench_calls.py cannot serve is counted
too: a proxy in front of nbdkit (``--upstream``), a server over TLS (``--tls``).

The server runs in a child process with the hook installed before anything else (every thread it starts is
counted), switched on by SIGUSR1 once the server answers and off by SIGUSR2 after fio's ``--requests``
requests; the child then writes its counts. The parent prints the calls a request, Python and built-in, and
the functions called most often (``--top``), each as calls a request.

What a request costs on its own repeats from run to run; what a burst of requests costs (a wake, a turn of a
loop) is shared by as many as arrive together, which the machine's load moves: counts move by a few calls a
request between runs, far less than timings do. A count is not a cost either: read it beside the timed
benchmarks (bench/bench_proxy.sh, bench/bench_tls.py), never instead of them.

    python bench/bench_calls_served.py [--requests 20000] [--rw randread|randwrite] [--bs 4k] [--top 30]
        [--upstream IMAGE | --image IMAGE] [--tls] [-- SERVE_OPTIONS...]

``--upstream IMAGE`` serves ``nbd://`` in front of ``nbdkit file IMAGE`` (a proxy: random writes change the
image); else ``--image IMAGE`` (default: a 1 GiB file in /dev/shm, made if missing) is served. fio's requests
span the image, up to 512 MiB of it, 4 KiB each unless ``--bs`` says otherwise (``--bs 256k --rw randwrite``:
writes of nbdcopy's size, which a server receives in place on tmpfs; no more requests than the span holds).
``--tls`` makes throwaway certificates (trustme) and serves with ``--tls require``; fio then connects over
nbds://. What follows ``--`` is passed to `nbdproto serve` (``--backend threads``, ``--backend anyio --loop
asyncio``). Needs fio and nbdinfo, and nbdkit for ``--upstream``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_STARTUP = 30.0  # seconds a server may take to answer


def _child(out: str, serve: list[str]) -> None:
    """The server, counting calls between SIGUSR1 and SIGUSR2, then writing them to ``out`` and leaving."""
    from bench_calls import CallCounter

    counter = CallCounter(by_name=True)
    names = counter.names
    assert names is not None

    def start(*_: object) -> None:
        names.clear()
        counter.counting = True

    def stop(*_: object) -> None:
        counter.counting = False
        with open(out, "w") as file:
            for (kind, name), count in names.items():
                file.write(f"{count}\t{kind}\t{name}\n")
        os._exit(0)

    threading.setprofile(counter)
    sys.setprofile(counter)
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from nbdproto.cli import main

    sys.exit(main(["serve", *serve]))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rw", choices=["randread", "randwrite"], default="randread")
    parser.add_argument("--bs", default="4k", help="fio's block size (default 4k; 256k: nbdcopy's requests)")
    parser.add_argument("--top", type=int, default=30, help="how many functions of each kind to list")
    parser.add_argument("--upstream", help="serve nbd:// in front of nbdkit's file plugin serving this image")
    parser.add_argument("--image", help="the image to serve (default: a 1 GiB file in /dev/shm)")
    parser.add_argument("--tls", action="store_true", help="serve over TLS, with throwaway certificates")
    parser.add_argument("serve", nargs="*", help="options for `nbdproto serve`, after --")
    args = parser.parse_args()
    from bench_table import free_port, image, wait_answering, with_timeout_stop
    from bench_tls import parse_size

    port = free_port()
    env = dict(os.environ)
    upstream = None
    with tempfile.TemporaryDirectory() as work:
        counts = os.path.join(work, "counts.tsv")
        if args.upstream:
            upstream_port = free_port()
            upstream = subprocess.Popen(
                ["nbdkit", "-f", "--exit-with-parent", "-p", str(upstream_port), "-i", "127.0.0.1", "file",
                 args.upstream], stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            source = f"nbd://127.0.0.1:{upstream_port}/"
            wait_answering(source, upstream, "nbdkit", _STARTUP, env)
        else:
            source = args.image or image("/dev/shm/nbdproto-bench-calls", "disk.img")
        serve = [source, "--port", str(port), "--host", "127.0.0.1", *args.serve]
        uri, query = f"nbd://127.0.0.1:{port}/", ""
        if args.tls:
            from bench_tls import make_certificates

            make_certificates(work)
            serve += ["--tls", "require", "--tls-cert", f"{work}/server-cert.pem"]
            serve += ["--tls-key", f"{work}/server-key.pem"]
            uri, query = f"nbds://127.0.0.1:{port}/", f"?tls-certificates={work}"
            env["HOME"] = os.path.join(work, "home")  # where libnbd finds the CA for fio's URI (bench_tls.py)
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", counts, *serve],
                                  cwd="/", stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            wait_answering(uri + query, server, "nbdproto serve", _STARTUP, env)
            server.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            size = min(512 << 20, os.path.getsize(args.upstream or source))
            # fio's random requests cover each block once: no more requests than the span has blocks.
            requests = args.requests = min(args.requests, size // parse_size(args.bs))
            subprocess.run(["fio", "--name=count", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
                            f"--number_ios={requests}", f"--rw={args.rw}", f"--bs={args.bs}", "--iodepth=16",
                            "--output-format=terse", "--terse-version=3"],
                           env=env, check=True, capture_output=True, timeout=600)  # fmt: skip
            server.send_signal(signal.SIGUSR2)
            server.wait(60)
        finally:
            with_timeout_stop(server)
            if upstream is not None:
                with_timeout_stop(upstream)
        with open(counts) as file:
            rows = [line.rstrip("\n").split("\t") for line in file]
    per = {kind: sum(int(n) for n, k, _ in rows if k == kind) / args.requests for kind in ("python", "built-in")}
    print(f"{args.requests} requests ({args.rw}, QD16): {per['python']:.1f} Python calls a request, "
          f"{per['built-in']:.1f} built-in")  # fmt: skip
    for shown in ("python", "built-in"):
        print(f"the {shown} calls made most often, a request:")
        ranked = sorted((row for row in rows if row[1] == shown), key=lambda row: -int(row[0]))
        for count, _, name in ranked[: args.top]:
            print(f"{int(count) / args.requests:7.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
