"""The annotations of the sans-IO layers and the devices resolve at run time (typing.get_type_hints), not only
for mypy: the typed API is read by tools at run time too (dataclass-based configuration loaders, documentation
generators, ``inspect``), and an annotation that names a wrong type or operator fails them there."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import typing
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("wire", "engine", "serving", "devices")
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for layer in LAYERS
    for path in (ROOT / "nbdproto" / layer).rglob("*.py")
)


def _annotated(module: Any) -> list[Any]:
    """Every class and function ``module`` defines, with the methods, static and class methods and property
    getters of its classes."""
    found = []
    for thing in vars(module).values():
        if getattr(thing, "__module__", None) != module.__name__:
            continue
        found.append(thing)
        if inspect.isclass(thing):
            for member in vars(thing).values():
                if isinstance(member, (staticmethod, classmethod)):
                    found.append(member.__func__)
                elif isinstance(member, property):
                    found.append(member.fget)
                elif inspect.isfunction(member):
                    found.append(member)
    return [thing for thing in found if inspect.isclass(thing) or inspect.isfunction(thing)]


def test_every_layer_has_modules() -> None:
    assert {name.split(".")[1] for name in MODULES} == set(LAYERS)


@pytest.mark.parametrize("name", MODULES)
def test_every_annotation_resolves(name: str) -> None:
    module = importlib.import_module(name)
    for thing in _annotated(module):
        typing.get_type_hints(thing)  # raises on an annotation that is not a type
