"""Run many ``nbdproto`` command lines quickly: each in a process forked from one that imported nbdproto, the
servers and the event loops once (a fresh interpreter spends about 0.3 s on that; a fork, milliseconds).

Each forked process runs ``nbdproto.cli.main(argv)`` exactly as ``python -m nbdproto`` does after its
imports, with /dev/null as standard input and output and the test's standard error; the tests that must show
the real start-up (``--fork``, ``--exit-with-parent``, ``--run``, socket activation) run ``python -m nbdproto``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.conftest import PEER_ENV

__all__ = ["ForkServer"]

_CODE = r"""
import json, os, sys, traceback
import anyio, anyio._backends._asyncio, nbdproto.cli, nbdproto.cli._serve, nbdproto_anyio, nbdproto_threads
try:
    import uvloop
except ImportError:
    pass
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "wait":
        _, status = os.waitpid(request["pid"], 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    try:
        code = nbdproto.cli.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)
"""


class ForkServer:
    """``start(argv)`` runs ``nbdproto ARGV`` in a forked process and returns its pid; ``wait(pid)`` its exit
    status. One request at a time (``wait`` blocks the next ``start``)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=PEER_ENV
        )

    def _ask(self, request: dict[str, Any]) -> int:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork server exited with status {self._proc.wait()}")
        return int(answer)

    def start(self, argv: list[str]) -> int:
        return self._ask({"op": "start", "argv": argv})

    def wait(self, pid: int) -> int:
        return self._ask({"op": "wait", "pid": pid})

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(30)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
