"""What the API reference needs beyond autodoc: every public name documented once, in the layer it belongs to,
and the names a package re-exports listed with a link to that home; type hints that name a private module
(``nbdproto.engine._server.ServerConnection``, which is how Python spells the class) resolved to the public
name the reference documents (``nbdproto.engine.ServerConnection``).

``.. nbdproto-api:: PACKAGE`` documents PACKAGE's ``__all__`` in its order: classes, functions, data and
submodules of its own with the matching autodoc directive, and re-exported names in a table that links each to
its home. A name's home is the lowest layer (HOMES, from the wire up) whose ``__all__`` holds the same object
under the same name.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import sys
import types
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

HOMES = (
    "nbdproto.wire",
    "nbdproto.files",
    "nbdproto.engine",
    "nbdproto.client",
    "nbdproto.serving",
    "nbdproto.sockets",
    "nbdproto.tls",
    "nbdproto.devices",
    "nbdproto.devices.bitmaps",
    "nbdproto.control",
    "nbdproto.libnbd",
    "nbdproto_threads",
    "nbdproto_anyio",
    "nbdproto",
)
"""Every package the reference documents, from the wire up: a name is documented in the first that has it."""


def public_names(package: str) -> list[str]:
    return list(importlib.import_module(package).__all__)


def home_of(package: str, name: str) -> str:
    """The package whose reference page documents ``package.name``."""
    thing = getattr(importlib.import_module(package), name)
    for home in HOMES:
        module = importlib.import_module(home)
        if name in getattr(module, "__all__", ()) and getattr(module, name, None) is thing:
            return home
    return package


def _directive_for(thing: Any) -> str:
    if isinstance(thing, types.ModuleType):
        return "automodule"
    if inspect.isclass(thing):
        return "autoclass"
    if inspect.isfunction(thing) or inspect.isbuiltin(thing):
        return "autofunction"
    return "autodata"


class ApiDirective(SphinxDirective):
    """``nbdproto-api PACKAGE``: the package's own public names, documented, and its re-exports, linked."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        package = self.arguments[0]
        module = importlib.import_module(package)
        lines: list[str] = []
        elsewhere: list[tuple[str, str]] = []
        for name in module.__all__:
            home = home_of(package, name)
            if home != package:
                elsewhere.append((name, home))
                continue
            thing = getattr(module, name)
            directive = _directive_for(thing)
            if directive == "autodata":
                lines += _data_lines(package, name, thing)
                continue
            target = thing.__name__ if directive == "automodule" else f"{package}.{name}"
            lines.append(f".. {directive}:: {target}")
            if directive == "automodule":
                lines.append("   :members:")
            elif directive == "autoclass" and issubclass(thing, enum.Enum):
                lines += ["   :members:", "   :undoc-members:"]
            elif directive == "autoclass" and _private_bases(thing):
                # Methods a class gets from a private base of ours (ServerConnection.receive_data from the
                # shared Connection) are its API: documented on it, as the base is documented nowhere.
                foreign = sorted({base.__name__ for base in thing.__mro__[1:] if not _ours(base)})
                lines.append(f"   :inherited-members: {', '.join(foreign)}")
            lines.append("")
        if elsewhere:
            lines += [
                "Also here",
                "---------",
                "",
                f"``{package}`` offers these too; each is documented in its own layer.",
                "",
                ".. list-table::",
                "   :header-rows: 1",
                "",
                "   * - name",
                "     - documented in",
            ]
            for name, home in elsewhere:
                lines += [f"   * - ``{package}.{name}``", f"     - :py:obj:`{home}.{name}`"]
            lines.append("")
        content = StringList(lines, source=f"<nbdproto-api {package}>")
        container = nodes.container()
        nested_parse_with_titles(self.state, content, container)
        return container.children


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("nbdproto", "nbdproto_threads", "nbdproto_anyio")


def _private_bases(cls: type) -> bool:
    return any(
        (_ours(base) and base.__name__.startswith("_"))
        or (
            "._" in base.__module__
            and _ours(base)
            and base.__name__ not in public_names(base.__module__.split("._")[0])
        )
        for base in cls.__mro__[1:]
    )


def _data_lines(package: str, name: str, thing: Any) -> list[str]:
    """A ``py:data`` entry for a constant or alias: its value when short, and the docstring that follows its
    assignment in whichever module of the package defines it (autodoc would show the docstring of its type)."""
    lines = [f".. py:data:: {name}", f"   :module: {package}"]
    if isinstance(thing, (bool, int, float, str, bytes)) and len(repr(thing)) <= 80:
        lines.append(f"   :value: {thing!r}")
    lines.append("")
    lines += ["   " + line for line in _attribute_doc(package, name, thing)]
    lines.append("")
    return lines


def _attribute_doc(package: str, name: str, thing: Any) -> list[str]:
    root = importlib.import_module(package)
    inside = sorted(
        module
        for module in sys.modules
        if module.startswith(package + ".") and module.count(".") == package.count(".") + 1
    )
    modules = [package, *inside]
    for module_name in modules:
        module = sys.modules.get(module_name) or root
        if getattr(module, name, None) is not thing:
            continue
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except PycodeError:
            continue
        if ("", name) in docs:
            return list(docs[("", name)])
    return []


def resolve_private_paths(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.Node | None:
    """``a.b._c.Name`` (a class's real module) and ``nbdproto.Name`` (a re-export) -> the home the reference
    documents the name in; a private name that is documented nowhere is shown as text."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    parts = target.split(".")
    private = any(part.startswith("_") and not part.startswith("__") for part in parts)
    if private:
        public = [part for part in parts if not (part.startswith("_") and not part.startswith("__"))]
        if public[-1] != parts[-1]:
            return contnode  # a private name itself (a helper base class, a TypeVar): text
        parts = public
    domain = env.get_domain("py")
    candidates = [".".join(parts)]
    for cut in range(len(parts) - 1, 0, -1):  # the longest package prefix, then the name in it
        package, name, rest = ".".join(parts[:cut]), parts[cut], parts[cut + 1 :]
        if package in HOMES and name in public_names(package):
            candidates.append(".".join([home_of(package, name), name, *rest]))
            break
    for candidate in candidates:
        if candidate in domain.objects:  # type: ignore[attr-defined]
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode)
            if found is not None:
                return found
    return contnode if private else None


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("nbdproto-api", ApiDirective)
    app.connect("missing-reference", resolve_private_paths)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
