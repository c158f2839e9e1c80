"""What a filter adds to a server's CPU time per request, measured in one process (no sockets, no client).

Each round carries out the same 4 KiB reads at random offsets of a file on tmpfs with
``nbdproto.serving.carry_out_all``, as both servers do for a device served inline: once on the device itself and
once through each filter, in a shuffled order, so that every comparison is made side by side. Reads are answered
with the device's read views where it offers them (plaintext connections), or with ``pread_into`` as over TLS
(``--no-views``). The best of many short rounds is reported, in microseconds per request, with its ratio to the
device alone: on a busy machine the best round is the one least disturbed, which this finds far more steadily than
fio over loopback.

    python bench/bench_filters.py [--image /dev/shm/nb/ours.img] [--requests 20000] [--rounds 25] [--no-views]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from typing import Any

import nbdproto as n
import nbdproto.serving
from nbdproto.devices import DelayFilter, ErrorFilter, FileDevice, Filter, LogFilter, ReadOnlyFilter, StatsFilter


class Forwarding(Filter):
    """What a pass-through costs when each call is a method of the filter calling the inner device's (the
    Filter base avoids this by handing out the inner device's own bound methods)."""

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.inner.pread_into(buffer, offset)

    def read_view(self, offset: int, length: int) -> Any:
        return self.inner.read_view(offset, length)  # type: ignore[attr-defined]


VARIANTS: dict[str, Callable[[Any], Any]] = {
    "none": lambda device: device,
    "forwarding": Forwarding,
    "delay (zero)": DelayFilter,
    "readonly": ReadOnlyFilter,
    "error (writes)": lambda device: ErrorFilter(device, commands=["write"]),
    "error (rate 0)": lambda device: ErrorFilter(device, rate=0),
    "stats": StatsFilter,
    "log": lambda device: LogFilter(device, os.devnull),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="/dev/shm/nb/ours.img")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--no-views", action="store_true", help="answer reads with pread_into, as over TLS")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    device = FileDevice(args.image, read_only=True)
    rng = random.Random(1)
    blocks = device.size // 4096
    requests = [n.ReadRequest(i, rng.randrange(blocks) * 4096, 4096) for i in range(args.requests)]
    contexts = {1: n.BASE_ALLOCATION}
    names = args.variants.split(",")
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        rng.shuffle(names)  # no variant always runs first (after another's garbage) or last
        for name in names:
            served = VARIANTS[name](device)
            view = None if args.no_views else n.serving.read_view_of(served)
            start = time.perf_counter()
            for i in range(0, len(requests), 64):  # a batch per receive, as the servers take them
                n.serving.carry_out_all(served, requests[i : i + 64], contexts, None, view)
            elapsed = (time.perf_counter() - start) / len(requests)
            best[name] = min(best.get(name, elapsed), elapsed)
    print(f"4 KiB reads, {'pread_into' if args.no_views else 'read views where offered'}, best of {args.rounds}")
    print("filter\tus/request\tratio to none")
    for name in args.variants.split(","):
        print(f"{name}\t{best[name] * 1e6:.3f}\t{best[name] / best['none']:.3f}")
    device.close()


if __name__ == "__main__":
    main()
