"""Matching a client's meta context queries against the contexts an export supports.

The spec leaves query syntax to each namespace, save for ``base:``; this is the syntax nbdproto implements,
the same for every namespace (spec: "Metadata querying", "The base: metadata namespace"):

- a query is ``namespace:leaf``; a query without a colon is invalid (NBD_REP_ERR_INVALID);
- ``namespace:leaf`` selects the context of exactly that name, if the export has it; unknown names and unknown
  namespaces are ignored, never an error;
- ``namespace:`` (empty leaf) is a wildcard for every context of that namespace when *listing*, and selects
  nothing when *setting*, as the spec requires of ``base:``; likewise any query ending in a colon lists every
  context whose name starts with it, as qemu answers ``qemu:dirty-bitmap:`` (every bitmap);
- no queries at all lists every context, and sets none.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["match_meta_contexts"]


def match_meta_contexts(queries: Sequence[str], available: Sequence[str], *, listing: bool) -> list[str] | None:
    """The contexts of ``available`` that ``queries`` choose, in the export's order, without duplicates.

    ``listing`` is True for NBD_OPT_LIST_META_CONTEXT and False for NBD_OPT_SET_META_CONTEXT. Returns None when
    a query is malformed (no namespace colon), which the server answers with NBD_REP_ERR_INVALID.
    """
    if any(":" not in query for query in queries):
        return None
    if not queries:
        return list(available) if listing else []
    chosen = []
    for name in available:
        for query in queries:
            if query == name or (listing and query[-1] == ":" and name.startswith(query)):
                chosen.append(name)
                break
    return chosen
