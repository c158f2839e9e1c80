"""``nbdproto info`` and ``nbdproto list``: what a server says about its exports, for people and for scripts.

``info`` does what nbdinfo does, with nbdinfo's options, layouts and exit codes:

    nbdproto info URI [--json]              the export: size, flags, block sizes, every meta context offered
    nbdproto info --size URI                the size in bytes, alone
    nbdproto info --can FEATURE URI         exit 0 if it can, 2 if it cannot, 1 on any error (also --is)
    nbdproto info --map[=CONTEXT] URI       extents of base:allocation or CONTEXT (--json, --totals: ``_map``)
    nbdproto info --list URI                every export, each described without selecting it (opt mode)

The JSON document and the text layout are ``_exportinfo``'s. ``list`` prints the names and descriptions a
server lists; ``list --json`` prints ``{"exports": [{"name": ..., "description": ...}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from typing import Any

from nbdproto import BASE_ALLOCATION
from nbdproto.tls import client_context
from nbdproto_threads import Client, connect, inquire, list_exports

from ._command_args import starting_servers
from ._errors import UsageError, add_timeout_argument, timeout_of
from ._exportinfo import FEATURES, client_document, details_document, protocol_line, text_lines
from ._map import map_lines, totals_lines, walk_extents

__all__ = ["add_query_commands", "add_connection_arguments", "client_tls", "info", "list_command"]

FALSE_EXIT = 2
"""nbdinfo's exit status for "no" to ``--can`` / ``--is`` (1 is kept for errors)."""


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
    info_parser.add_argument("--json", action="store_true", help="print JSON (the stable schema; nbdinfo's for --map)")
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
    list_parser.add_argument("uri", metavar="URI")
    list_parser.add_argument("--json", action="store_true", help="print JSON")
    add_connection_arguments(list_parser)


def _target(args: argparse.Namespace) -> str:
    """The URI to ask. ``--map`` takes an optional CONTEXT, so ``--map URI`` gives the URI to --map: it is
    taken back (nbdinfo spells the context ``--map=CONTEXT``, which stays unambiguous)."""
    if args.uri is None and args.map is not None and "://" in args.map:
        args.uri, args.map = args.map, BASE_ALLOCATION
    if args.uri is None:
        raise UsageError("an NBD URI is needed")
    if args.totals and args.map is None:
        raise UsageError("--totals goes with --map")
    uri: str = args.uri
    return uri


def _connect(args: argparse.Namespace, uri: str, **options: Any) -> Client:
    return connect(uri, tls=client_tls(args, uri), timeout=timeout_of(args), **options)


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
        doc = client_document(client, uri)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(protocol_line(doc["protocol"]))
    for line in text_lines(doc):
        print(line)
    return 0


def _feature(args: argparse.Namespace, uri: str, feature: str) -> int:
    test = FEATURES.get(feature)
    if test is None:
        # Not a usage error (status 2 would read as "no"): an error, as nbdinfo makes it.
        print(
            f"nbdproto info: unknown --can or --is feature {feature!r} (one of {', '.join(FEATURES)})", file=sys.stderr
        )
        return 1
    with _connect(args, uri) as client:
        return 0 if test(client) else FALSE_EXIT


def _map(args: argparse.Namespace, uri: str, context: str) -> int:
    with _connect(args, uri, meta_contexts=(context,)) as client:
        if context not in client.meta_contexts.values():
            print(f"nbdproto info: --map: the server does not offer meta context {context!r}", file=sys.stderr)
            return 1
        entries = list(walk_extents(client, context))
        size = client.size
    lines = totals_lines(entries, context, size, args.json) if args.totals else map_lines(entries, context, args.json)
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def _list_details(args: argparse.Namespace, uri: str) -> int:
    inquiry = inquire(uri, list_exports=True, tls=client_tls(args, uri), timeout=timeout_of(args))
    protocol = {
        "tls": inquiry.tls,
        "structured_replies": inquiry.structured_replies,
        "extended_headers": inquiry.extended_headers,
    }
    docs = [details_document(details, uri) for details in inquiry.exports]
    if args.json:
        print(json.dumps({"protocol": protocol, "exports": docs}, indent=2))
        return 0
    print(protocol_line(protocol))
    for doc in docs:
        for line in text_lines(doc):
            print(line)
    return 0


@starting_servers("uri")
def list_command(args: argparse.Namespace) -> int:
    exports = list_exports(args.uri, tls=client_tls(args, args.uri), timeout=timeout_of(args))
    if args.json:
        print(json.dumps({"exports": [{"name": e.name, "description": e.description} for e in exports]}, indent=2))
        return 0
    for export in exports:
        print(f"{export.name!r}" + (f"  {export.description}" if export.description else ""))
    return 0
