"""What ``nbdproto info`` says of an export: the stable JSON document, nbdinfo's text layout, and the answers
to ``--can`` / ``--is``.

The ``--json`` output of ``info`` is a stable schema (keys are only ever added, never renamed):

    {
      "uri": "nbd://127.0.0.1:10809/disk",
      "export_name": "disk",            # the canonical name the server gave (NBD_INFO_NAME), else the one asked
      "description": "",                # NBD_INFO_DESCRIPTION, "" when none
      "size": 1073741824,
      "block_size": {"minimum": 1, "preferred": 4096, "maximum": 33554432, "advertised": true},
      "capabilities": {"read_only": false, "flush": true, "fua": true, "rotational": false, "trim": true,
                       "zero": true, "fast_zero": true, "df": true, "multi_conn": true, "cache": true,
                       "resize": false, "block_status_payload": false},
      "meta_contexts": ["base:allocation"],   # every context the server offers for the export
      "protocol": {"tls": false, "structured_replies": true, "extended_headers": true}
    }

``info --list --json`` prints ``{"protocol": {...}, "exports": [...]}``, each export a document of the same
schema without "protocol" (and with "error" instead of the facts the server refused to give).

The text layout is nbdinfo's (libnbd 1.14) without its content probe: a protocol line, then for each export
``export="NAME":`` and tab-indented ``key: value`` lines (description, export-size, uri, contexts, is_*,
can_*, block_size_*), so that people and scripts that read one read the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from nbdproto import BASE_ALLOCATION, Export, ExportDetails, TransmissionFlags, format_uri, parse_uri
from nbdproto_threads import Client

__all__ = ["CAPABILITIES", "FEATURES", "document", "client_document", "details_document", "text_lines", "human_size"]

TF = TransmissionFlags
CAPABILITIES = {
    "read_only": TF.READ_ONLY,
    "flush": TF.SEND_FLUSH,
    "fua": TF.SEND_FUA,
    "rotational": TF.ROTATIONAL,
    "trim": TF.SEND_TRIM,
    "zero": TF.SEND_WRITE_ZEROES,
    "fast_zero": TF.SEND_FAST_ZERO,
    "df": TF.SEND_DF,
    "multi_conn": TF.CAN_MULTI_CONN,
    "cache": TF.SEND_CACHE,
    "resize": TF.SEND_RESIZE,
    "block_status_payload": TF.BLOCK_STATUS_PAYLOAD,
}


def _flag(flag: TransmissionFlags) -> Callable[[Client], bool]:
    return lambda client: bool(client.export.flags & flag)


FEATURES: dict[str, Callable[[Client], bool]] = {
    "connect": lambda client: True,
    "read": lambda client: True,
    "write": lambda client: not client.export.read_only,
    "read-only": _flag(TF.READ_ONLY),
    "rotational": _flag(TF.ROTATIONAL),
    "flush": _flag(TF.SEND_FLUSH),
    "fua": _flag(TF.SEND_FUA),
    "trim": _flag(TF.SEND_TRIM),
    "zero": _flag(TF.SEND_WRITE_ZEROES),
    "fast-zero": _flag(TF.SEND_FAST_ZERO),
    "cache": _flag(TF.SEND_CACHE),
    "df": _flag(TF.SEND_DF),
    "multi-conn": _flag(TF.CAN_MULTI_CONN),
    "block-status": lambda client: BASE_ALLOCATION in client.meta_contexts.values(),
    "structured-reply": lambda client: client.handshake is not None and client.handshake.structured_replies,
    "extended-headers": lambda client: client.handshake is not None and client.handshake.extended_headers,
    "tls": lambda client: client.engine.tls_active,
}
"""nbdinfo's ``--can`` / ``--is`` names (either word takes any of them, as in nbdinfo), each a test of a
connected client: ``block-status`` is whether ``base:allocation`` was agreed."""


def document(export: Export, uri: str, contexts: list[str]) -> dict[str, Any]:
    """The stable JSON document of one export (without "protocol")."""
    return {
        "uri": uri,
        "export_name": export.name,
        "description": export.description,
        "size": export.size,
        "block_size": {
            "minimum": export.minimum_block_size,
            "preferred": export.preferred_block_size,
            "maximum": export.maximum_payload,
            "advertised": export.block_sizes_known,
        },
        "capabilities": {name: bool(export.flags & flag) for name, flag in CAPABILITIES.items()},
        "meta_contexts": contexts,
    }


def client_document(client: Client, uri: str) -> dict[str, Any]:
    """The ``info --json`` document of a connected client (contexts: those the server offered when asked,
    else those agreed)."""
    handshake = client.handshake
    assert handshake is not None
    offered = client.available_meta_contexts
    contexts = sorted(offered if offered is not None else client.meta_contexts.values())
    return {
        **document(client.export, uri, contexts),
        "protocol": {
            "tls": client.engine.tls_active,
            "structured_replies": handshake.structured_replies,
            "extended_headers": handshake.extended_headers,
        },
    }


def details_document(details: ExportDetails, base_uri: str) -> dict[str, Any]:
    """The document of one export an opt-mode inquiry described (``--list``): "error" where it was refused."""
    uri = format_uri(replace(parse_uri(base_uri), export_name=details.name))
    contexts = sorted(details.meta_contexts or ())
    if details.export is None:
        return {"uri": uri, "export_name": details.name, "description": details.listed_description,
                "meta_contexts": contexts, "error": "; ".join(str(e) for e in details.errors)}  # fmt: skip
    return document(details.export, uri, contexts)


def protocol_line(protocol: dict[str, bool]) -> str:
    """nbdinfo's first line: how the handshake went."""
    line = "protocol: newstyle-fixed " + ("with TLS" if protocol["tls"] else "without TLS")
    if protocol["extended_headers"]:
        return line + ", using extended packets"
    return line + (", using structured packets" if protocol["structured_replies"] else "")


def text_lines(doc: dict[str, Any]) -> Iterator[str]:
    """One export's lines in nbdinfo's layout (the protocol line is the caller's)."""
    yield f'export="{doc["export_name"]}":'
    if doc.get("description"):
        yield f"\tdescription: {doc['description']}"
    if "error" in doc:
        yield f"\terror: {doc['error']}"
        yield f"\turi: {doc['uri']}"
        return
    yield f"\texport-size: {doc['size']} ({human_size(doc['size'])})"
    yield f"\turi: {doc['uri']}"
    if doc["meta_contexts"]:
        yield "\tcontexts:"
        yield from (f"\t\t{name}" for name in doc["meta_contexts"])
    caps = doc["capabilities"]
    yield f"\tis_rotational: {_bool(caps['rotational'])}"
    yield f"\tis_read_only: {_bool(caps['read_only'])}"
    for name in ("cache", "df", "fast_zero", "flush", "fua", "multi_conn", "trim", "zero"):
        yield f"\tcan_{name}: {_bool(caps[name])}"
    sizes = doc["block_size"]
    if sizes["advertised"]:
        yield f"\tblock_size_minimum: {sizes['minimum']}"
        yield f"\tblock_size_preferred: {sizes['preferred']}"
        yield f"\tblock_size_maximum: {sizes['maximum']}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def human_size(size: int) -> str:
    """A size in the largest binary unit that divides it exactly, as nbdinfo shows it: 8388608 is "8M",
    2125119488 "2075312K", 1000 "1000"."""
    unit = ""
    for next_unit in "KMGTPE":
        if size == 0 or size % 1024:
            break
        size //= 1024
        unit = next_unit
    return f"{size}{unit}"
