"""Servers that stop answering: every client gives up at its time limit, with TimeoutError (the command line:
one line and a non-zero status), never a hang.

Each stalled server stalls for ever (the trickle would take hours): only the client's limit can end a case. So
a case must end in TimeoutError, not before the limit, and at all (a client that never gives up fails the test
when the wait for it, a generous bound, runs out); how soon after the limit a loaded machine lets it notice is
not measured.

Four ways of stalling: a server that accepts and never greets; one that greets and then says nothing; one that
never sends a reply's DONE chunk; one that sends a reply one byte a second. Against the threads client
(``timeout=5``), the anyio client on asyncio and on trio (``anyio.fail_after(5)``, and ``timeout=5``), and the
command line (``--timeout``, and once its default).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

import nbdproto_anyio
import nbdproto_threads
from tests.hostile_server import SIZE, Case, Request, Trickle, Wire, good_read, serve_case

pytestmark = pytest.mark.timeout(120)
LIMIT = 5.0


@contextlib.contextmanager
def mute_server(greet: bool) -> Iterator[str]:
    """A server that accepts and then sends nothing at all (``greet`` False), or only its greeting."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(sock)
            if greet:
                sock.sendall(Case("greeting", None).greeting)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"nbd://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for sock in accepted:
            sock.close()


def _no_done(wire: Wire, request: Request) -> bytes:
    # All the data, in a chunk without DONE: the reply never ends.
    return wire.data(request, request.offset, b"\x01" * request.length, flags=0)


def _trickle(wire: Wire, request: Request) -> bytes:
    return Trickle(good_read(wire, request))


STALLED_REPLIES = {"missing DONE": Case("missing DONE", None, read=_no_done),
                   "one byte a second": Case("one byte a second", None, read=_trickle)}  # fmt: skip


@contextlib.contextmanager
def stalling(kind: str) -> Iterator[str]:
    if kind == "never greets":
        with mute_server(greet=False) as uri:
            yield uri
    elif kind == "silent after the greeting":
        with mute_server(greet=True) as uri:
            yield uri
    else:
        with serve_case(STALLED_REPLIES[kind]) as uri:
            yield uri


KINDS = ["never greets", "silent after the greeting", "missing DONE", "one byte a second"]


def _timed(run: Callable[[], Any]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        run()
    except BaseException as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def _read_all_threads(uri: str) -> None:
    with nbdproto_threads.connect(uri, timeout=LIMIT) as client:
        client.pread(SIZE, 0)


def _read_all_anyio(uri: str, backend: str, how: str) -> None:
    async def read_all() -> None:
        if how == "fail_after":
            with anyio.fail_after(LIMIT):
                async with await nbdproto_anyio.connect(uri) as client:
                    await client.pread(SIZE, 0)
        else:
            async with await nbdproto_anyio.connect(uri, timeout=LIMIT) as client:
                await client.pread(SIZE, 0)

    anyio.run(read_all, backend=backend)


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdproto", *args], capture_output=True, text=True, timeout=timeout)


def _cli_gives_up(kind: str, uri: str, limit: float | None) -> None:
    """The command line on a stalled server: one line, no traceback, status 1 (TimeoutError for the check)."""
    command = ["info"] if kind in ("never greets", "silent after the greeting") else ["copy", "--connections", "1"]
    args = [*command] + (["--timeout", str(limit)] if limit is not None else []) + [uri]
    result = _cli(*args, *([] if command == ["info"] else ["null:"]), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "time" in result.stderr.lower(), result.stderr
    raise TimeoutError(result.stderr)


def test_every_client_gives_up_on_every_stalled_server_in_time() -> None:
    # Every (stall, client) pair at once, each timed on its own: they wait, they do not work, so running them
    # side by side keeps this at the length of the longest (the command line's default limit).
    from nbdproto.cli._errors import DEFAULT_TIMEOUT

    clients: dict[str, tuple[Callable[[str, str], None], float]] = {
        "threads timeout=5": (lambda kind, uri: _read_all_threads(uri), LIMIT),
        "command line --timeout 5": (lambda kind, uri: _cli_gives_up(kind, uri, LIMIT), LIMIT),
    }
    for backend in ("asyncio", "trio"):
        for how in ("fail_after", "timeout="):
            clients[f"anyio {backend} {how}"] = (lambda kind, uri, b=backend, h=how: _read_all_anyio(uri, b, h), LIMIT)
    outcomes: dict[str, tuple[float, BaseException | None, float]] = {}

    def run(name: str, kind: str, uri: str, client: Callable[[str, str], None], limit: float) -> None:
        took, failure = _timed(lambda: client(kind, uri))
        outcomes[f"{kind} / {name}"] = (took, failure, limit)

    with contextlib.ExitStack() as servers:
        runs = []
        never = servers.enter_context(stalling("never greets"))
        default = (lambda kind, uri: _cli_gives_up(kind, uri, None), DEFAULT_TIMEOUT)
        runs.append(("command line, default limit", "never greets", never, *default))
        for kind in KINDS:
            uri = servers.enter_context(stalling(kind))
            runs += [(name, kind, uri, client, bound) for name, (client, bound) in clients.items()]
        threads = [threading.Thread(target=run, args=one, daemon=True) for one in runs]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, started + 2 * DEFAULT_TIMEOUT - time.monotonic()))
    missing = sorted({f"{kind} / {name}" for name, kind, *_ in runs} - set(outcomes))
    assert not missing, f"clients that never gave up: {missing}"
    early = {key: took for key, (took, _, limit) in outcomes.items() if took < limit * 0.95}
    wrong = {key: repr(failure) for key, (_, failure, _) in outcomes.items() if not isinstance(failure, TimeoutError)}
    assert not wrong, wrong
    assert not early, early
