"""Differential testing of nbdproto.libnbd against libnbd's own Python binding.

The same script text runs twice: under /usr/bin/python3 with ``import nbd`` (Debian's python3-libnbd, libnbd
1.14) and under this interpreter with ``from nbdproto import libnbd as nbd``, each in a worker process
(tests/libnbd_worker.py) that stays up for the session, so a script costs an exec, not an interpreter start.
A script records what it sees with ``rec(...)``, ``attempt(label, fn, *args)`` (the result, or the exception's
type, errno and the call its message names) and ``recorder(label)`` callbacks; the traces must be equal.

Servers: a script that connects with ``connect_command`` gets a fresh server each time; for a server on a
socket the test passes a ``server`` factory (a context manager yielding the script's PARAMS) that is entered
once per side, so both sides start from the same state.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from tests.conftest import PEER_ENV, require_peers

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libnbd_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))
SCRIPT_TIMEOUT = 30.0
"""Seconds one script may take on one side (a hang fails the test, and the worker is replaced)."""

Params = dict[str, Any]
ServerFactory = Callable[[], AbstractContextManager[Params]]


class Worker:
    """One worker process (``real`` or ``ours``)."""

    def __init__(self, implementation: str) -> None:
        self.implementation = implementation
        python = "/usr/bin/python3" if implementation == "real" else sys.executable
        env = {**PEER_ENV, "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen(
            [python, WORKER, implementation],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            cwd=ROOT,
        )

    def run(self, script: str, params: Params, timeout: float = SCRIPT_TIMEOUT) -> dict[str, Any]:
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        if proc.poll() is not None:
            raise AssertionError(f"the {self.implementation} worker exited with status {proc.returncode}")
        proc.stdin.write((json.dumps({"script": script, "params": params}) + "\n").encode())
        proc.stdin.flush()
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            if not ready:
                self.close()
                raise AssertionError(f"the {self.implementation} side did not finish within {timeout} s")
            chunk = os.read(proc.stdout.fileno(), 1 << 20)
            if not chunk:
                raise AssertionError(f"the {self.implementation} worker died (status {proc.wait(5)})")
            line += chunk
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class Workers:
    """Both workers, started on first use and restarted after a failure."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}

    def get(self, implementation: str) -> Worker:
        worker = self._workers.get(implementation)
        if worker is None or worker.proc.poll() is not None:
            worker = self._workers[implementation] = Worker(implementation)
        return worker

    def run(self, implementation: str, script: str, params: Params) -> dict[str, Any]:
        try:
            return self.get(implementation).run(script, params)
        except AssertionError:
            self._workers.pop(implementation, None)
            raise

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()


@contextlib.contextmanager
def no_server() -> Iterator[Params]:
    yield {}


class Differ:
    """``differ.run(script, server=...)``: the script on both sides; returns both results for more checks."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers

    def both(self, script: str, server: ServerFactory = no_server, **params: Any) -> tuple[dict[str, Any], ...]:
        results = []
        for implementation in ("real", "ours"):
            with server() as extra:
                results.append(self.workers.run(implementation, script, {**params, **extra}))
        return tuple(results)

    def same(self, script: str, server: ServerFactory = no_server, **params: Any) -> list[Any]:
        """Run on both sides and assert the traces are equal; returns the trace."""
        real, ours = self.both(script, server, **params)
        assert ours["trace"] == real["trace"], _explain(real["trace"], ours["trace"])
        assert real["trace"], "the script recorded nothing"
        return list(real["trace"])


def _explain(real: list[Any], ours: list[Any]) -> str:
    lines = ["traces differ (real libnbd | nbdproto.libnbd):"]
    for index in range(max(len(real), len(ours))):
        left = real[index] if index < len(real) else "<none>"
        right = ours[index] if index < len(ours) else "<none>"
        mark = "  " if left == right else "!="
        lines.append(f"{mark} {index}: {left!r} | {right!r}")
    return "\n".join(lines)


def require_binding(*tools: str) -> None:
    """The real binding (python3-libnbd for /usr/bin/python3), and any other tools the test needs: skipped
    locally when missing, a failure under NBDPROTO_REQUIRE_PEERS=1."""
    require_peers("nbdsh", *tools)


@pytest.fixture(scope="session")
def libnbd_workers() -> Iterator[Workers]:
    workers = Workers()
    try:
        yield workers
    finally:
        workers.close()
