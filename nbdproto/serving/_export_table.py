"""ExportTable: a server's exports as a table that may change while it serves.

A server given a plain mapping offers what the mapping held when it started. Some exports come and go while
clients are served: a checkpoint's backup view is served as ``EXPORT@NAME`` from the moment it is taken until
it is released (``nbdproto.devices.bitmaps``, through the control socket). Given an ``ExportTable``, a server
looks each name up in the table as it is when a client asks, and NBD_OPT_LIST answers with the names it holds
then (``offer``: a sequence read afresh by each new connection).

The table is replaced whole on every change (copy on write), so a lookup never sees one half done and needs
no lock; changes are made from one thread at a time (the caller serialises them: the control socket's
commands run one at a time).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, overload

from nbdproto.engine import ExportListing

from ._device import BlockDevice
from ._export import ExportSpec

__all__ = ["ExportTable"]


class ExportTable(Mapping[str, "ExportSpec[Any]"]):
    """Names mapped to ExportSpecs (a plain device given is served read-only, as in a server's mapping); a
    Mapping, so a server takes it where it takes a mapping of exports, and looks names up live."""

    def __init__(self, exports: Mapping[str, BlockDevice | ExportSpec[Any]] | None = None) -> None:
        self._specs: dict[str, ExportSpec[Any]] = {
            name: value if isinstance(value, ExportSpec) else ExportSpec(value)
            for name, value in (exports or {}).items()
        }
        self.offer: Sequence[ExportListing] = _Listing(self)
        """What NBD_OPT_LIST answers: the names (with descriptions) the table holds when it is read."""

    def __getitem__(self, name: str) -> ExportSpec[Any]:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._specs))

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, name: str, default: Any = None) -> Any:
        """The export named ``name`` as the table is now, else ``default``: the lookup a server makes for every
        name a client asks for."""
        return self._specs.get(name, default)

    def add(self, name: str, spec: ExportSpec[Any]) -> None:
        """Serve ``spec`` as ``name`` from now on. KeyError when the name is taken."""
        if name in self._specs:
            raise KeyError(f"an export named {name!r} exists already")
        self._specs = {**self._specs, name: spec}

    def remove(self, name: str) -> ExportSpec[Any] | None:
        """Stop offering ``name`` to new clients (those that chose it go on with its device); its spec, or
        None when there was none."""
        spec = self._specs.get(name)
        if spec is not None:
            self._specs = {key: value for key, value in self._specs.items() if key != name}
        return spec


class _Listing(Sequence[ExportListing]):
    """The listing of an ExportTable as it is whenever it is read."""

    def __init__(self, table: ExportTable) -> None:
        self._table = table

    def _now(self) -> list[ExportListing]:
        return [ExportListing(name, spec.description) for name, spec in self._table._specs.items()]

    def __iter__(self) -> Iterator[ExportListing]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._table)

    @overload
    def __getitem__(self, index: int) -> ExportListing: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ExportListing]: ...
    def __getitem__(self, index: int | slice) -> ExportListing | Sequence[ExportListing]:
        return self._now()[index]
