"""The man pages: built from the same sources as the site (``sphinx-build -W -n -b man``), one for nbdproto and
one per command, installed with the command docs/reference/cli/index.md gives (into a directory of the test's
instead of /usr/local/share/man), and read back with man(1): each shows the version, and every option of its
command.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess

import pytest

import nbdproto
from nbdproto.cli import build_parser
from tests.conftest import require_peers
from tests.docsbuild import ROOT, built_docs

# The first test of the module waits for the site to be built (tests.docsbuild): minutes on a loaded machine.
pytestmark = pytest.mark.timeout(400)

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _install_command() -> str:
    """The documented install line, as the page shows it."""
    page = (ROOT / "docs" / "reference" / "cli" / "index.md").read_text()
    section = page.split("## Installing the man pages", 1)[1]
    code = FENCE.search(section)
    assert code is not None, "the man pages' section shows no commands"
    lines = [line for line in code.group(2).splitlines() if re.match(r"(sudo )?install ", line)]
    assert len(lines) == 1, code.group(2)
    assert "sphinx-build -b man docs build/man" in code.group(2)
    return lines[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    built = built_docs(tmp_path_factory, "man")
    target = tmp_path_factory.mktemp("man")
    command = _install_command().removeprefix("sudo ")
    command = command.replace("/usr/local/share/man", str(target)).replace("build/man", str(built))
    subprocess.run(["bash", "-c", command], check=True, timeout=60)
    return target


def test_a_man_page_for_nbdproto_and_each_command(installed: pathlib.Path) -> None:
    pages = {path.name for path in (installed / "man1").glob("*.1")}
    assert pages == {"nbdproto.1", *(f"nbdproto-{command}.1" for command in _commands())}


@pytest.mark.parametrize("command", ["", *_commands()])
def test_a_man_page_reads_with_its_version_and_options(command: str, installed: pathlib.Path) -> None:
    require_peers("man")  # fails under NBDPROTO_REQUIRE_PEERS=1, skips elsewhere
    man = shutil.which("man")
    assert man is not None
    name = f"nbdproto-{command}" if command else "nbdproto"
    env = {**os.environ, "MANPATH": str(installed), "MANWIDTH": "200", "MAN_KEEP_FORMATTING": ""}
    done = subprocess.run([man, "-P", "cat", name], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert nbdproto.__version__ in text.splitlines()[-1], text.splitlines()[-1]  # the footer: version and date
    parser = _commands()[command] if command else build_parser()
    options = [
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
        if option.startswith("--")
    ]
    assert [option for option in options if option not in text] == []
