"""The layout's rules, checked on the source: no package reaches into another's private modules, and no module
grows past what a reader takes in at one sitting.

A *package* here is a directory of modules: nbdproto (the engine), each of its subpackages (devices, cli,
sockets, tls...), nbdproto_threads and nbdproto_anyio. A module may import the private (underscore) modules
of its own package; from any other package only public names, as that package's ``__init__`` offers them.
"""

from __future__ import annotations

import ast
import difflib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("nbdproto", "nbdproto_threads", "nbdproto_anyio")
MAX_LINES = 500


def _modules(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    return sorted(path for package in PACKAGES for path in (root / package).rglob("*.py"))


def _imported_modules(path: pathlib.Path, package: tuple[str, ...]) -> list[tuple[int, tuple[str, ...]]]:
    """Every module ``path`` imports, as dotted parts, with the line: ``import a.b``, ``from a.b import c``
    (a.b, and a.b.c in case c is a module), relative forms resolved against the module's package."""
    found: list[tuple[int, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, tuple(alias.name.split("."))) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = (*base, *(node.module.split(".") if node.module else ()))
            else:
                module = tuple((node.module or "").split("."))
            found.append((node.lineno, module))
            found += [(node.lineno, (*module, alias.name)) for alias in node.names]
    return found


def _private_import_violations(root: pathlib.Path = ROOT) -> list[str]:
    problems: list[str] = []
    for path in _modules(root):
        package = path.parent.relative_to(root).parts
        for line, parts in _imported_modules(path, package):
            if parts[0] not in PACKAGES:
                continue
            private = next(
                (depth for depth, part in enumerate(parts) if part.startswith("_") and part[1:2] != "_"), None
            )
            if private is None or parts[:private] == package:
                continue
            problem = f"{path.relative_to(root)}:{line} imports {'.'.join(parts[: private + 1])}"
            if problem not in problems:
                problems.append(problem)
    return problems


def test_no_module_imports_a_private_module_of_another_package() -> None:
    assert _private_import_violations() == []


def test_the_check_sees_private_imports(tmp_path: pathlib.Path) -> None:
    # The rule bites: a module of nbdproto_anyio reaching into nbdproto.serving._carry_out, or nbdproto.devices into
    # the engine's private modules, is reported; a package's own private modules are its business.
    (tmp_path / "nbdproto_anyio").mkdir()
    (tmp_path / "nbdproto_anyio" / "bad.py").write_text(
        "from nbdproto.serving._carry_out import carry_out\nimport nbdproto.engine._server\n"
    )
    (tmp_path / "nbdproto" / "devices").mkdir(parents=True)
    (tmp_path / "nbdproto" / "devices" / "bad.py").write_text(
        "from ..engine._events import Event\nfrom ._own import fine\nfrom nbdproto.wire import layout\n"
    )
    (tmp_path / "nbdproto_threads").mkdir()
    problems = _private_import_violations(tmp_path)
    assert problems == [
        "nbdproto/devices/bad.py:1 imports nbdproto.engine._events",
        "nbdproto_anyio/bad.py:1 imports nbdproto.serving._carry_out",
        "nbdproto_anyio/bad.py:2 imports nbdproto.engine._server",
    ]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_longer_than_a_reader_takes_in(path: pathlib.Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it along a line a reader would see"


_KEYWORDS = frozenset(
    [
        "False",
        "None",
        "True",
        "and",
        "as",
        "assert",
        "async",
        "await",
        "break",
        "class",
        "continue",
        "def",
        "del",
        "elif",
        "else",
        "except",
        "finally",
        "for",
        "from",
        "global",
        "if",
        "import",
        "in",
        "is",
        "lambda",
        "nonlocal",
        "not",
        "or",
        "pass",
        "raise",
        "return",
        "try",
        "while",
        "with",
        "yield",
    ]
)


def _shape(line: str) -> str:
    """A line as the duplicate finder compares it: names, strings and numbers made placeholders (keywords kept),
    ``async``/``await`` and an ``Async`` prefix dropped, so a blocking and an async twin look alike."""
    line = re.sub(r"\b(async|await)\s+", "", line)
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "S", line)
    line = re.sub(r"\b\d[\w.]*\b", "0", line)
    return re.sub(r"\b[A-Za-z_]\w*\b", lambda m: m.group(0) if m.group(0) in _KEYWORDS else "N", line)


def _code_lines(path: pathlib.Path) -> list[tuple[int, str]]:
    lines = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith(("#", "import ", "from ")) or not re.search(r"\w", text):
            continue
        shape = re.sub(r"\s+", " ", _shape(text))
        if re.fullmatch(r"(S|N|0)[,:]?( (S|N|0),?)?", shape):
            continue  # a lone name, string or number: a docstring, an item of a list (the tool passes these over)
        lines.append((number, shape))
    return lines


def _twin_runs(first: pathlib.Path, second: pathlib.Path, length: int) -> list[str]:
    """Runs of ``length`` or more lines of ``first`` whose shape stands in ``second`` too."""
    a, b = _code_lines(first), _code_lines(second)
    matcher = difflib.SequenceMatcher(None, [t for _, t in a], [t for _, t in b], autojunk=False)
    return [
        f"{first.relative_to(ROOT)}:{a[m.a][0]}-{a[m.a + m.size - 1][0]} ~ "
        f"{second.relative_to(ROOT)}:{b[m.b][0]}-{b[m.b + m.size - 1][0]}"
        for m in matcher.get_matching_blocks()
        if m.size >= length
    ]


def test_the_backends_have_no_twin_code() -> None:
    # A decision both backends make belongs in nbdproto, once: no run of six lines of one backend may stand in
    # the other, even with async/await and every name, string and number aside.
    twins = [
        run
        for threads in sorted((ROOT / "nbdproto_threads").glob("*.py"))
        for anyio in sorted((ROOT / "nbdproto_anyio").glob("*.py"))
        for run in _twin_runs(threads, anyio, 6)
    ]
    assert twins == []


def test_the_twin_check_sees_a_blocking_and_an_async_twin(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = [
        "    def {name}(self, request):",
        "        cookie = self.logic.submit(request)",
        "        self.waiting[cookie] = Waiter()",
        "        if self.failure is not None:",
        "            raise ConnectionError(self.failure)",
        "        {wait}self.flush(cookie)",
        "        return self.logic.outcome(self.replies.pop(cookie))",
    ]
    (tmp_path / "blocking.py").write_text("\n".join(body).format(name="call", wait="") + "\n")
    (tmp_path / "awaiting.py").write_text(
        "\n".join(body).replace("    def", "    async def").format(name="acall", wait="await ") + "\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert len(_twin_runs(tmp_path / "blocking.py", tmp_path / "awaiting.py", 6)) == 1
