"""``nbdproto info`` and ``nbdproto list``: what a server says about its exports, for people and for scripts.

``info`` does what nbdinfo does, with nbdinfo's options, layouts and exit codes:

    nbdproto info URI [--json]              the export: size, flags, block sizes, contexts, content (file(1))
    nbdproto info --size URI                the size in bytes, alone
    nbdproto info --can FEATURE URI         exit 0 if it can, 2 if it cannot, 1 on any error (also --is)
    nbdproto info --map[=CONTEXT] URI       extents of base:allocation or CONTEXT (--json, --totals: ``_map``)
    nbdproto info --list URI                every export, each described without selecting it (opt mode)

The JSON document and the text layout are nbdinfo's (``_exportinfo``). ``list`` prints the names a server
lists, one a line (with the description after a tab when there is one); ``list --json`` prints
``{"exports": [{"name": ..., "description": ...}, ...]}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import ssl
import sys
from typing import Any

from nbdproto import BASE_ALLOCATION, format_uri, parse_uri
from nbdproto.client import looks_like_uri
from nbdproto.tls import client_context
from nbdproto_threads import Client, connect, inquire, list_exports

from ._command_args import command_of, starting_servers, was_started
from ._errors import FAILURE_EXIT, UsageError, add_timeout_argument, describe, timeout_of
from ._exportinfo import FEATURES, connection_document, content_of, export_document, protocol_line, text_lines
from ._map import map_lines, totals_lines, walk_extents

__all__ = ["add_query_commands", "add_connection_arguments", "client_tls", "info", "list_command"]

FALSE_EXIT = 2
"""nbdinfo's exit status for "no" to ``--can`` / ``--is`` (1 is kept for errors, usage errors included)."""


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    add_timeout_argument(parser)
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
    info_parser = commands.add_parser("info", help="show an export's size, capabilities, block sizes and maps")
    info_parser.add_argument(
        "uri", metavar="URI", nargs="?", help="nbd://host[:port]/export, nbds://..., nbd+unix:///?socket="
    )
    info_parser.add_argument("--json", action="store_true", help="print JSON, in nbdinfo's schema")
    content = info_parser.add_mutually_exclusive_group()
    content.add_argument(
        "--content",
        action="store_true",
        default=None,
        help="say what the export holds (file(1) on its first 8 KiB; the default, but for --list)",
    )
    content.add_argument("--no-content", dest="content", action="store_false", help="do not read the export")
    mode = info_parser.add_mutually_exclusive_group()
    mode.add_argument("--size", action="store_true", help="print only the size in bytes")
    mode.add_argument(
        "--can", metavar="FEATURE", help="exit 0 if the export can FEATURE, 2 if not: " + ", ".join(FEATURES)
    )
    mode.add_argument("--is", dest="is_", metavar="FEATURE", help="the same as --can (read-only, rotational, tls, ...)")
    mode.add_argument(
        "--map",
        nargs="?",
        const=BASE_ALLOCATION,
        metavar="CONTEXT",
        help="print the extents of a meta context (default base:allocation; e.g. qemu:dirty-bitmap:NAME)",
    )
    mode.add_argument("-L", "--list", action="store_true", help="describe every export the server lists")
    info_parser.add_argument("--totals", action="store_true", help="with --map: bytes and percent of each type")
    add_connection_arguments(info_parser)
    list_parser = commands.add_parser("list", help="list the exports a server offers")
    list_parser.add_argument(
        "uri", metavar="URI", help="the server: nbd://host[:port]/, nbds://..., nbd+unix:///?socket="
    )
    list_parser.add_argument("--json", action="store_true", help="print JSON")
    add_connection_arguments(list_parser)


def _target(args: argparse.Namespace) -> str:
    """The URI to ask. ``--map`` takes an optional CONTEXT, so ``--map URI`` gives the URI to --map: it is
    taken back (nbdinfo spells the context ``--map=CONTEXT``, which stays unambiguous)."""
    if args.uri is None and args.map is not None and (looks_like_uri(args.map) or command_of(args.map)):
        args.uri, args.map = args.map, BASE_ALLOCATION
        if was_started(args, "map"):
            args.started.add("uri")
    if args.uri is None:
        raise UsageError("an NBD URI (or -- [ CMD ARGS ... ]) is needed")
    if args.totals and args.map is None:
        raise UsageError("--totals goes with --map")
    if args.content is not None and (args.map is not None or args.size):
        raise UsageError("--content and --no-content go with neither --map nor --size")
    uri: str = args.uri
    return uri


