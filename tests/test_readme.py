"""The README's Python examples run as they are shown (on a free port instead of 10809), each in a fresh
interpreter with a time limit: the public API the README shows keeps working."""

from __future__ import annotations

import pathlib
import re
import socket
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example {i + 1}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code: str) -> None:
    code = code.replace("10809", str(_free_port()))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
