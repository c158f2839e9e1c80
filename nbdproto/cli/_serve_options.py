"""The arguments of ``nbdproto serve``: defined apart from ``_serve`` so that building the parser for any
command loads no server, device or event loop."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import nbdproto

from ._bitmaps import add_bitmap_arguments
from ._errors import count_argument, port_argument, seconds_argument

__all__ = ["add_serve_command", "add_serve_arguments", "DEFAULT_REMOTE_TIMEOUT"]

DEFAULT_REMOTE_TIMEOUT = 30.0
"""Seconds a request to a remote (an NBD server re-exported or mirrored to, an object store) may take."""


def add_serve_command(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a file, block device, in-memory disk or another NBD export over NBD",
        description="Serve SOURCE over NBD until Ctrl-C or SIGTERM. SOURCE is a regular file or block device, "
        "memory:SIZE (a sparse in-memory disk), s3://BUCKET/KEY (an image on S3-compatible storage), or an NBD "
        "URI (nbd://, nbds://, nbd+unix://, nbds+unix://) to "
        "re-export. With no SOURCE, serves a 1 GiB in-memory disk on 127.0.0.1:10809.",
    )
    serve.add_argument("source", nargs="?", metavar="SOURCE", help="a file, memory:SIZE, s3://BUCKET/KEY or an NBD URI")
    serve.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="serve from N processes accepting on one listening socket, each serving whole connections, so that "
        "clients with several connections (nbdcopy opens 4) use more than one core; auto: one per core, at most "
        "8. Files are shared through the page cache and memory:SIZE through shared memory; NBD URIs, s3://, "
        "--filter cow and --filter blocksize keep state in one process and need 1, as does --oneshot. "
        "--max-connections counts the clients of all workers; --memory-limit is divided among them (default 1)",
    )
    add_serve_arguments(serve)
    _add_s3_arguments(serve)


def add_serve_arguments(serve: Any, *, exports: bool = True) -> None:
    """Everything but SOURCE: also the options of ``nbdproto mirror``, which serves its primary the same way
    (``exports=False``: without --memory and --export, which name what to serve: mirror's PRIMARY does)."""
    serve.add_argument("-v", "--verbose", action="store_true", help="log connections and errors")
    if exports:
        serve.add_argument("--memory", metavar="SIZE", help="serve a sparse in-memory disk of SIZE (e.g. 1G, 512M)")
    serve.add_argument("--name", default="", help="export name (default: the empty default export)")
    serve.add_argument("--description", default="", help="export description shown by nbdinfo")
    serve.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    serve.add_argument("--host", default="127.0.0.1", action=_Address, help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=port_argument,
        default=nbdproto.DEFAULT_PORT,
        action=_Address,
        help="TCP port (default 10809; 0: any)",
    )
    serve.add_argument("--socket", metavar="PATH", help="listen on a unix socket instead of TCP")
    serve.set_defaults(address_given=False)
    serve.add_argument("--backend", choices=("anyio", "threads"), default="anyio", help="server backend")
    serve.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "trio"),
        help="event loop of the anyio backend (default: uvloop if installed, else trio, else asyncio: the fastest "
        "measured with bench/bench_table.py, or tied for it)",
    )
    serve.add_argument("--tls", choices=("off", "optional", "require"), default="off", help="TLS mode")
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain) for TLS")
    serve.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    serve.add_argument("--tls-ca", metavar="PEM", help="CA to verify client certificates against")
    serve.add_argument("--tls-verify-client", action="store_true", help="require a client certificate")
    serve.add_argument(
        "--tls-psk",
        metavar="FILE",
        help="pre-shared keys (psktool's IDENTITY:HEXKEY lines) clients authenticate with (Python 3.13+), read "
        "again whenever the file changes; with --tls-cert too, clients without a key must present a certificate "
        "--tls-ca signed",
    )
    serve.add_argument(
        "--busy-poll",
        type=count_argument(0),
        default=0,
        metavar="MICROSECONDS",
        help="threads backend: after replying, spin this long on the connection before sleeping until the next "
        "request (like the kernel's busy_poll): a client with one request at a time gets no wake-up per request, "
        "at the price of a busy core while it spins (default 0: off)",
    )
    limits = nbdproto.ServerLimits()
    serve.add_argument(
        "--handshake-timeout",
        type=seconds_argument,
        default=limits.handshake_timeout,
        metavar="SECONDS",
        help=f"close a connection whose handshake (TLS included) takes longer (default {limits.handshake_timeout:g}; "
        "0: no limit)",
    )
    serve.add_argument(
        "--request-timeout",
        type=seconds_argument,
        default=limits.request_timeout,
        metavar="SECONDS",
        help="close a connection when the rest of a request (a header, a write's payload) stops arriving for this "
        f"long (default {limits.request_timeout:g}; 0: no limit)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=seconds_argument,
        default=0,
        metavar="SECONDS",
        help="close a connection with nothing in flight that sends nothing for this long (default 0: never)",
    )
    serve.add_argument(
        "--max-handshakes",
        type=int,
        default=limits.max_handshakes,
        metavar="N",
        help="at most N connections in their handshake (TLS included) at once; more are closed before the "
        f"greeting, so that stalled handshakes cannot grow the server's memory (default {limits.max_handshakes}, "
        "per worker; 0: no limit)",
    )
    serve.add_argument(
        "--memory-limit",
        default=f"{limits.memory_limit >> 20}M",
        metavar="SIZE",
        help="request and reply data all connections together may hold; each client gets a fair share and small "
        f"requests always proceed (default {limits.memory_limit >> 20}M)",
    )
    serve.add_argument(
        "--remote-timeout",
        type=float,
        default=DEFAULT_REMOTE_TIMEOUT,
        metavar="SECONDS",
        help="the most one request to a remote may take: an NBD URI's server (and mirror's NBD secondary), or "
        "the object store of s3://, retries included. A request that takes longer fails with EIO and a log line "
        "naming the remote; the connection to an NBD remote is dropped and made again for the next request "
        f"(default {DEFAULT_REMOTE_TIMEOUT:g})",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=seconds_argument,
        default=limits.shutdown_grace,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish before every connection is "
        f"closed; new requests meanwhile get ESHUTDOWN (default {limits.shutdown_grace:g})",
    )
    serve.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="wrap each export's device in a filter (repeatable; the first is outermost): cow[:overlay=PATH], "
        "readonly, delay[:read=10ms,write=,zero=,trim=,flush=,extents=,cache=], error[:errno=EIO,rate=10%%,"
        "commands=read+write,trigger=PATH], log[:file=PATH], stats[:file=PATH] (printed at exit and on "
        "SIGUSR1), blocksize[:minimum=4K,maximum=1M]",
    )
    if exports:
        serve.add_argument(
            "--export",
            action="append",
            default=[],
            metavar="NAME=SOURCE",
            help="serve another export (repeatable); SOURCE as above",
        )
    add_bitmap_arguments(serve)
    _add_helper_arguments(serve)