def _connect(args: argparse.Namespace, uri: str, **options: Any) -> Client:
    return connect(uri, tls=client_tls(args, uri), timeout=timeout_of(args), **options)


def _shown_uri(args: argparse.Namespace, uri: str) -> str | None:
    """The URI to show, unless it is that of a server started for this command (its socket is gone once it
    has printed: nbdinfo leaves it out too)."""
    return None if was_started(args, "uri") else uri


@starting_servers("uri", "map")  # "--map URI" is taken back by _target
def info(args: argparse.Namespace) -> int:
    uri = _target(args)
    feature = args.can or args.is_
    if feature is not None:
        return _feature(args, uri, feature)
    if args.list:
        return _list_details(args, uri)
    if args.map is not None:
        return _map(args, uri, args.map)
    with _connect(args, uri, discover_meta_contexts=not args.size) as client:
        if args.size:
            print(client.size)
            return 0
        handshake = client.handshake
        assert handshake is not None
        offered = client.available_meta_contexts
        contexts = sorted(offered if offered is not None else client.meta_contexts.values())
        content = content_of(client) if args.content is not False else None
        doc = {
            **connection_document(client.engine.tls_active, handshake.structured_replies, handshake.extended_headers),
            "exports": [export_document(client.export, contexts, _shown_uri(args, uri), content)],
        }
    _print_document(doc, args.json)
    return 0


def _print_document(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    lines = [protocol_line(doc)]
    for export in doc["exports"]:
        lines += text_lines(export)
    sys.stdout.write("".join(line + "\n" for line in lines))


def _feature(args: argparse.Namespace, uri: str, feature: str) -> int:
    test = FEATURES.get(feature)
    if test is None:
        raise UsageError(f"unknown --can or --is feature {feature!r} (one of {', '.join(FEATURES)})")
    with _connect(args, uri) as client:
        return 0 if test(client) else FALSE_EXIT


def _map(args: argparse.Namespace, uri: str, context: str) -> int:
    with _connect(args, uri, meta_contexts=(context,)) as client:
        if context not in client.meta_contexts.values():
            raise ValueError(f"--map: the server does not offer meta context {context!r}")
        entries = list(walk_extents(client, context))
        size = client.size
    lines = totals_lines(entries, context, size, args.json) if args.totals else map_lines(entries, context, args.json)
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def _list_details(args: argparse.Namespace, uri: str) -> int:
    """Every export the server lists, described without selecting it (opt mode); with --content each is also
    connected to and read. An export the server will not describe is reported on stderr, as nbdinfo does, and
    the status is then 1."""
    tls = client_tls(args, uri)
    inquiry = inquire(uri, list_exports=True, tls=tls, timeout=timeout_of(args))
    exports = []
    status = 0
    for details in inquiry.exports:
        if details.export is None:
            why = "; ".join(describe(e) or str(e) for e in details.errors) or "no details"
            print(f"nbdproto info: {why} for export: {details.name}", file=sys.stderr)
            status = FAILURE_EXIT
            continue
        export_uri = format_uri(dataclasses.replace(parse_uri(uri), export_name=details.name))
        content = None
        if args.content:
            with connect(export_uri, tls=tls, timeout=timeout_of(args)) as client:
                content = content_of(client)
        contexts = sorted(details.meta_contexts) if details.meta_contexts is not None else None
        exports.append(export_document(details.export, contexts, _shown_uri(args, export_uri), content, details.name))
    doc = {**connection_document(inquiry.tls, inquiry.structured_replies, inquiry.extended_headers), "exports": exports}
    _print_document(doc, args.json)
    return status


@starting_servers("uri")
def list_command(args: argparse.Namespace) -> int:
    exports = list_exports(args.uri, tls=client_tls(args, args.uri), timeout=timeout_of(args))
    if args.json:
        print(json.dumps({"exports": [{"name": e.name, "description": e.description} for e in exports]}, indent=2))
        return 0
    for export in exports:
        print(export.name + (f"\t{export.description}" if export.description else ""))
    return 0
