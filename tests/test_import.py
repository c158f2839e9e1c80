"""``import nbdproto`` stays sans-IO: nbdproto pulls in no event loop, socket, TLS or threading module.

What is excluded, precisely: modules that construct (nbdproto's one dependency) loads by itself. On Python
3.10 only, those include threading and selectors: construct.lib.py3compat imports platform, and 3.10's
platform imports subprocess at its top (3.11 made that import lazy), which imports threading, selectors and
signal. nbdproto cannot load construct without its package ``__init__`` (which imports construct.core, lib
and debug, and so py3compat), and every handshake message is a construct definition, so deferring the import
would only move it to the first connection. The claims checked here, on every version: nbdproto adds no
forbidden module to what construct loads; construct loads none on 3.11+ and exactly threading and selectors on
3.10; and nothing else does, even without site.
"""

from __future__ import annotations

import pathlib
import site
import subprocess
import sys

FORBIDDEN = ("anyio", "asyncio", "trio", "socket", "ssl", "threading", "selectors", "concurrent")

FROM_CONSTRUCT = {"threading", "selectors"} if sys.version_info < (3, 11) else set()
"""The forbidden modules ``import construct`` loads by itself on this Python (see the module docstring)."""


def _forbidden_after(*statements: str, isolated: bool = False) -> list[set[str]]:
    """The forbidden top-level modules loaded after each statement, run in order in a fresh interpreter
    (with ``isolated``, without site: some machines' site start-up imports threading itself)."""
    import nbdproto

    paths = [str(pathlib.Path(nbdproto.__file__).parent.parent), *site.getsitepackages()]
    code = [f"import sys; sys.path[:0] = {paths!r}"]
    for statement in statements:
        code += [statement, f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))))"]
    command = [sys.executable, *(["-S"] if isolated else []), "-c", "\n".join(code)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [set(filter(None, line.split(","))) for line in result.stdout.splitlines()]


def test_import_nbdproto_adds_no_io_module_to_what_construct_loads() -> None:
    before, with_construct, with_nbdproto = _forbidden_after("pass", "import construct", "import nbdproto")
    assert with_nbdproto - with_construct == set()
    assert with_construct - before <= FROM_CONSTRUCT


def test_construct_alone_loads_only_what_the_docstring_says() -> None:
    (with_construct,) = _forbidden_after("import construct", isolated=True)
    assert with_construct == FROM_CONSTRUCT


def test_nothing_else_is_loaded_at_all_without_site() -> None:
    (with_nbdproto,) = _forbidden_after("import nbdproto", isolated=True)
    assert with_nbdproto == FROM_CONSTRUCT


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
        "nbdproto.serving._carry_out",
        "nbdproto.serving._session",
        "nbdproto_threads._server",
        "nbdproto_threads._session",
        "nbdproto.devices._file",
        "nbdproto.cli._serve",
        "nbdproto_anyio._server",
        "nbdproto.tls._server",
    }
    assert loaded & unwanted == set()
