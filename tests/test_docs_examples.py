"""Every example under docs/ is held to the mark its fence carries (docs/contributing.md):

- ```python: a complete program; each runs as it is shown (on a free port instead of 10809) in a fresh
  interpreter with a time limit, and must exit 0 without a traceback (a thread's included). One that uses
  S3Device runs against the test store (SeaweedFS), given to it as users give theirs, through the AWS
  environment variables; one that opens disk.qcow2 finds one made by qemu-img.
- ```sh: commands that run here. A page's sh blocks run in order as one bash script (``set -euo pipefail``)
  in an empty directory, with the project's console script first on PATH and a free port for 10809.
- ```console: commands shown and not run (another host, AWS, root, systemd, a key file, or a server that runs
  until stopped). Every other fence that holds a command line is a mistake: it would be neither run nor marked.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.remotes import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
PAGES = sorted(DOCS.rglob("*.md"))


def _blocks(page: pathlib.Path) -> list[tuple[str, str]]:
    return [
        (info.strip().split(" ")[0] if info.strip() else "", code) for info, code in FENCE.findall(page.read_text())
    ]


PYTHON = [
    (f"{page.relative_to(DOCS)} example {number}", code)
    for page in PAGES
    for number, code in enumerate((code for language, code in _blocks(page) if language == "python"), 1)
]
SHELL = [
    (str(page.relative_to(DOCS)), "\n".join(code for language, code in _blocks(page) if language == "sh"))
    for page in PAGES
    if any(language == "sh" for language, _ in _blocks(page))
]
COMMANDS = re.compile(r"^\s*(\$ )?(sudo )?(nbdproto|nbdinfo|nbdcopy|nbdkit|qemu-\w+|python3?|pip|sphinx-build) ", re.M)


def _environment() -> dict[str, str]:
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/usr/sbin:{os.environ.get('PATH', '')}"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", [code for _, code in PYTHON], ids=[name for name, _ in PYTHON])
def test_docs_python_example_runs(
    code: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest, peers: Any
) -> None:
    env = _environment()
    if "S3Device" in code:
        store = request.getfixturevalue("s3_store")
        env.update(store.env, AWS_ENDPOINT_URL=store.endpoint)
    if "disk.qcow2" in code:
        peers("qemu-img", "qemu-nbd")
        made = ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "disk.qcow2"), "1M"]
        subprocess.run(made, check=True, timeout=30)
    if "nbdkit" in code:
        peers("nbdkit")
    code = code.replace("10809", str(free_port()))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.peers
@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", [script for _, script in SHELL], ids=[name for name, _ in SHELL])
def test_docs_commands_run(script: str, tmp_path: pathlib.Path, peers: Any) -> None:
    peers("nbdinfo", "nbdcopy", "nbdkit", "qemu-img", "qemu-nbd", "openssl")
    if "nbdproto fuse" in script and not os.path.exists("/dev/fuse"):
        peers("/dev/fuse")  # fails under NBDPROTO_REQUIRE_PEERS, skips elsewhere
    script = "set -euo pipefail\n" + script.replace("10809", str(free_port()))
    process = subprocess.Popen(
        ["bash", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=_environment(),
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=150)
    finally:
        _stop_leftovers(process, tmp_path)
    assert process.returncode == 0, output


def _stop_leftovers(process: subprocess.Popen[str], directory: pathlib.Path) -> None:
    """A script that failed half-way may leave its servers behind: its process group, and the servers it
    forked into the background (their pid files)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for pid_file in directory.glob("*.pid"):
        # (a server the script stopped removes its pid file as it ends: gone between the glob and the read)
        with contextlib.suppress(ValueError, FileNotFoundError, ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    mounts = [line.split()[1] for line in pathlib.Path("/proc/mounts").read_text().splitlines()]
    for mount in mounts:
        if mount.startswith(str(directory)):
            subprocess.run(["fusermount3", "-u", "-z", mount], check=False, timeout=30)


def test_every_command_line_block_is_run_or_marked() -> None:
    unmarked = [
        f"{page.relative_to(DOCS)}: ```{language or '(none)'} block starting {code.splitlines()[0]!r}"
        for page in PAGES
        for language, code in _blocks(page)
        if language not in ("sh", "console", "python") and COMMANDS.search(code)
    ]
    assert unmarked == [], "command lines neither run (```sh) nor marked (```console): " + "; ".join(unmarked)


def test_the_docs_have_examples_of_each_kind() -> None:
    assert any(name.startswith("howto/backup.md") for name, _ in PYTHON)
    assert any(name.startswith("tutorials/sans-io-engine.md") for name, _ in PYTHON)
    assert {"tutorials/serve-a-disk.md", "howto/tls.md", "reference/cli/copy.md"} <= {name for name, _ in SHELL}
