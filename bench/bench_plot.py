"""The speed table of bench/bench_table.py as a picture: for each test, each server's figure and its CPU per
request as ratios to nbdkit's file plugin (1 is level with nbdkit; above it, faster or dearer), labelled with
the date, the machine (CPU model and cores) and how it was measured.

    .venv/bin/python bench/bench_table.py --rounds 3 --plot docs/_static/speed.svg   # measure, then draw
    .venv/bin/python bench/bench_plot.py docs/_static/speed.json docs/_static/speed.svg   # draw saved results

bench_table.py --plot FILE.svg saves the figures beside the picture (FILE.json), so that a plot can be drawn
again without measuring. Needs matplotlib (the ``bench`` extra: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

BASE = "nbdkit file"


def machine() -> str:
    """The CPU model, as /proc/cpuinfo names it, and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def results_document(
    servers: Sequence[str],
    tests: Sequence[tuple[str, str]],
    medians: Mapping[tuple[str, str], tuple[float, float, float]],
    how: str,
) -> dict[str, Any]:
    """What a plot is drawn from: per server and test, the median figure and the server's and the client's CPU
    microseconds per request (per MiB for copies), with when, where and how they were measured."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "how": how,
        "tests": [{"name": name, "unit": unit} for name, unit in tests],
        "servers": list(servers),
        "results": [
            {"server": server, "test": test, "figure": figure, "server_cpu": cpu, "client_cpu": client}
            for (server, test), (figure, cpu, client) in medians.items()
        ],
    }


def plot(document: Mapping[str, Any], path: str) -> None:
    """Draw ``document`` (results_document's) to ``path`` (SVG or PNG, by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "nbdproto"  # the same figures draw the same file
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable, in the reader's font
    tests = [test["name"] for test in document["tests"]]
    cells = {(row["server"], row["test"]): row for row in document["results"]}
    if not any(server == BASE for server, _ in cells):
        raise ValueError(f"the results hold no {BASE!r} to take ratios against")
    servers = [server for server in document["servers"] if server != BASE]
    figure, (speed, cpu) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    width = 0.8 / max(1, len(servers))
    colours = plt.get_cmap("tab10")
    for index, server in enumerate(servers):
        offsets = [position - 0.4 + width * (index + 0.5) for position in range(len(tests))]
        ratios = [_ratio(cells, server, test, "figure") for test in tests]
        costs = [_ratio(cells, server, test, "server_cpu") for test in tests]
        speed.bar(offsets, ratios, width, label=server, color=colours(index % 10))
        cpu.bar(offsets, costs, width, color=colours(index % 10))
    labels = ("throughput / nbdkit's\n(higher is faster)", "server CPU per request / nbdkit's\n(lower is cheaper)")
    for axes, label in zip((speed, cpu), labels, strict=True):
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_ylabel(label)
        axes.grid(axis="y", alpha=0.3)
    cpu.set_xticks(range(len(tests)), [_test_label(test) for test in tests])
    speed.legend(fontsize="small", ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    base = ", ".join(
        f"{test} {cells[(BASE, test)]['figure']:.0f} {unit}"
        for test, unit in ((t["name"], t["unit"]) for t in document["tests"])
        if (BASE, test) in cells
    )
    figure.suptitle(
        f"nbdproto against nbdkit's file plugin: measured {document['date']} on {document['machine']}\n"
        f"{document['how']}\nnbdkit's figures: {base}",
        fontsize="small",
    )
    figure.tight_layout()
    figure.savefig(path, metadata={"Date": None} if path.endswith(".svg") else None)
    plt.close(figure)


def _ratio(cells: Mapping[tuple[str, str], Mapping[str, float]], server: str, test: str, key: str) -> float:
    mine, base = cells.get((server, test)), cells.get((BASE, test))
    if not mine or not base or not base[key]:
        return 0.0
    return mine[key] / base[key]


def _test_label(test: str) -> str:
    return {
        "nbdcopy read": "nbdcopy read\n4 connections",
        "nbdcopy write": "nbdcopy write\n4 connections",
        "randread 4k qd1": "4 KiB reads\nqueue depth 1",
        "randread 4k qd16": "4 KiB reads\nqueue depth 16",
        "randwrite 4k qd16": "4 KiB writes\nqueue depth 16",
    }.get(test, test)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the JSON bench_table.py --plot saved beside its picture")
    parser.add_argument("picture", help="where to draw it (.svg or .png)")
    args = parser.parse_args()
    with open(args.results) as f:
        plot(json.load(f), args.picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
