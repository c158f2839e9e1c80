"""The test command of bench/mutation.sh: a warm pytest process that forks a child per mutant.

mutmut (2.x) writes each mutant into the source file and runs its test command. A fresh ``python -m pytest``
spends a second or more importing pytest, hypothesis, anyio, trio and the rest before its first test, and a
module has hundreds of mutants. ``serve`` pays that once: it collects the tests (importing everything they
need), forgets every module it imported from the checkout (nbdproto, the backends, the tests), and forks a
child for each ``run``. The child imports the checkout afresh, so it sees the mutant on disk, and runs pytest
with the server's arguments.

``run`` is what mutmut runs: it exits 1 when the tests failed (the mutant is killed; a mutant that breaks an
import fails them too) and 0 when they passed (it survived). When mutmut gives up on a run (its time limit) it
kills ``run``, and the server then kills the child and everything it started (its process group).

The child runs first the tests that killed the latest mutants (mutants of one function tend to fail the same
test), and stops at the first failure: a killed mutant costs a collection and a test or two. Plugins are loaded
by name, not found by scanning every installed package's metadata each time.

    python bench/mutation_runner.py serve SOCKET MODULE -- PYTEST_ARGS   (in the checkout; until killed)
    python bench/mutation_runner.py run SOCKET
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import select
import signal
import socket
import sys

KILLED, SURVIVED = 1, 0
PLUGINS = ["-p", "hypothesis.extra.pytestplugin", "-p", "pytest_timeout", "-p", "anyio.pytest_plugin"]
KILLERS_KEPT = 64


class _KillersFirst:
    """A pytest plugin for the child: the tests in ``killers`` first (in that order), and the id of each test
    that fails written to ``report`` (a pipe to the server)."""

    def __init__(self, killers: list[str], report: int) -> None:
        self.rank = {nodeid: i for i, nodeid in enumerate(killers)}
        self.report = report

    def pytest_collection_modifyitems(self, items: list[object]) -> None:
        last = len(self.rank)
        items.sort(key=lambda item: self.rank.get(item.nodeid, last))  # type: ignore[attr-defined]

    def pytest_runtest_logreport(self, report: object) -> None:
        if report.failed:  # type: ignore[attr-defined]
            os.write(self.report, report.nodeid.encode() + b"\n")  # type: ignore[attr-defined]


def _forget_checkout(root: pathlib.Path) -> None:
    """Drop every module imported from ``root`` (or named like one of its packages) from sys.modules."""
    tops = {path.name.removesuffix(".py") for path in root.iterdir()}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        mine = file is not None and pathlib.Path(file).resolve().is_relative_to(root)
        if mine or name.split(".")[0] in tops:
            del sys.modules[name]


def _quietly(run: object) -> int:
    """Call ``run`` with stdout and stderr on /dev/null (the descriptors, which children inherit)."""
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        return int(run())  # type: ignore[operator]
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (null, *saved):
            os.close(fd)


def serve(path: str, module: str, pytest_args: list[str]) -> None:
    import pytest  # the server's whole point: imported once, here

    root = pathlib.Path.cwd().resolve()
    sys.path.insert(0, str(root))
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    # The collection leaves bytecode for the children to read (PYTHONDONTWRITEBYTECODE, set where this runs,
    # would have each of them compile the checkout and rewrite the tests' asserts again: most of its time).
    sys.dont_write_bytecode = False
    status = _quietly(lambda: pytest.main(["--collect-only", "-q", *PLUGINS, *pytest_args]))
    if status != 0:
        sys.exit(f"collecting {' '.join(pytest_args)} failed (exit {status})")
    _forget_checkout(root)
    # The module under mutation is compiled from its source every time: no cached bytecode of it may be read
    # (a mutant of the same size written within the same second would look up to date), and none is written.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(importlib.util.cache_from_source(str(root / module)))
    sys.dont_write_bytecode = True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    print(f"ready on {path}", flush=True)
    killers: list[str] = []
    while True:
        client, _ = listener.accept()
        with client:
            client.recv(16)
            code, failed = _one_run(client, pytest_args, killers)
            killers[:] = [*dict.fromkeys([*failed, *killers])][:KILLERS_KEPT]
            if code is not None:
                with contextlib.suppress(OSError):
                    client.sendall(b"%d\n" % code)


def _one_run(client: socket.socket, pytest_args: list[str], killers: list[str]) -> tuple[int | None, list[str]]:
    """Fork a child that runs the tests; its verdict (None when the client went away first: then the child's
    whole process group is killed) and the tests that failed."""
    reports, report = os.pipe()
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.close(reports)
        code = KILLED
        try:
            import pytest

            plugin = _KillersFirst(killers, report)
            status = _quietly(lambda: pytest.main([*PLUGINS, *pytest_args], plugins=[plugin]))
            code = KILLED if status else SURVIVED
        finally:
            os._exit(code)
    os.close(report)
    with contextlib.suppress(OSError):
        os.setpgid(child, child)
    pidfd = os.pidfd_open(child)
    code: int | None = None
    try:
        ready, _, _ = select.select([pidfd, client], [], [])
        if pidfd in ready:
            _, status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else KILLED
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signal.SIGKILL)  # whatever the tests started and left behind
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)
        os.close(pidfd)
    with os.fdopen(reports, "rb") as pipe:
        failed = [line.decode() for line in pipe.read().splitlines()]
    return code, failed


def run(path: str) -> int:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError as exc:
            print(f"the test server at {path} is not there ({exc}): nothing tested", file=sys.stderr)
            return 2  # mutmut reads anything but 1 as "survived": a broken runner kills nothing
        sock.sendall(b"run\n")
        answer = b""
        while chunk := sock.recv(16):
            answer += chunk
    return int(answer) if answer.strip() else 2


def main() -> None:
    args = sys.argv[1:]
    if len(args) >= 4 and args[0] == "serve" and args[3] == "--":
        serve(args[1], args[2], args[4:])
    elif len(args) == 2 and args[0] == "run":
        sys.exit(run(args[1]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
