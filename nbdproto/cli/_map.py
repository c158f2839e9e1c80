"""``nbdproto info --map [CONTEXT]``: the extents of one meta context over a whole export, as nbdinfo prints them.

Backup tools read ``nbdinfo --map --json`` (allocation) and ``--map=qemu:dirty-bitmap:NAME --json`` (what changed
since a checkpoint): a list of ``{"offset", "length", "type", "description"}`` covering the export in order,
adjacent extents of the same type merged. ``type`` is the raw status value of the context; ``description`` is
given where the context is one whose values are known (``base:allocation``: data, hole, zero, hole,zero;
``qemu:dirty-bitmap:*``: clean, dirty; ``qemu:allocation-depth``: absent, local, backing depth N) and left out
otherwise. ``--totals`` sums the extents by type, with each type's share of the export in percent. The text
and JSON layouts are nbdinfo's (libnbd 1.14), so either tool's output parses the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from nbdproto_threads import Client

__all__ = ["MapEntry", "describe_status", "walk_extents", "map_lines", "totals_lines"]

_COMPACT_SPAN = (1 << 32) - (1 << 16)
"""The most one compact block status request can ask about, a multiple of any minimum block size."""


@dataclass
class MapEntry:
    """One run of the map: ``length`` bytes from ``offset`` with the context's status value ``type``."""

    offset: int
    length: int
    type: int


def describe_status(context: str, status: int) -> str | None:
    """What a status value of ``context`` means, in nbdinfo's words; None for contexts (or values) it does not
    know."""
    if context == "base:allocation":
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}.get(status)
    if context.startswith("qemu:dirty-bitmap:"):
        return {0: "clean", 1: "dirty"}.get(status)
    if context == "qemu:allocation-depth":
        return {0: "absent", 1: "local"}.get(status, f"backing depth {status}")
    return None


def walk_extents(client: Client, context: str) -> Iterator[MapEntry]:
    """The extents of ``context`` (negotiated on ``client``) from offset 0 to the end of the export, adjacent
    runs of one type merged. Each request asks for the rest of the export (as much as a compact request can
    say without extended headers); a server may answer for less, and the next request starts where it stopped;
    an extent reaching past the end of the export is cut there."""
    size = client.size
    extended = client.handshake is not None and client.handshake.extended_headers
    offset = 0
    current: MapEntry | None = None
    while offset < size:
        length = size - offset if extended else min(size - offset, _COMPACT_SPAN)
        for extent in client.block_status(length, offset, context=context):
            run = min(extent.length, size - offset)
            if current is not None and current.type == extent.status:
                current.length += run
            else:
                if current is not None:
                    yield current
                current = MapEntry(offset, run, extent.status)
            offset += run
            if offset >= size:
                break
    if current is not None:
        yield current


def map_lines(entries: list[MapEntry], context: str, as_json: bool) -> Iterator[str]:
    """The map as nbdinfo prints it: a table of offset, length, type and description, or a JSON list."""
    if as_json:
        yield "["
        rows = []
        for entry in entries:
            fields = {"offset": entry.offset, "length": entry.length, "type": entry.type}
            description = describe_status(context, entry.type)
            if description is not None:
                fields["description"] = description  # type: ignore[assignment]
            rows.append("{ " + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items()) + "}")
        yield from (row + ("," if i < len(rows) - 1 else "") for i, row in enumerate(rows))
        yield "]"
        return
    for entry in entries:
        description = describe_status(context, entry.type)
        line = f"{entry.offset:10d}  {entry.length:10d}  {entry.type:3d}"
        yield line + (f"  {description}" if description is not None else "")


def totals_lines(entries: list[MapEntry], context: str, size: int, as_json: bool) -> Iterator[str]:
    """How many bytes have each type, and what share of the export that is, as nbdinfo's ``--totals``."""
    sums: dict[int, int] = {}
    for entry in entries:
        sums[entry.type] = sums.get(entry.type, 0) + entry.length
    rows = []
    for status in sorted(sums):
        percent = 100.0 * sums[status] / size if size else 0.0
        rows.append((sums[status], percent, status, describe_status(context, status)))
    if as_json:
        yield "["
        texts = []
        for total, percent, status, description in rows:
            text = f'{{ "size": {total}, "percent": {percent:g}, "type": {status}'
            texts.append(text + (f', "description": {json.dumps(description)} }}' if description is not None else " }"))
        yield from (text + ("," if i < len(texts) - 1 else "") for i, text in enumerate(texts))
        yield "]"
        return
    for total, percent, status, description in rows:
        yield f"{total:10d} {percent:5.1f}% {status:3d}" + (f" {description}" if description is not None else "")
