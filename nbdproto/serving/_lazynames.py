"""Names a package loads on first use (PEP 562), so that importing it costs only what the caller touches.

The packages use it for their heavy halves: nbdproto's server side, nbdproto_threads' server and devices,
nbdproto_anyio's everything (its command line's copy, info and list need no event loop). Each lists the
names in a literal ``__all__`` and imports them under ``TYPE_CHECKING`` too, so type checkers and readers see
them as ordinary imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    package: str, where: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: ``where`` maps each lazy name to the module
    (relative to ``package``, or absolute) it comes from; ``namespace`` is the package's ``globals()``, which
    keeps each name once loaded."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
