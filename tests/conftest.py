"""Shared test configuration: the real-peer rule, and per-test timeouts.

Interop tests need real NBD tools (nbdkit, nbdinfo, nbdsh, nbdcopy, qemu-nbd, qemu-img, qemu-io, nbd-server).
Every such test asks for them through the ``peers`` fixture: ``peers("nbdinfo", "nbdcopy")``. Where a tool is
missing the test is skipped with the reason, for a local run; with ``NBDPROTO_REQUIRE_PEERS=1`` (set by
.ci/run) the test fails instead, so CI can never pass by skipping what it must prove.

``nbdsh`` runs the first python3 on PATH, but Debian ships the libnbd binding only for /usr/bin/python3, so
it counts as present only where /usr/bin/python3 can ``import nbd``; tests run it with /usr/bin first on PATH
(``PEER_ENV``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable

import pytest

REQUIRE_PEERS = os.environ.get("NBDPROTO_REQUIRE_PEERS") == "1"
PEER_ENV = {**os.environ, "PATH": "/usr/bin:/usr/sbin:" + os.environ.get("PATH", "")}


@functools.cache
def _missing(tool: str) -> str | None:
    """Why ``tool`` cannot be used here, or None if it can."""
    if tool == "nbdsh":
        if shutil.which("nbdsh", path=PEER_ENV["PATH"]) is None:
            return "nbdsh is not installed (Debian package libnbd-bin)"
        probe = subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True, timeout=30)
        return None if probe.returncode == 0 else "the libnbd Python binding is missing (python3-libnbd)"
    if shutil.which(tool, path=PEER_ENV["PATH"]) is None:
        return f"{tool} is not installed"
    return None


def require_peers(*tools: str) -> None:
    """Skip (or, under NBDPROTO_REQUIRE_PEERS=1, fail) unless every tool is usable."""
    reasons = [reason for tool in tools if (reason := _missing(tool))]
    if reasons:
        message = "; ".join(reasons)
        if REQUIRE_PEERS:
            pytest.fail(f"NBDPROTO_REQUIRE_PEERS=1 but {message}")
        pytest.skip(message)


@pytest.fixture
def peers() -> Callable[..., None]:
    """``peers("nbdinfo", ...)``: the real tools a test needs (see the module docstring)."""
    return require_peers
