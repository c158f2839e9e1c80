"""Fuzz our servers with as many mutated client streams as you like (tests/test_fuzz.py runs a few thousand).

    .venv/bin/python bench/fuzz_servers.py --cases 1000000 [--backend threads|asyncio|trio] [--first SEED]
        [--parallel N]

Every case is reproducible from its seed (tests/fuzzstreams.py). A case that hangs past its timeout, a server
that logs a bug (ERROR), or a server that stops serving a well-behaved client is reported with the seed and
ends the run with a non-zero status.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbdproto.devices import MemoryDevice
from tests.serving import BACKENDS, Export, serve_exports
from tests.test_fuzz import run_case


class _Bugs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--backend", choices=BACKENDS, default="threads")
    parser.add_argument("--parallel", type=int, default=8, help="cases in flight at once")
    args = parser.parse_args()
    bugs = _Bugs()
    logging.getLogger().addHandler(bugs)
    started = time.monotonic()
    with serve_exports(args.backend, {"": Export(MemoryDevice(1 << 20))}) as base:
        address = ("127.0.0.1", int(base.split(":")[2].split("/")[0]))
        seeds = range(args.first, args.first + args.cases)
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            for done, (seed, failure) in enumerate(pool.map(lambda s: _case(address, s), seeds), 1):
                if failure is not None:
                    print(f"case {seed}: {failure!r}")
                    return 1
                if bugs.records:
                    print(f"around case {seed}: the server logged {bugs.records[0].getMessage()!r}")
                    return 1
                if done % 10_000 == 0:
                    print(f"{done} cases, {done / (time.monotonic() - started):.0f}/s", flush=True)
        run_case(address, args.first)  # still serving
    print(f"{args.cases} cases against {args.backend}: no hang, no bug, {time.monotonic() - started:.0f} s")
    return 0


def _case(address: tuple[str, int], seed: int) -> tuple[int, BaseException | None]:
    try:
        run_case(address, seed)
    except BaseException as exc:
        return seed, exc
    return seed, None


if __name__ == "__main__":
    sys.exit(main())
