"""docs/howto/libnbd.md's examples are complete programs: each runs with nbdproto.libnbd as shown, and with
libnbd's binding after the one-line change back (``import nbd``, under /usr/bin/python3), and both print the
same."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import PEER_ENV
from tests.libnbd_diff import ROOT, require_binding

pytestmark = pytest.mark.peers

PAGE = pathlib.Path(ROOT) / "docs" / "howto" / "libnbd.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
OURS = "from nbdproto import libnbd as nbd"


def test_the_page_has_examples_that_use_the_one_line_change() -> None:
    assert len(EXAMPLES) >= 3
    assert all(example.startswith(OURS + "\n") for example in EXAMPLES)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example {i + 1}" for i in range(len(EXAMPLES))])
def test_an_example_prints_the_same_with_either_binding(code: str, tmp_path: pathlib.Path) -> None:
    require_binding("nbdkit")
    runs = []
    for python, source in ((sys.executable, code), ("/usr/bin/python3", code.replace(OURS, "import nbd"))):
        run = subprocess.run(
            [python, "-c", source], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=PEER_ENV
        )
        assert run.returncode == 0, f"{python}: {run.stderr}"
        runs.append(run.stdout)
    assert runs[0] == runs[1]
    assert runs[0].strip()
