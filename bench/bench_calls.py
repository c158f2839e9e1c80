"""How many calls our servers make for each request of a client that sends one at a time (or a few: --depth):
Python functions (each resumption of a generator or coroutine counts as one) and built-in ones, counted by a
profile hook.

Unlike a time, a count does not move with the machine's load: on a shared machine whose speed moves by a fifth
within minutes, two versions of the code whose QD1 figures cannot be told apart (bench/bench_qd1.sh,
bench/bench_table.py) can still be compared call for call. A count is not a cost (a call of ``len`` is not a
turn of the event loop), so read it beside the timed benchmarks, never instead of them.

The server runs in this process, serving a file; a client process (a few lines of struct and socket, as fio
would send) reads 4 KiB at random offsets one request at a time, first some to warm up, then ``--requests``
while the hook counts. Every thread the server starts after the hook is set is counted (the threads server's
session thread), and on anyio the event loop's own calls are part of what a request costs.

The client pauses 0.2 ms before each request (each batch of ``--depth``), so that the server has answered
everything and waits for the next. How often a server finds the next request there already when it asks
depends on how fast its client turns round (on a loaded machine, often), and each wait costs turns of an event
loop; so these are the counts of a server that waits for every request, and one whose client is quicker makes
fewer calls on anyio.

    python bench/bench_calls.py [--requests 20000] [--depth 1] [--write] [--backends threads,asyncio,uvloop,trio]
        [IMAGE]

``--depth 16`` sends 16 requests together and then takes their replies (as fio at QD16, in lock-step), and
``--write`` makes them 4 KiB writes, into IMAGE.

IMAGE belongs on tmpfs (the default one is in /dev/shm): the anyio server reads a file on a disk in worker
threads, not on its one-request road, and its counts are then of that road instead.

Compare two versions by running it with each on PYTHONPATH, one after the other: the counts repeat.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import multiprocessing.process
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

import nbdproto_threads
from nbdproto import ExportSpec
from nbdproto.devices import FileDevice

_WARM_UP = 512
_PAUSE = 0.0002
"""Seconds the client waits before each batch: the server has answered the last one and waits (module docstring)."""


class EventLike(Protocol):
    """threading.Event or multiprocessing's."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class Workload:
    """What the client sends: ``requests`` 4 KiB reads (writes if ``write``), ``depth`` at a time."""

    requests: int
    depth: int = 1
    write: bool = False


class CallCounter:
    """A profile hook (sys.setprofile, threading.setprofile) that counts calls while ``counting`` is set; with
    ``by_name``, each function's too (``names``: Python functions by file and qualified name, which is the name
    alone before Python 3.11, and built-in ones by qualified name)."""

    def __init__(self, by_name: bool = False) -> None:
        self.counting = False
        self.python = 0
        self.builtin = 0
        self.names: collections.Counter[tuple[str, str]] | None = collections.Counter() if by_name else None

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if self.counting:
            names = self.names
            if event == "call":
                self.python += 1
                if names is not None:
                    code = frame.f_code
                    name = getattr(code, "co_qualname", code.co_name)
                    names[("python", f"{code.co_filename.rsplit('/', 1)[-1]}:{name}")] += 1
            elif event == "c_call":
                self.builtin += 1
                if names is not None:
                    names[("built-in", getattr(arg, "__qualname__", str(arg)))] += 1


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def _client(port: int, workload: Workload, size: int, started: EventLike, go: EventLike) -> None:
    """A client as fio's: fixed newstyle, NBD_OPT_GO, then simple replies to ``workload.depth`` requests at a
    time (sent together, then their replies received)."""
    rng = random.Random(1)
    blocks = size // 4096
    payload = rng.randbytes(4096)
    command, reply = (1, 16) if workload.write else (0, 16 + 4096)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _exactly(sock, 18)  # NBDMAGIC, IHAVEOPT, the handshake flags
        sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE, NO_ZEROES
        go_option = struct.pack(">IH", 0, 0)  # the default export, no information asked for
        sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(go_option)) + go_option)
        while True:  # option replies until the ACK
            _, _, kind, length = struct.unpack(">QIII", _exactly(sock, 20))
            _exactly(sock, length)
            if kind == 1:
                break
            if kind & 0x80000000:
                raise ConnectionError(f"NBD_OPT_GO refused ({kind:#x})")

        def requests(count: int) -> None:
            for first in range(0, count, workload.depth):
                time.sleep(_PAUSE)
                batch = min(workload.depth, count - first)
                headers = [
                    struct.pack(">IHHQQI", 0x25609513, 0, command, first + i, rng.randrange(blocks) * 4096, 4096)
                    + (payload if workload.write else b"")
                    for i in range(batch)
                ]
                sock.sendall(b"".join(headers))
                _exactly(sock, reply * batch)

        requests(_WARM_UP)
        started.set()
        go.wait()
        requests(workload.requests)
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # NBD_CMD_DISC


