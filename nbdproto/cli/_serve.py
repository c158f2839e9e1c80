"""``nbdproto serve``: serve files, block devices and in-memory disks from the command line.

Its own module so that the other commands (copy, info, list) start without importing the servers, logging,
signal handling or an event loop: a copy's measured time includes the interpreter's start-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import ssl
import threading
from dataclasses import dataclass

import nbdproto
from nbdproto import ExportSpec
from nbdproto.devices import FileDevice, MemoryDevice
from nbdproto.tls import PskFileError, PskUnavailableError, check_psk_support, read_psk_file, server_context
from nbdproto_threads import Server as ThreadsServer

from ._main import UsageError, parse_size

__all__ = ["serve", "default_loop"]

log = logging.getLogger("nbdproto.cli")


@dataclass
class ExportArg:
    name: str
    path: str | None  # None: in-memory
    size: int


def _exports(args: argparse.Namespace) -> list[ExportArg]:
    out: list[ExportArg] = []
    if args.file is not None and args.memory is not None:
        raise UsageError("give FILE or --memory, not both")
    if args.file is not None:
        out.append(ExportArg(args.name, args.file, 0))
    elif args.memory is not None or not args.export:
        out.append(ExportArg(args.name, None, _size_arg(args.memory or "1G")))
    for item in args.export:
        name, sep, target = item.partition("=")
        if not sep:
            raise UsageError(f"--export {item!r}: expected NAME=FILE")
        if target.startswith("memory:"):
            out.append(ExportArg(name, None, _size_arg(target[len("memory:") :])))
        else:
            out.append(ExportArg(name, target, 0))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise UsageError(f"export names must differ: {names}")
    for export in out:
        if export.path is not None and not os.path.exists(export.path):
            raise UsageError(f"{export.path}: no such file")
    return out


def _size_arg(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


def _tls(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, nbdproto.TlsMode | None]:
    if args.tls == "off":
        if args.tls_cert or args.tls_psk:
            raise UsageError("--tls-cert and --tls-psk need --tls require (or --tls optional)")
        return None, None
    if not (args.tls_cert or args.tls_psk):
        raise UsageError(f"--tls {args.tls} needs --tls-cert (and --tls-key unless the key is in the same file) "
                         "or --tls-psk")  # fmt: skip
    if args.tls_verify_client and not args.tls_ca:
        raise UsageError("--tls-verify-client needs --tls-ca")
    keys = None
    if args.tls_psk:
        try:
            check_psk_support()
            keys = read_psk_file(args.tls_psk)
        except (PskUnavailableError, PskFileError) as exc:
            raise UsageError(f"--tls-psk: {exc}") from None
        except OSError as exc:
            raise UsageError(f"--tls-psk: cannot read {args.tls_psk}: {exc.strerror or exc}") from None
        if args.tls_cert and not args.tls_ca:
            raise UsageError("--tls-cert with --tls-psk needs --tls-ca: clients that use no key must then present a "
                             "certificate it signed, or they would be served unauthenticated")  # fmt: skip
    try:
        context = server_context(certfile=args.tls_cert, keyfile=args.tls_key, cafile=args.tls_ca,
                                 verify_client=args.tls_verify_client, psk=keys)  # fmt: skip
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS certificate or key: {exc}") from None
    mode = nbdproto.TlsMode.FORCEDTLS if args.tls == "require" else nbdproto.TlsMode.SELECTIVETLS
    return context, mode


def _listen_socket(args: argparse.Namespace) -> socket.socket:
    try:
        if args.socket:
            if os.path.exists(args.socket):
                raise UsageError(f"{args.socket} already exists")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(args.socket)
        else:
            family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((args.host, args.port))
    except OSError as exc:
        where = args.socket or f"{args.host}:{args.port}"
        raise UsageError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def _uris(sock: socket.socket, exports: list[ExportArg], tls: bool) -> list[str]:
    address = sock.getsockname()
    out = []
    for export in exports:
        if sock.family == socket.AF_UNIX:
            uri = nbdproto.NbdUri(export.name, tls, True, socket=address)
        else:
            uri = nbdproto.NbdUri(export.name, tls, False, address[0], address[1])
        out.append(str(uri))
    return out


def default_loop() -> str:
    """uvloop, else trio, else asyncio. Serving 4 KiB random reads at queue depth 16 the three averaged the same
    over five runs here, uvloop and trio ahead in the first ones (bench/bench_servers.sh, see the README)."""
    for loop in ("uvloop", "trio"):
        if importlib.util.find_spec(loop) is not None:
            return loop
    return "asyncio"


def serve(args: argparse.Namespace) -> int:
    """Run ``nbdproto serve`` until SIGINT or SIGTERM; UsageError for a bad argument."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.loop is None:
        args.loop = default_loop()
    elif args.loop != "asyncio" and importlib.util.find_spec(args.loop) is None:
        raise UsageError(f"--loop {args.loop} needs the {args.loop} package (pip install {args.loop})")
    exports = _exports(args)
    tls, tls_mode = _tls(args)
    sock = _listen_socket(args)
    try:
        devices = _open_devices(exports, args.read_only)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot open {exc.filename}: {exc.strerror}") from None
    for uri in _uris(sock, exports, tls is not None):
        print(f"serving {uri}", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    job = _Serving(sock, exports, devices, args.description, args.read_only, tls, tls_mode, stop, args.loop)
    try:
        (_serve_threads if args.backend == "threads" else _serve_anyio)(job)
    finally:
        for device in devices:
            device.flush()
            device.close()
        if args.socket:
            os.unlink(args.socket)
    print("stopped", flush=True)
    return 0


Device = FileDevice | MemoryDevice


def _open_devices(exports: list[ExportArg], read_only: bool) -> list[Device]:
    devices: list[Device] = []
    for export in exports:
        if export.path is None:
            devices.append(MemoryDevice(export.size))
        else:
            devices.append(FileDevice(export.path, read_only=read_only))
    return devices


@dataclass
class _Serving:
    """Everything a backend needs to serve what the command line asked for."""

    sock: socket.socket
    exports: list[ExportArg]
    devices: list[Device]
    description: str
    read_only: bool
    tls: ssl.SSLContext | None
    tls_mode: nbdproto.TlsMode | None
    stop: threading.Event
    loop: str = "asyncio"


def _serve_threads(job: _Serving) -> None:
    specs = {
        e.name: ExportSpec(d, job.description, job.read_only) for e, d in zip(job.exports, job.devices, strict=True)
    }
    server = ThreadsServer(specs, job.sock, tls=job.tls, tls_mode=job.tls_mode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    job.stop.wait()
    server.shutdown()


def _serve_anyio(job: _Serving) -> None:
    # Imported here, not at the top: the event loop and anyio are a good part of the start-up time of the
    # commands that do not need them (a copy's figures include it).
    import anyio

    from nbdproto_anyio import AsyncDeviceAdapter, listen
    from nbdproto_anyio import Server as AnyioServer

    specs = {
        e.name: ExportSpec(
            AsyncDeviceAdapter(d, dispatch="batch" if isinstance(d, FileDevice) and not d.in_memory else "inline"),
            job.description,
            job.read_only,
        )
        for e, d in zip(job.exports, job.devices, strict=True)
    }
    server = AnyioServer(specs, tls=job.tls, tls_mode=job.tls_mode)

    async def run() -> None:
        listener = await listen(job.sock)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.serve, listener)
            await anyio.to_thread.run_sync(job.stop.wait)
            tasks.cancel_scope.cancel()

    if job.loop == "uvloop":
        anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(run, backend=job.loop)
