"""``import nbdproto`` stays sans-IO: it pulls in no event loop, socket, TLS or threading module."""

from __future__ import annotations

import pathlib
import site
import subprocess
import sys

FORBIDDEN = ("anyio", "asyncio", "trio", "socket", "ssl", "threading", "selectors", "concurrent")

PROBE = (
    "import sys\n"
    "before = set(sys.modules)\n"
    "import nbdproto\n"
    "pulled = {name.split('.')[0] for name in set(sys.modules) - before}\n"
    f"print(','.join(sorted(pulled & set({FORBIDDEN!r}))))\n"
)


def test_import_nbdproto_pulls_in_no_io_module() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_nothing_forbidden_is_loaded_at_all_without_site() -> None:
    # Site start-up on some machines imports threading itself; -S shows what nbdproto (and construct) need.
    import nbdproto

    package_root = str(pathlib.Path(nbdproto.__file__).parent.parent)
    paths = [package_root, *site.getsitepackages()]
    code = (
        f"import sys; sys.path[:0] = {paths!r}\n"
        "import nbdproto\n"
        f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))))"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_client_commands_start_without_servers_or_event_loops() -> None:
    # `nbdproto copy` / `info` / `list`: their time includes the start-up, so serving and event-loop machinery
    # (and ctypes, logging, thread pools) stays unloaded until `serve` or a local file needs it.
    code = (
        "import sys\n"
        "import nbdproto.cli, nbdproto.cli._copy, nbdproto.cli._query, nbdproto_threads._copy\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    unwanted = {"anyio", "asyncio", "trio", "logging", "concurrent.futures", "ctypes"} | {
        "nbdproto._server",
        "nbdproto._serverhandshake",
        "nbdproto._servertransmission",
        "nbdproto._dispatch",
        "nbdproto_threads._server",
        "nbdproto.devices._file",
        "nbdproto.cli._serve",
        "nbdproto_anyio._server",
    }
    assert loaded & unwanted == set()