@dataclass(frozen=True)
class _Run:
    """One count: the hook, and the client process with the events it sets and waits on."""

    counter: CallCounter
    client: multiprocessing.process.BaseProcess
    started: EventLike
    go: EventLike

    def measure(self) -> None:
        """Once the client has warmed up, count its requests, until it is done."""
        self.started.wait(60)
        self.counter.counting = True
        self.go.set()
        self.client.join(600)
        self.counter.counting = False


def count(backend: str, image: str, workload: Workload) -> tuple[float, float]:
    """Python and built-in calls a request, serving ``image`` on ``backend`` (threads, asyncio, uvloop, trio)."""
    device = FileDevice(image, read_only=not workload.write)
    export = ExportSpec(device, read_only=not workload.write)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    processes = multiprocessing.get_context("fork")
    started, go = processes.Event(), processes.Event()
    client = processes.Process(target=_client, args=(port, workload, device.size, started, go), daemon=True)
    run = _Run(CallCounter(), client, started, go)
    client.start()
    threading.setprofile(run.counter)
    sys.setprofile(run.counter)
    try:
        if backend == "threads":
            _serve_threads(export, listener, run)
        else:
            _serve_anyio(backend, export, listener, run)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        device.close()
    return run.counter.python / workload.requests, run.counter.builtin / workload.requests


def _serve_threads(export: ExportSpec[FileDevice], listener: socket.socket, run: _Run) -> None:
    server = nbdproto_threads.Server({"": export}, [listener])
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    sys.setprofile(None)  # this thread only waits: the server's threads are the ones counted
    run.measure()
    server.shutdown()
    serving.join(10)


def _serve_anyio(loop: str, export: ExportSpec[FileDevice], listener: socket.socket, run: _Run) -> None:
    import anyio
    import anyio.to_thread

    import nbdproto_anyio

    async def main() -> None:
        server = nbdproto_anyio.Server({"": export})
        listening = await nbdproto_anyio.listen(listener)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.serve, [listening])
            await anyio.to_thread.run_sync(run.measure)  # (a thread started after the hook: a handful of calls)
            await server.shutdown()

    if loop == "uvloop":
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", help="the file to serve (default: a 64 MiB file of random bytes)")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--backends", default="threads,asyncio,uvloop,trio")
    parser.add_argument("--depth", type=int, default=1, help="requests sent together (default 1)")
    parser.add_argument("--write", action="store_true", help="4 KiB writes (into IMAGE) instead of reads")
    args = parser.parse_args()
    workload = Workload(args.requests, args.depth, args.write)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as directory:
        image = args.image
        if image is None:
            image = os.path.join(directory, "image")
            with open(image, "wb") as f:
                f.write(random.Random(0).randbytes(64 << 20))
        print("backend\tPython calls a request\tbuilt-in calls a request")
        for backend in args.backends.split(","):
            python, builtin = count(backend, image, workload)
            print(f"{backend}\t{python:.1f}\t{builtin:.1f}", flush=True)


if __name__ == "__main__":
    main()
