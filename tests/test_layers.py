"""The layers, checked on the source: imports run one way, from the backends and the command line down to the wire.

A *node* here is one layer: a subpackage of nbdproto (wire, engine, serving, client, sockets, tls, devices, cli,
...), the root facade (``nbdproto/__init__.py``), or a backend (nbdproto_threads, nbdproto_anyio). Every import
of a module counts, lazy ones in functions and under ``TYPE_CHECKING`` included: a lazy import hides a
dependency from the importer, not from the reader.
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKENDS = ("nbdproto_threads", "nbdproto_anyio")
MAX_ROOT_MODULES = 10
ROOT_FACADE = "nbdproto"


def _node_of(parts: tuple[str, ...], root: pathlib.Path) -> str | None:
    """The layer a module (dotted parts) belongs to, or None outside the project."""
    if not parts or parts[0] not in ("nbdproto", *BACKENDS):
        return None
    if parts[0] in BACKENDS:
        return parts[0]
    if len(parts) > 1 and (root / "nbdproto" / parts[1]).is_dir():
        return f"nbdproto.{parts[1]}"
    if len(parts) > 1 and parts[1] == "__main__":
        return "nbdproto.cli"  # python -m nbdproto is the command line
    return ROOT_FACADE


def _module_node(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return _node_of(parts, root) or "?"


def _imports(path: pathlib.Path, root: pathlib.Path) -> list[tuple[int, tuple[str, ...]]]:
    """Every module ``path`` imports, as dotted parts (``from a import b`` gives a.b, since b may be a module),
    with relative imports resolved."""
    package = path.relative_to(root).parent.parts
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
            found += [(node.lineno, (*module, alias.name)) for alias in node.names]
    return found


def _sources(root: pathlib.Path) -> list[pathlib.Path]:
    tops = [root / top for top in ("nbdproto", *BACKENDS) if (root / top).is_dir()]
    return sorted(path for top in tops for path in top.rglob("*.py"))


def edges(root: pathlib.Path = ROOT) -> dict[str, dict[str, str]]:
    """node -> {node it imports: where (the first such import, as path:line)}."""
    graph: dict[str, dict[str, str]] = {}
    for path in _sources(root):
        here = _module_node(path, root)
        targets = graph.setdefault(here, {})
        for line, parts in _imports(path, root):
            there = _node_of(parts, root)
            if there is not None and there != here:
                targets.setdefault(there, f"{path.relative_to(root)}:{line}")
    return graph


def backend_imports(root: pathlib.Path = ROOT) -> list[str]:
    """Imports of a backend from anywhere under nbdproto/ but the command line."""
    graph = edges(root)
    return sorted(
        f"{where} imports {backend}"
        for node, targets in graph.items()
        if node.startswith("nbdproto") and node != "nbdproto.cli"
        for backend, where in targets.items()
        if backend in BACKENDS
    )


def cycles(root: pathlib.Path = ROOT) -> list[list[str]]:
    """Every strongly connected group of two or more layers (Tarjan), each sorted; none in a layered tree."""
    graph = edges(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for there in graph.get(node, {}):
            if there not in index:
                visit(there)
                low[node] = min(low[node], low[there])
            elif there in on_stack:
                low[node] = min(low[node], index[there])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def root_modules(root: pathlib.Path = ROOT) -> list[str]:
    return sorted(path.name for path in (root / "nbdproto").glob("*.py"))


def test_no_module_under_nbdproto_but_the_cli_imports_a_backend() -> None:
    # The engine's distribution must not depend on a backend: the devices get their blocking sockets from
    # nbdproto.sockets, and only the command line (which runs servers) chooses a backend.
    assert backend_imports() == []


def test_no_layer_imports_one_that_imports_it_back() -> None:
    assert cycles() == []


def test_the_root_of_nbdproto_holds_only_the_facade() -> None:
    modules = root_modules()
    assert len(modules) <= MAX_ROOT_MODULES, f"nbdproto/ holds {modules}: put new modules in the layer they belong to"


def test_the_layers_run_from_the_wire_up() -> None:
    # The order a reader can rely on: each layer imports only layers to its left.
    order = [
        "nbdproto.wire",
        "nbdproto.engine",
        "nbdproto.client",
        "nbdproto.serving",
        "nbdproto.sockets",
        "nbdproto.files",
        "nbdproto.tls",
        "nbdproto.devices",
    ]
    graph = edges()
    for position, layer in enumerate(order):
        above = set(order[position + 1 :])
        assert not above & set(graph.get(layer, {})), f"{layer} imports {sorted(above & set(graph[layer]))}"


def _tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checks_see_a_backend_import_and_a_cycle_hidden_in_a_function(tmp_path: pathlib.Path) -> None:
    root = _tree(
        tmp_path,
        {
            "nbdproto/__init__.py": "from .engine import Thing\n",
            "nbdproto/engine/__init__.py": "",
            "nbdproto/devices/__init__.py": "def later():\n    from nbdproto_threads import connect\n",
            "nbdproto/cli/__init__.py": "import nbdproto_threads\n",
            "nbdproto_threads/__init__.py": "from nbdproto.devices import MemoryDevice\n",
        },
    )
    assert backend_imports(root) == ["nbdproto/devices/__init__.py:2 imports nbdproto_threads"]
    assert cycles(root) == [["nbdproto.devices", "nbdproto_threads"]]


def test_the_checks_see_a_cycle_between_subpackages_and_count_the_root(tmp_path: pathlib.Path) -> None:
    root = _tree(
        tmp_path,
        {
            **{f"nbdproto/_m{i}.py": "" for i in range(MAX_ROOT_MODULES)},
            "nbdproto/__init__.py": "",
            "nbdproto/engine/__init__.py": "from nbdproto.serving import carry_out\n",
            "nbdproto/serving/__init__.py": "from ..engine import ServerConnection\n",
            "nbdproto/wire/__init__.py": "",
        },
    )
    assert cycles(root) == [["nbdproto.engine", "nbdproto.serving"]]
    assert len(root_modules(root)) == MAX_ROOT_MODULES + 1
    assert backend_imports(root) == []


def _readme_layout_paths(readme: str) -> list[str]:
    """The paths the README's layout table names: its first column, and every `file` a row names beside it."""
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths: list[str] = []
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first, rest = row.split("|")[1:3]
        base = first.strip().strip("`")
        paths.append(base)
        if base.endswith("/"):
            paths += [base + name for name in re.findall(r"`(\w+\.(?:py|sh|md))`", rest)]
    return paths


def test_the_readme_layout_names_every_layer_and_only_what_exists() -> None:
    paths = _readme_layout_paths((ROOT / "README.md").read_text())
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert missing == [], f"the README's layout names paths that do not exist: {missing}"
    layers = {f"nbdproto/{d.name}/" for d in (ROOT / "nbdproto").iterdir() if (d / "__init__.py").exists()}
    layers |= {f"{top}/" for top in BACKENDS}
    unnamed = sorted(layers - set(paths))
    assert unnamed == [], f"the README's layout does not name {unnamed}"


def test_no_layer_but_the_cli_imports_the_root_facade() -> None:
    # The layers import each other by their own names (``from nbdproto.engine import ...``), so that the graph
    # above is the real one: the root re-exports them, and importing it from below would hide which layer a
    # name comes from (and would be a cycle through the facade).
    graph = edges()
    offenders = sorted(
        f"{where} imports the nbdproto facade"
        for node, targets in graph.items()
        if node.startswith("nbdproto.") and node != "nbdproto.cli"
        for there, where in targets.items()
        if there == ROOT_FACADE
    )
    assert offenders == []
