"""The Python examples of the how-to pages under docs/ run as they are shown (on a free port instead of
10809), each in a fresh interpreter with a time limit; one that uses S3Device runs against the test store
(SeaweedFS), given to it as users give theirs, through the AWS environment variables."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = [
    (f"{page.relative_to(DOCS)} example {number}", code)
    for page in sorted(DOCS.rglob("*.md"))
    for number, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S), 1)
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", [code for _, code in EXAMPLES], ids=[name for name, _ in EXAMPLES])
def test_docs_example_runs(code: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> None:
    env = dict(os.environ)
    if "S3Device" in code:
        store = request.getfixturevalue("s3_store")
        env.update(store.env, AWS_ENDPOINT_URL=store.endpoint)
    code = code.replace("10809", str(_free_port()))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_the_docs_have_examples() -> None:
    assert any(name.startswith("howto/backup.md") for name, _ in EXAMPLES)
