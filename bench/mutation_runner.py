"""The test command of bench/mutation.sh: a warm pytest process that forks a child per mutant, which runs the
tests that execute the mutated line and nothing else.

mutmut (2.x) writes each mutant into the source file and runs its test command. A fresh ``python -m pytest``
spends a second or more importing pytest, hypothesis, anyio, trio and the rest before its first test, and a
module has hundreds of mutants. ``serve`` pays that once: it collects the tests (importing everything they
need), forgets every module it imported from the checkout (nbdproto, the backends, the tests), and forks a
child for each ``run``. The child imports the checkout afresh, so it sees the mutant on disk, and runs pytest.

Which tests: before the first mutant, one run of all the tests under ``coverage`` records which test executes
each line of the module (a context per test). A test that never executes the mutated line behaves exactly as
it did, so only the tests that do are run, those that killed the latest mutants first (mutants of one function
tend to fail the same test), stopping at the first failure. A line run while the module is imported (a table,
a default, a decorator) may change what any test sees: for those, every test runs. A line no test executes
cannot be killed, and is reported as surviving without running anything.

``run`` is what mutmut runs: it exits 1 when the tests failed (the mutant is killed; a mutant that breaks an
import fails them too) and 0 when they passed (it survived). When mutmut gives up on a run (its time limit) it
kills ``run``, and the server then kills the child and everything it started (its process group).

    python bench/mutation_runner.py serve SOCKET MODULE -- PYTEST_ARGS   (in the checkout; until killed)
    python bench/mutation_runner.py run SOCKET
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import pathlib
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

KILLED, SURVIVED = 1, 0
PLUGINS = ["-p", "hypothesis.extra.pytestplugin", "-p", "pytest_timeout", "-p", "anyio.pytest_plugin"]
KILLERS_KEPT = 64
EVERY_TEST = None  # what a line run at import time selects


class _Selection:
    """A pytest plugin for the child: only the tests in ``chosen`` (all when None), those in ``killers`` first,
    and the id of each test that fails written to ``report`` (a pipe to the server)."""

    def __init__(self, chosen: set[str] | None, killers: list[str], report: int) -> None:
        self.chosen = chosen
        self.rank = {nodeid: i for i, nodeid in enumerate(killers)}
        self.report = report

    def pytest_collection_modifyitems(self, config: object, items: list[object]) -> None:
        if self.chosen is not None:
            dropped = [item for item in items if item.nodeid not in self.chosen]  # type: ignore[attr-defined]
            items[:] = [item for item in items if item.nodeid in self.chosen]  # type: ignore[attr-defined]
            config.hook.pytest_deselected(items=dropped)  # type: ignore[attr-defined]
        last = len(self.rank)
        items.sort(key=lambda item: self.rank.get(item.nodeid, last))  # type: ignore[attr-defined]

    def pytest_runtest_logreport(self, report: object) -> None:
        if report.failed:  # type: ignore[attr-defined]
            os.write(self.report, report.nodeid.encode() + b"\n")  # type: ignore[attr-defined]


class _Contexts:
    """A pytest plugin for the coverage run: each test's lines recorded under its node id."""

    def __init__(self, cov: object) -> None:
        self.cov = cov

    def pytest_runtest_setup(self, item: object) -> None:
        self.cov.switch_context(item.nodeid)  # type: ignore[attr-defined]

    def pytest_runtest_teardown(self, nextitem: object) -> None:
        self.cov.switch_context("")  # type: ignore[attr-defined]


def _forget_checkout(root: pathlib.Path) -> None:
    """Drop every module imported from ``root`` (or named like one of its packages) from sys.modules."""
    tops = {path.name.removesuffix(".py") for path in root.iterdir()}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        mine = file is not None and pathlib.Path(file).resolve().is_relative_to(root)
        if mine or name.split(".")[0] in tops:
            del sys.modules[name]


def _quietly(run: Callable[[], object]) -> int:
    """Call ``run`` with stdout and stderr on /dev/null (the descriptors, which children inherit)."""
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        return int(run())  # type: ignore[call-overload]
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (null, *saved):
            os.close(fd)


