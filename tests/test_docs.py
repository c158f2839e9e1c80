"""The Python examples of the pages under docs/ run as they are shown (on a free port instead of 10809), each
in a fresh interpreter with a time limit, in an empty directory: every page's programs are complete."""

from __future__ import annotations

import pathlib
import re
import socket
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = [
    (f"{page.relative_to(DOCS)} example {number + 1}", code)
    for page in sorted(DOCS.rglob("*.md"))
    for number, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_docs_have_examples() -> None:
    assert any(name.startswith("howto/backup.md") for name, _ in EXAMPLES)


@pytest.mark.parametrize("code", [code for _, code in EXAMPLES], ids=[name for name, _ in EXAMPLES])
def test_docs_example_runs(code: str, tmp_path: pathlib.Path) -> None:
    code = code.replace("10809", str(_free_port()))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
