"""The documentation built once per test session, for the tests that read the built site.

``built_docs(builder)`` runs ``sphinx-build -W -n`` (warnings and unresolved references are errors, as in CI)
into a directory every pytest-xdist worker of the session shares, under a lock, so the site is built once
however many workers ask. ``NBDPROTO_DOCS_HTML=DIR`` hands over a site built already, and
``NBDPROTO_DOCS_MAN=DIR`` the man pages (.ci/run builds both before the tests). Sphinx and the docs extra are
needed: without them the tests skip, or fail under ``NBDPROTO_REQUIRE_DOCS=1`` (.ci/run sets it where it
installed the extra).
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUIRE_DOCS = os.environ.get("NBDPROTO_REQUIRE_DOCS") == "1"


def require_sphinx() -> None:
    try:
        import furo  # noqa: F401
        import myst_parser  # noqa: F401
        import sphinx  # noqa: F401
        import sphinxarg  # noqa: F401
    except ImportError as exc:
        message = f"building the docs needs the docs extra (pip install -e '.[docs]'): {exc}"
        if REQUIRE_DOCS:
            pytest.fail(f"NBDPROTO_REQUIRE_DOCS=1 but {message}")
        pytest.skip(message)


def built_docs(factory: pytest.TempPathFactory, builder: str = "html") -> pathlib.Path:
    given = os.environ.get(f"NBDPROTO_DOCS_{builder.upper()}")
    if given:
        return pathlib.Path(given)
    require_sphinx()
    shared = factory.getbasetemp().parent  # the same for every worker of one session
    target = shared / f"docs-{builder}"
    with open(shared / f"docs-{builder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            # Built beside it and renamed when whole: a build cut short (a worker stopped by its time limit
            # while it built) leaves nothing that a later build would take for a good one half done.
            partial = shared / f"docs-{builder}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            command = [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", builder, str(ROOT / "docs")]
            command.append(str(partial))
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"sphinx-build -b {builder} failed:\n{done.stderr}"
            partial.rename(target)
    return target