def _in_child(work: Callable[[int], int], on_exit: Callable[[int], None] | None = None) -> tuple[int, bytes]:
    """Run ``work(pipe)`` in a forked child of its own process group; its exit status and what it wrote to the
    pipe. (Used for the coverage run; the mutants' runs also watch their client, in ``_one_run``.)"""
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.close(reading)
        code = KILLED
        try:
            code = work(writing)
        finally:
            os._exit(code)
    os.close(writing)
    with os.fdopen(reading, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(child, 0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child, signal.SIGKILL)
    return (os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else KILLED), out


def _coverage_map(target: pathlib.Path, pytest_args: list[str]) -> dict[int, set[str] | None] | None:
    """line -> the node ids of the tests that execute it (EVERY_TEST for a line run at import, none for a
    statement no test runs), for each statement coverage knows, from one run of the tests under coverage in a
    child; None when coverage is not installed."""
    try:
        import coverage
    except ImportError:
        return None

    def measure(pipe: int) -> int:
        import pytest

        cov = coverage.Coverage(data_file=None, include=[str(target)], config_file=False)
        cov.start()
        status = _quietly(lambda: pytest.main([*PLUGINS, *pytest_args], plugins=[_Contexts(cov)]))
        cov.stop()
        by_line = cov.get_data().contexts_by_lineno(str(target))
        missing = cov.analysis2(str(target))[3]
        with os.fdopen(pipe, "w") as out:
            json.dump({"run": {str(line): sorted(contexts) for line, contexts in by_line.items()},
                       "missing": sorted(missing)}, out)  # fmt: skip
        return status

    status, out = _in_child(measure)
    if status != 0:
        sys.exit(f"the tests fail without a mutant (exit {status}): {' '.join(pytest_args)}")
    measured = json.loads(out)
    lines: dict[int, set[str] | None] = {line: set() for line in measured["missing"]}  # statements no test runs
    for line, contexts in measured["run"].items():
        lines[int(line)] = EVERY_TEST if "" in contexts else set(contexts)
    return lines


def _statement_lines(source: str) -> dict[int, int]:
    """line -> the line coverage records for the innermost statement holding it (a statement spanning lines is
    recorded at its first)."""
    innermost: dict[int, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                if node.lineno >= innermost.get(line, 0):
                    innermost[line] = node.lineno
    return innermost


class Chooser:
    """Which tests a mutant of ``target`` needs, from the lines it changed (see the module docstring)."""

    def __init__(self, target: pathlib.Path, lines: dict[int, set[str] | None] | None) -> None:
        self.target = target
        self.original = target.read_text().splitlines()
        self.statement = _statement_lines("\n".join(self.original))
        self.lines = lines

    def tests_for_mutant(self) -> set[str] | None:
        """The node ids to run (None: all of them); an empty set when no test executes the change."""
        if self.lines is None:
            return None
        now = self.target.read_text().splitlines()
        changed = [i + 1 for i, (a, b) in enumerate(zip(self.original, now, strict=False)) if a != b]
        if len(now) != len(self.original) or not changed:
            return None
        chosen: set[str] = set()
        for line in changed:
            where = self.statement.get(line)
            if where is None or where not in self.lines:
                return None  # not a statement coverage knows by that line (a decorator, say): run them all
            tests = self.lines[where]
            if tests is EVERY_TEST:
                return None
            chosen |= tests
        return chosen


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
    started = time.monotonic()
    chooser = Chooser(root / module, _coverage_map(root / module, pytest_args))
    print(f"coverage of {module}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
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
            started = time.monotonic()
            chosen = chooser.tests_for_mutant()
            if chosen is not None and not chosen:
                code: int | None = SURVIVED  # no test executes the change: nothing to run
                failed: list[str] = []
            else:
                code, failed = _one_run(client, pytest_args, chosen, killers)
            killers[:] = [*dict.fromkeys([*failed, *killers])][:KILLERS_KEPT]
            ran = "every test" if chosen is None else f"{len(chosen)} tests"
            print(f"{ran}: exit {code} in {time.monotonic() - started:.1f} s {failed[:1]}", file=sys.stderr, flush=True)
            if code is not None:
                with contextlib.suppress(OSError):
                    client.sendall(b"%d\n" % code)


def _one_run(
    client: socket.socket, pytest_args: list[str], chosen: set[str] | None, killers: list[str]
) -> tuple[int | None, list[str]]:
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

            plugin = _Selection(chosen, killers, report)
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
