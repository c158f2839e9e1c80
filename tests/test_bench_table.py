"""bench/bench_table.py's table says how far each ratio to nbdkit moved between rounds, so that a figure the
machine's noise could have made is read as such (and bench/bench_tls.py's table says the same)."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_table  # noqa: E402


def test_the_range_pairs_each_round_with_nbdkits_of_the_same_round() -> None:
    results = {
        ("nbdkit file", "t"): [(100.0, 5.0, 5.0), (200.0, 5.0, 5.0), (50.0, 5.0, 5.0)],
        ("threads", "t"): [(110.0, 4.0, 4.0), (180.0, 4.0, 4.0), (60.0, 4.0, 4.0)],
    }
    # 1.10, 0.90 and 1.20: paired by round, not the medians' 110/100.
    assert bench_table.ratio_range(results, "threads", "nbdkit file", "t") == " [0.90-1.20]"


def test_no_range_from_one_round_or_without_nbdkit() -> None:
    one = {("nbdkit file", "t"): [(100.0, 1.0)], ("threads", "t"): [(90.0, 1.0)]}
    assert bench_table.ratio_range(one, "threads", "nbdkit file", "t") == ""
    assert bench_table.ratio_range(one, "threads", None, "t") == ""
    assert bench_table.ratio_range(one, "qemu-nbd", "nbdkit file", "t") == ""


def test_the_table_prints_the_range_beside_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    chosen = [bench_table.Server("nbdkit file", [], "nbdkit"), bench_table.Server("threads", [], "python")]
    test = bench_table.Test("randread 4k qd16", "IOPS")
    results = {
        ("nbdkit file", test.name): [(100.0, 10.0, 10.0), (100.0, 10.0, 10.0)],
        ("threads", test.name): [(120.0, 8.0, 9.0), (100.0, 8.0, 9.0)],
    }
    bench_table.print_table(chosen, [test], results, type("Args", (), {"rounds": 2})())
    out = capsys.readouterr().out
    assert "1.10x [1.00-1.20], cpu 0.80x, client 0.90x" in out
