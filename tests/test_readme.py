"""The README's Python examples run as they are shown (on a free port instead of 10809), each in a fresh
interpreter with a time limit, in a directory holding the images they name (disk.img, and disk.qcow2 made by
qemu-img): the public API the README shows keeps working. docs/'s are tests/test_docs_examples.py's."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.remotes import free_port

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 2  # one per backend; the rest are docs' (tests/test_docs_examples.py)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example {i + 1}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code: str, tmp_path: pathlib.Path, peers: Any) -> None:
    code = code.replace("10809", str(free_port()))
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    if "disk.qcow2" in code:
        peers("qemu-img", "qemu-nbd")
        made = ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "disk.qcow2"), "1M"]
        subprocess.run(made, check=True, timeout=30)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
