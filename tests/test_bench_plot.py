"""bench/bench_plot.py draws the speed table the docs show: from the figures bench_table.py saved, a picture
whose title says when and on what machine they were measured, with ratios to nbdkit's file plugin."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tests.docsbuild import REQUIRE_DOCS

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAVED = ROOT / "docs" / "_static" / "speed.json"


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if REQUIRE_DOCS:
            pytest.fail("NBDPROTO_REQUIRE_DOCS=1 but matplotlib (the bench extra) is missing")
        pytest.skip("the plot needs matplotlib: pip install -e '.[bench]'")


def test_the_docs_plot_is_drawn_from_saved_figures_with_date_and_machine(tmp_path: pathlib.Path) -> None:
    _require_matplotlib()
    saved = json.loads(SAVED.read_text())
    assert saved["date"] and saved["machine"]
    picture = tmp_path / "speed.svg"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_plot.py"), str(SAVED), str(picture)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    label = f"measured {saved['date']} on {saved['machine']}"
    for drawn in (picture.read_text(), (ROOT / "docs" / "_static" / "speed.svg").read_text()):
        assert drawn.startswith("<?xml") and "</svg>" in drawn
        assert label in drawn  # the committed picture too says when and where


def test_the_docs_say_when_and_where_the_plot_was_measured() -> None:
    saved = json.loads(SAVED.read_text())
    speed = (ROOT / "docs" / "explanation" / "speed.md").read_text()
    assert f"Measured {saved['date']}" in speed
    assert saved["machine"].split(",")[0] in speed


def test_a_plot_needs_nbdkit_to_take_ratios_against(tmp_path: pathlib.Path) -> None:
    _require_matplotlib()
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_plot import plot

    document = {"date": "2026-12-06", "machine": "x", "how": "y", "tests": [{"name": "t", "unit": "IOPS"}],
                "servers": ["threads"], "results": [{"server": "threads", "test": "t", "figure": 1.0,
                "server_cpu": 1.0, "client_cpu": 1.0}]}  # fmt: skip
    with pytest.raises(ValueError, match="nbdkit file"):
        plot(document, str(tmp_path / "x.svg"))
