"""``nbdproto info`` and ``nbdproto list``: what a server says about its exports, for people and for scripts.

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
      "meta_contexts": ["base:allocation"],
      "protocol": {"tls": false, "structured_replies": true, "extended_headers": true}
    }

``list --json`` prints ``{"exports": [{"name": ..., "description": ...}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import ssl
from typing import Any

from nbdproto import TransmissionFlags
from nbdproto.tls import client_context
from nbdproto_threads import Client, connect, list_exports

from ._command_args import starting_servers

__all__ = ["add_query_commands", "info", "list_command", "describe"]

CAPABILITIES = {
    "read_only": TransmissionFlags.READ_ONLY,
    "flush": TransmissionFlags.SEND_FLUSH,
    "fua": TransmissionFlags.SEND_FUA,
    "rotational": TransmissionFlags.ROTATIONAL,
    "trim": TransmissionFlags.SEND_TRIM,
    "zero": TransmissionFlags.SEND_WRITE_ZEROES,
    "fast_zero": TransmissionFlags.SEND_FAST_ZERO,
    "df": TransmissionFlags.SEND_DF,
    "multi_conn": TransmissionFlags.CAN_MULTI_CONN,
    "cache": TransmissionFlags.SEND_CACHE,
    "resize": TransmissionFlags.SEND_RESIZE,
    "block_status_payload": TransmissionFlags.BLOCK_STATUS_PAYLOAD,
}


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", metavar="PEM", help="CA certificate to verify the server with (nbds:// URIs)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for servers that ask for one")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def client_tls(args: argparse.Namespace, uri: str) -> ssl.SSLContext | None:
    """The client TLS context ``--tls-ca`` / ``--tls-cert`` / ``--tls-key`` ask for, on top of the URI's own
    TLS settings (nbdproto.tls.client_context); None without them: the clients then take the URI's settings
    themselves (``nbds://alice@host/?tls-psk-file=keys.psk``, ``tls-certificates=DIR``, ...)."""
    if not (args.tls_ca or args.tls_cert):
        return None
    return client_context(uri, cafile=args.tls_ca, certfile=args.tls_cert, keyfile=args.tls_key)


def add_query_commands(commands: Any) -> None:
    info_parser = commands.add_parser("info", help="show an export's size, capabilities and block sizes")
    info_parser.add_argument("uri", metavar="URI", help="nbd://host[:port]/export, nbds://..., nbd+unix:///?socket=")
    info_parser.add_argument("--json", action="store_true", help="print the stable JSON schema instead")
    add_tls_arguments(info_parser)
    list_parser = commands.add_parser("list", help="list the exports a server offers")
    list_parser.add_argument("uri", metavar="URI")
    list_parser.add_argument("--json", action="store_true", help="print JSON")
    add_tls_arguments(list_parser)


def describe(client: Client, uri: str) -> dict[str, Any]:
    """The ``info --json`` document for a connected client."""
    export = client.export
    handshake = client.handshake
    assert handshake is not None
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
        "meta_contexts": sorted(client.meta_contexts.values()),
        "protocol": {
            "tls": client.engine.tls_active,
            "structured_replies": handshake.structured_replies,
            "extended_headers": handshake.extended_headers,
        },
    }


@starting_servers("uri")
def info(args: argparse.Namespace) -> int:
    with connect(args.uri, tls=client_tls(args, args.uri)) as client:
        document = describe(client, args.uri)
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"export: {document['export_name']!r}  ({document['uri']})")
    if document["description"]:
        print(f"description: {document['description']}")
    print(f"size: {document['size']} bytes ({_human(document['size'])})")
    sizes = document["block_size"]
    print(f"block sizes: minimum {sizes['minimum']}, preferred {sizes['preferred']}, maximum {sizes['maximum']}")
    print("capabilities: " + ", ".join(name for name, on in document["capabilities"].items() if on))
    print("meta contexts: " + (", ".join(document["meta_contexts"]) or "none"))
    protocol = document["protocol"]
    reply_form = "extended headers" if protocol["extended_headers"] else (
        "structured replies" if protocol["structured_replies"] else "simple replies")  # fmt: skip
    print(f"protocol: fixed newstyle, {reply_form}, {'TLS' if protocol['tls'] else 'no TLS'}")
    return 0


@starting_servers("uri")
def list_command(args: argparse.Namespace) -> int:
    exports = list_exports(args.uri, tls=client_tls(args, args.uri))
    if args.json:
        print(json.dumps({"exports": [{"name": e.name, "description": e.description} for e in exports]}, indent=2))
        return 0
    for export in exports:
        print(f"{export.name!r}" + (f"  {export.description}" if export.description else ""))
    return 0


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"
