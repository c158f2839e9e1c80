"""What ``nbdproto info`` says of an export: nbdinfo's JSON document and text layout, the ``content:`` probe, and
the answers to ``--can`` / ``--is``.

``info --json`` prints nbdinfo's schema (libnbd 1.14), so that scripts written for nbdinfo parse ours:

    {
      "protocol": "newstyle-fixed", "TLS": false, "structured": true,
      "extended": true,                      # ours: extended headers agreed (newer nbdinfo prints it too)
      "exports": [
        {
          "export-name": "disk",             # the server's canonical name, else the one asked for
          "description": "...",              # only when the server gave one
          "content": "DOS/MBR boot sector",  # file(1) on the first 8 KiB, unless --no-content (and --list)
          "uri": "nbd://127.0.0.1/disk",     # not for a server started with [ CMD ] (its socket is gone)
          "contexts": ["base:allocation"],   # every meta context the server offers for the export
          "is_rotational": false, "is_read_only": false,
          "can_cache": true, "can_df": true, "can_fast_zero": true, "can_flush": true, "can_fua": true,
          "can_multi_conn": true, "can_trim": true, "can_zero": true,
          "can_resize": false, "can_block_status_payload": false,   # ours
          "block_size_minimum": 1, "block_size_preferred": 4096, "block_size_maximum": 33554432,
                                             # only when the server stated its block sizes
          "export-size": 1073741824, "export-size-str": "1G"
        }
      ]
    }

The text layout is nbdinfo's: a protocol line, then for each export ``export="NAME":`` and tab-indented
``key: value`` lines in the same order (without our extra keys).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from nbdproto import BASE_ALLOCATION, Export, TransmissionFlags
from nbdproto_threads import Client

__all__ = ["FEATURES", "CONTENT_BYTES", "export_document", "connection_document", "text_lines", "human_size",
           "content_of", "protocol_line"]  # fmt: skip

TF = TransmissionFlags

_NBDINFO_FLAGS = {
    "can_cache": TF.SEND_CACHE,
    "can_df": TF.SEND_DF,
    "can_fast_zero": TF.SEND_FAST_ZERO,
    "can_flush": TF.SEND_FLUSH,
    "can_fua": TF.SEND_FUA,
    "can_multi_conn": TF.CAN_MULTI_CONN,
    "can_trim": TF.SEND_TRIM,
    "can_zero": TF.SEND_WRITE_ZEROES,
}
"""nbdinfo's can_* keys, in its order, and the transmission flag each reports."""

_OUR_FLAGS = {"can_resize": TF.SEND_RESIZE, "can_block_status_payload": TF.BLOCK_STATUS_PAYLOAD}
"""What the export says that nbdinfo 1.14 does not show: extra keys of the JSON document."""

CONTENT_BYTES = 8192
"""How much of the export ``file`` sees for the ``content:`` line, as nbdinfo gives it."""


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


def connection_document(tls: bool, structured: bool, extended: bool) -> dict[str, Any]:
    """The per-connection keys that open the document."""
    return {"protocol": "newstyle-fixed", "TLS": tls, "structured": structured, "extended": extended}


def export_document(
    export: Export, contexts: list[str] | None, uri: str | None = None, content: str | None = None, name: str = ""
) -> dict[str, Any]:
    """nbdinfo's document of one export (``name``: the name asked for, when the server gave no canonical one)."""
    doc: dict[str, Any] = {"export-name": export.name or name}
    if export.description:
        doc["description"] = export.description
    if content is not None:
        doc["content"] = content
    if uri is not None:
        doc["uri"] = uri
    if contexts is not None:
        doc["contexts"] = contexts
    doc["is_rotational"] = bool(export.flags & TF.ROTATIONAL)
    doc["is_read_only"] = bool(export.flags & TF.READ_ONLY)
    doc.update({key: bool(export.flags & flag) for key, flag in _NBDINFO_FLAGS.items()})
    doc.update({key: bool(export.flags & flag) for key, flag in _OUR_FLAGS.items()})
    if export.block_sizes_known:
        doc["block_size_minimum"] = export.minimum_block_size
        doc["block_size_preferred"] = export.preferred_block_size
        doc["block_size_maximum"] = export.maximum_payload
    doc["export-size"] = export.size
    doc["export-size-str"] = human_size(export.size)
    return doc


def protocol_line(doc: dict[str, Any]) -> str:
    """nbdinfo's first line: how the handshake went."""
    line = "protocol: newstyle-fixed " + ("with TLS" if doc["TLS"] else "without TLS")
    return (
        line
        + ", using "
        + ("extended" if doc["extended"] else "structured" if doc["structured"] else "simple")
        + (" packets")
    )


def text_lines(doc: dict[str, Any]) -> Iterator[str]:
    """One export's lines in nbdinfo's layout (the protocol line is the caller's)."""
    yield f"export={json.dumps(doc['export-name'])}:"
    if doc.get("description"):
        yield f"\tdescription: {doc['description']}"
    size, size_str = doc["export-size"], doc["export-size-str"]
    yield f"\texport-size: {size}" + (f" ({size_str})" if size_str != str(size) else "")
    if "content" in doc:
        yield f"\tcontent: {doc['content']}"
    if "uri" in doc:
        yield f"\turi: {doc['uri']}"
    if "contexts" in doc:
        yield "\tcontexts:"
        yield from (f"\t\t{name}" for name in doc["contexts"])
    for key in ("is_rotational", "is_read_only", *_NBDINFO_FLAGS):
        yield f"\t{key}: {'true' if doc[key] else 'false'}"
    for key in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
        if key in doc:
            yield f"\t{key}: {doc[key]}"


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


def content_of(client: Client) -> str | None:
    """What file(1) says of the export's first CONTENT_BYTES (nbdinfo's ``content:``); None where file is not
    installed or says nothing, or the read fails (a best effort, as in nbdinfo)."""
    program = shutil.which("file")
    if program is None:
        return None
    try:
        data = client.pread(min(client.size, CONTENT_BYTES), 0) if client.size else b""
    except OSError:
        return None
    fd, path = tempfile.mkstemp(prefix="nbdproto-content-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        done = subprocess.run([program, "-b", path], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "LC_ALL": "C"})  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    line = done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else ""
    return line or None
