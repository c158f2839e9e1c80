"""The reference covers everything public, on the built site: a name added to a package's ``__all__``, or an
option added to a command, without documentation fails here.

- Every name of each documented package's ``__all__`` has its entry (the HTML anchor Sphinx gives a
  documented object) on the page of the layer it belongs to, and a package that re-exports it lists it.
- Every option of every command is on the command's page, with help text of its own.
- Every key ``nbdproto info --json`` prints is in the schema's page.
"""

from __future__ import annotations

import argparse
import html
import importlib
import json
import pathlib
import re
import subprocess
import sys

import pytest

from tests.docsbuild import REQUIRE_DOCS, ROOT, built_docs

sys.path.insert(0, str(ROOT / "docs"))
try:
    from _ext.nbdproto_docs import HOMES, home_of
except ImportError as exc:  # the docs extra (Sphinx, docutils) is missing: CI runs this module where it is not
    if REQUIRE_DOCS:
        raise
    pytest.skip(f"the reference tests need the docs extra (pip install -e '.[docs]'): {exc}", allow_module_level=True)

from nbdproto.cli import build_parser

# The first test of the module waits for the site to be built (tests.docsbuild): minutes on a loaded machine.
pytestmark = pytest.mark.timeout(400)

PAGES = {
    "nbdproto": "nbdproto",
    "nbdproto.wire": "wire",
    "nbdproto.files": "files",
    "nbdproto.engine": "engine",
    "nbdproto.serving": "serving",
    "nbdproto.client": "client",
    "nbdproto.sockets": "sockets",
    "nbdproto.tls": "tls",
    "nbdproto.devices": "devices",
    "nbdproto.devices.bitmaps": "bitmaps",
    "nbdproto.control": "control",
    "nbdproto.libnbd": "libnbd",
    "nbdproto_threads": "threads",
    "nbdproto_anyio": "anyio",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return built_docs(tmp_path_factory)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_package_has_a_page_and_every_page_a_package() -> None:
    assert set(PAGES) == set(HOMES)
    pages = {path.stem for path in (ROOT / "docs" / "reference" / "api").glob("*.rst")}
    assert pages == set(PAGES.values())


@pytest.mark.parametrize("package", list(PAGES))
def test_every_public_name_is_in_the_api_reference(package: str, site: pathlib.Path) -> None:
    text = (site / "reference" / "api" / f"{PAGES[package]}.html").read_text()
    missing = []
    for name in importlib.import_module(package).__all__:
        home = home_of(package, name)
        home_page = (site / "reference" / "api" / f"{PAGES[home]}.html").read_text()
        thing = getattr(importlib.import_module(package), name)
        anchor = thing.__name__ if isinstance(thing, type(sys)) else f"{home}.{name}"
        if f'id="{anchor}"' not in home_page and f'id="module-{anchor}"' not in home_page:
            missing.append(f"{name} (no entry on {PAGES[home]}.html)")
        elif home != package and f"{package}.{name}" not in html.unescape(text):
            missing.append(f"{name} (not listed among {package}'s re-exports)")
    assert missing == []


def test_every_command_has_a_page_and_a_man_page() -> None:
    conf = (ROOT / "docs" / "conf.py").read_text()
    for command in _commands():
        assert (ROOT / "docs" / "reference" / "cli" / f"{command}.md").exists()
        assert f'("{command}", ' in conf, f"no man page nbdproto-{command}(1) in docs/conf.py"


@pytest.mark.parametrize("command", list(_commands()))
def test_every_option_is_in_the_cli_reference_with_help(command: str, site: pathlib.Path) -> None:
    text = html.unescape((site / "reference" / "cli" / f"{command}.html").read_text())
    parser = _commands()[command]
    undocumented = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue  # -h / --help: every command has it, and the pages leave it out
        if isinstance(action, argparse._SubParsersAction):  # control's commands: each says what it does
            helps = {choice.dest for choice in action._choices_actions if choice.help}
            undocumented += [f"{name}: no help text" for name in action.choices if name not in helps]
            undocumented += [f"{name}: not on {command}.html" for name in action.choices if name not in text]
        elif not action.help:
            undocumented.append(f"{'/'.join(action.option_strings) or action.dest}: no help text")
        for option in action.option_strings:
            if option not in text:
                undocumented.append(f"{option}: not on {command}.html")
    assert undocumented == []


def test_no_option_is_turned_into_a_dash(site: pathlib.Path) -> None:
    """Sphinx's smart quotes would print --workers as an en dash and "workers": docs/conf.py turns dashes off."""
    mangled = [
        f"{page.relative_to(site)}: {found}"
        for page in sorted(site.rglob("*.html"))
        for found in re.findall("\u2013[a-z][a-z-]*", html.unescape(page.read_text()))
    ]
    assert mangled == []


def test_the_top_level_options_are_in_the_cli_reference(site: pathlib.Path) -> None:
    text = html.unescape((site / "reference" / "cli" / "index.html").read_text())
    assert "--version" in text and "nbdproto" in text


def test_every_info_json_key_is_in_the_schema(peers: object) -> None:
    command = [sys.executable, "-m", "nbdproto", "serve", "--memory", "1M", "--description", "a disk", "--run",
               f"{sys.executable} -m nbdproto info --json \"$uri\""]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout[done.stdout.index("{") :])
    keys = set(document) | {key for export in document["exports"] for key in export}
    schema = (ROOT / "docs" / "reference" / "info-json.md").read_text()
    assert {"uri", "description", "block_size_minimum"} <= keys
    assert sorted(key for key in keys if f"`{key}`" not in schema) == []


def _closure(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    reached: dict[str, set[str]] = {}
    for start in graph:
        seen: set[str] = set()
        stack = list(graph[start])
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack += graph.get(node, set())
        reached[start] = seen
    return reached


def test_the_drawn_architecture_is_the_import_graph() -> None:
    from tests.test_layers import edges

    page = (ROOT / "docs" / "explanation" / "architecture.md").read_text()
    drawing = page.split("digraph layers {", 1)[1].split("\n}\n", 1)[0]
    names = {"facade": "nbdproto", "threads": "nbdproto_threads", "anyio": "nbdproto_anyio"}
    drawn: dict[str, set[str]] = {}
    for tail, head in re.findall(r"(\w+) -> (\w+)", drawing):
        tail, head = (names.get(node, f"nbdproto.{node}") for node in (tail, head))
        drawn.setdefault(tail, set()).add(head)
        drawn.setdefault(head, set())
    real = {node: set(targets) for node, targets in edges().items()}
    assert set(drawn) == set(real), "the drawing's layers are not the tree's"
    assert _closure(drawn) == _closure(real), "the drawing's arrows do not say what imports what"
