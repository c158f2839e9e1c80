"""The built site as a reader sees it: opened in headless Chromium (Debian's package), the index, a tutorial
and an API page render (a screenshot each, kept in the test's directory), every image of the site loads in
the browser, and the search page finds a class.

Chromium runs with a fresh profile, no sandbox (tests run as root), no GPU and no background networking; the
site is read from files, so nothing leaves the machine. Each run is bounded by a time limit.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import struct
import subprocess

import pytest

from tests.conftest import require_peers
from tests.docsbuild import built_docs

# The first test of the module waits for the site to be built (tests.docsbuild): minutes on a loaded machine.
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Asked for before the site: a missing chromium fails under NBDPROTO_REQUIRE_PEERS=1 even where the docs
    extra is missing too (and the site would skip)."""
    return _chromium()


@pytest.fixture(scope="module")
def site(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return built_docs(tmp_path_factory)


def _chromium() -> str:
    require_peers("chromium")
    found = shutil.which("chromium")
    assert found is not None
    return found


def _run_chromium(tmp_path: pathlib.Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars", *arguments]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("index.html", "Where to start"),
        ("tutorials/sans-io-engine.html", "selectors"),
        ("reference/api/engine.html", "ServerConnection"),
    ],
)
def test_a_page_renders(page: str, expected: str, site: pathlib.Path, tmp_path: pathlib.Path) -> None:
    url = (site / page).as_uri()
    shot = tmp_path / (page.replace("/", "-") + ".png")
    done = _run_chromium(tmp_path, "--window-size=1280,900", f"--screenshot={shot}", url)
    assert shot.exists(), done.stderr
    assert _png_size(shot) == (1280, 900)
    assert shot.stat().st_size > 20_000, "the screenshot is nearly empty"  # a blank page compresses to ~5 KB
    dom = _run_chromium(tmp_path, "--dump-dom", "--virtual-time-budget=5000", url)
    assert expected in dom.stdout
    assert "furo" in dom.stdout  # the theme's stylesheet and scripts are there, not a bare page


@pytest.mark.timeout(180)
def test_every_image_of_the_site_loads(site: pathlib.Path, tmp_path: pathlib.Path) -> None:
    images = sorted(
        {
            (page.parent / source).resolve().as_uri()
            for page in site.rglob("*.html")
            for source in re.findall(r'<(?:img|object)[^>]*?(?:src|data)="([^"#?]+\.(?:svg|png))"', page.read_text())
            if not source.startswith(("http:", "https:", "data:"))
        }
    )
    assert any(image.endswith("speed.svg") for image in images)
    assert any("graphviz" in image for image in images)  # the architecture, drawn at build time
    probe = site / "_image-probe.html"
    probe.write_text(
        "<html><body><pre id=out>waiting</pre><script>"
        f"const images = {json.dumps(images)}; const results = {{}}; let left = images.length;"
        "for (const src of images) { const image = new Image();"
        " image.onload = () => { results[src] = image.naturalWidth > 0; if (--left === 0) done(); };"
        " image.onerror = () => { results[src] = false; if (--left === 0) done(); }; image.src = src; }"
        "function done() { document.getElementById('out').textContent = JSON.stringify(results); }"
        "</script></body></html>"
    )
    try:
        dom = _run_chromium(tmp_path, "--allow-file-access-from-files", "--dump-dom", "--virtual-time-budget=10000",
                            probe.as_uri())  # fmt: skip
    finally:
        probe.unlink()
    found = re.search(r"<pre id=\"out\">(.*?)</pre>", dom.stdout, re.S)
    assert found and found.group(1) != "waiting", dom.stdout[-2000:]
    results = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    broken = sorted(src for src, ok in results.items() if not ok)
    assert broken == [] and len(results) == len(images)


@pytest.mark.timeout(180)
def test_the_search_page_finds_a_class(site: pathlib.Path, tmp_path: pathlib.Path) -> None:
    url = (site / "search.html").as_uri() + "?q=ServerSessionLogic"
    dom = _run_chromium(tmp_path, "--allow-file-access-from-files", "--dump-dom", "--virtual-time-budget=10000", url)
    assert "search-summary" in dom.stdout or "Search Results" in dom.stdout, dom.stdout[-2000:]
    assert re.search(r'href="[^"]*reference/api/serving\.html[^"]*ServerSessionLogic', dom.stdout), dom.stdout[-3000:]