def _add_helper_arguments(serve: Any) -> None:
    helper = serve.add_argument_group(
        "started by another program",
        "Under systemd-style socket activation (LISTEN_PID is this process, LISTEN_FDS the sockets from "
        "descriptor 3: a .socket unit, nbdinfo or nbdcopy's -- [ CMD ]) serve the passed sockets and print "
        "nothing on standard output.",
    )
    helper.add_argument(
        "--run",
        metavar="CMD",
        help="once serving, run CMD through the shell with $uri (and $nbd), $port, $unixsocket, $exportname and "
        "$tls set; when it exits, stop, flush, and exit with its status. Without --host/--port/--socket, listen "
        "on a private unix socket in a new directory, removed at exit",
    )
    helper.add_argument(
        "--pid-file", metavar="PATH", help="write the process id to PATH once serving (atomically); removed at exit"
    )
    helper.add_argument(
        "--fork",
        action="store_true",
        help="serve in the background: return once the server accepts connections (non-zero, with its error, "
        "if it could not start); its output then goes to /dev/null, its log too unless --verbose",
    )
    helper.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop (cleanly, as on SIGTERM) when the process that started this one exits",
    )
    policy = serve.add_argument_group("who is served")
    policy.add_argument(
        "--oneshot", action="store_true", help="serve one client, then exit; others are refused meanwhile"
    )
    policy.add_argument(
        "--max-connections",
        type=count_argument(0),
        default=0,
        metavar="N",
        help="serve at most N clients at a time; more are refused (closed before the greeting) until one leaves "
        "(default 0: no limit)",
    )
    policy.add_argument(
        "--allow-address",
        action="append",
        default=[],
        metavar="CIDR",
        help="serve TCP clients from this address or network only (repeatable: 192.0.2.0/24, ::1); others are "
        "closed before the greeting and logged. Unix socket clients are not affected",
    )
    policy.add_argument(
        "--allow-client-dn",
        action="append",
        default=[],
        metavar="PATTERN",
        help="with --tls require --tls-verify-client: serve only certificates whose subject matches one PATTERN "
        "(repeatable), written as `openssl x509 -noout -subject -nameopt RFC2253` prints subjects "
        "(CN=*.example.com,O=Example): RDN by RDN, each TYPE=VALUE with * ? [...] globs that never cross a , or + "
        "(docs/howto/tls.md); others are refused after the TLS handshake and logged with their subject",
    )


class _Address(argparse.Action):
    """Stores --host or --port and notes that an address was given (--run listens privately otherwise)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:  # fmt: skip
        setattr(namespace, self.dest, values)
        namespace.address_given = True


def _add_s3_arguments(serve: Any) -> None:
    s3 = serve.add_argument_group(
        "s3:// sources",
        "Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared "
        "credentials file, AWS_PROFILE, an instance role), never from the command line.",
    )
    s3.add_argument(
        "--size",
        metavar="SIZE",
        help="serve a writable image of SIZE stored as objects KEY/%%016x (nbdkit's S3 plugin's layout); without "
        "it the single object KEY is served read-only",
    )
    s3.add_argument("--object-size", metavar="SIZE", help="bytes per object, a power of two up to 64M (default 1M)")
    s3.add_argument(
        "--s3-endpoint", metavar="URL", help="the store's URL for non-AWS stores (default: $AWS_ENDPOINT_URL or AWS)"
    )
    s3.add_argument(
        "--s3-lease",
        type=float,
        metavar="SECONDS",
        help="a writable image is leased to one server at a time (the object KEY/lease): another writable server "
        "is refused, a server that dies without giving it back (a clean exit does) can be replaced once this "
        "long has passed since its last renewal, and one that cannot renew in time stops writing (EIO). At "
        "least --remote-timeout + 2 (default: twice --remote-timeout). --read-only needs no lease",
    )
    s3.add_argument(
        "--s3-write-back",
        metavar="SIZE",
        help="a write-back cache of SIZE: writes are acknowledged from memory and made durable by FLUSH and FUA "
        "(default: each write is acknowledged once stored)",
    )
