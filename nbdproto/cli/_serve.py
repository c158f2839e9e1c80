"""``nbdproto serve``: serve files, block devices and in-memory disks from the command line.

Its own module so that the other commands (copy, info, list) start without importing the servers, logging,
signal handling or an event loop: a copy's measured time includes the interpreter's start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.util
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nbdproto
import nbdproto.serving
from nbdproto import BlockDevice, ExportSpec, ServerLimits
from nbdproto.tls import PskFileError, PskUnavailableError, server_context
from nbdproto_threads import Server as ThreadsServer

from ._bitmaps import Bitmaps
from ._control import start_control
from ._errors import ImageInUse, UsageError, describe, size_argument
from ._filters import Filtering, parse_filters
from ._helper import Helper, connection_policy, listen
from ._serve_options import DEFAULT_REMOTE_TIMEOUT
from ._sources import Source, apply_s3_options, check_remote_timeout, open_source, parse_source
from ._workers import STOP_MARGIN, Supervisor, check_shareable, parse_workers

__all__ = ["serve", "serve_opened", "default_loop"]

SIGNAL_CHECK = 0.5
"""Seconds the main thread waits for the server to be stopped before it looks again. A signal handler runs on
the main thread, and only once it runs Python code again: a signal the kernel hands to another thread (any
thread that does not block it may get a process's signal) does not interrupt the main thread's wait, so a wait
without end could miss SIGTERM for good (seen: a server that never stopped). A signal the main thread gets
still stops the server at once: it interrupts the wait."""

log = logging.getLogger("nbdproto.cli")


@dataclass
class ExportArg:
    """One export the command line asked for: its name and what serves it."""

    name: str
    source: Source


def _exports(args: argparse.Namespace) -> list[ExportArg]:
    out: list[ExportArg] = []
    if args.source is not None and args.memory is not None:
        raise UsageError("give SOURCE or --memory, not both")
    if args.source is not None:
        out.append(ExportArg(args.name, parse_source(args.source)))
    elif args.memory is not None or not args.export:
        out.append(ExportArg(args.name, parse_source(f"memory:{args.memory or '1G'}")))
    for item in args.export:
        name, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--export {item!r}: expected NAME=SOURCE")
        out.append(ExportArg(name, parse_source(text)))
    for export, source in zip(out, apply_s3_options([e.source for e in out], args), strict=True):
        export.source = source
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise UsageError(f"export names must differ: {names}")
    return out


def _tls(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, nbdproto.TlsMode | None]:
    given = [option for option, value in _TLS_ONLY.items() if getattr(args, value)]
    if args.tls == "off":
        if given:
            # Each of them only means something with TLS on: served in plaintext, they would promise what is not.
            raise UsageError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --tls require (or --tls "
                             "optional): without it the server speaks plaintext")  # fmt: skip
        return None, None
    if args.tls_key and not args.tls_cert:
        raise UsageError("--tls-key needs --tls-cert: it is the key of that certificate")
    if not (args.tls_cert or args.tls_psk):
        raise UsageError(f"--tls {args.tls} needs --tls-cert (and --tls-key unless the key is in the same file) "
                         "or --tls-psk")  # fmt: skip
    if args.tls_verify_client and not args.tls_ca:
        raise UsageError("--tls-verify-client needs --tls-ca")
    if args.tls_psk and args.tls_cert and not args.tls_ca:
        raise UsageError("--tls-cert with --tls-psk needs --tls-ca: clients that use no key must then present a "
                         "certificate it signed, or they would be served unauthenticated")  # fmt: skip
    try:
        context = server_context(certfile=args.tls_cert, keyfile=args.tls_key, cafile=args.tls_ca,
                                 verify_client=args.tls_verify_client, psk=args.tls_psk)  # fmt: skip
    except (PskUnavailableError, PskFileError) as exc:  # only keys raise these
        raise UsageError(f"--tls-psk: {exc}") from None
    except OSError as exc:  # ssl.SSLError too
        if args.tls_psk and _names(exc.filename, args.tls_psk):
            raise UsageError(f"--tls-psk: cannot read {args.tls_psk}: {exc.strerror or exc}") from None
        raise UsageError(f"cannot load the TLS certificate or key: {describe(exc)}") from None
    mode = nbdproto.TlsMode.FORCEDTLS if args.tls == "require" else nbdproto.TlsMode.SELECTIVETLS
    return context, mode


_TLS_ONLY = {
    "--tls-cert": "tls_cert",
    "--tls-key": "tls_key",
    "--tls-ca": "tls_ca",
    "--tls-psk": "tls_psk",
    "--tls-verify-client": "tls_verify_client",
}
"""The options that only mean something with --tls optional or require (and the argparse names)."""


def _names(filename: object, path: str) -> bool:
    """Whether an OSError's ``filename`` is ``path`` (the key file, which server_context reads by its absolute
    path): which of the files given could not be read."""
    return isinstance(filename, str) and os.path.abspath(filename) == os.path.abspath(path)


def server_limits(args: argparse.Namespace) -> ServerLimits:
    """The ServerLimits the serve options ask for."""
    try:
        return ServerLimits(
            handshake_timeout=args.handshake_timeout,
            request_timeout=args.request_timeout,
            idle_timeout=args.idle_timeout,
            memory_limit=size_argument(args.memory_limit, "--memory-limit"),
            shutdown_grace=args.shutdown_grace,
            max_handshakes=args.max_handshakes,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _uris(sock: socket.socket, names: list[str], tls: bool) -> list[nbdproto.NbdUri]:
    address = sock.getsockname()
    out = []
    for name in names:
        if sock.family == socket.AF_UNIX:
            uri = nbdproto.NbdUri(name, tls, True, socket=address)
        else:
            uri = nbdproto.NbdUri(name, tls, False, address[0], address[1])
        out.append(uri)
    return out


def default_loop() -> str:
    """uvloop, else trio, else asyncio. Serving 4 KiB random reads at queue depth 16 the three averaged the same
    over five runs here, uvloop and trio ahead in the first ones (bench/bench_table.py, see the README)."""
    for loop in ("uvloop", "trio"):
        if importlib.util.find_spec(loop) is not None:
            return loop
    return "asyncio"


def serve(args: argparse.Namespace) -> int:
    """Run ``nbdproto serve`` until SIGINT or SIGTERM (or the ``--run`` command exits, or a ``--oneshot``
    client leaves); the exit status (the ``--run`` command's, else 0); UsageError for a bad argument."""
    exports = _exports(args)
    remote_timeout = check_remote_timeout(args.remote_timeout)
    workers = parse_workers(args.workers)
    if workers > 1:
        check_shareable([export.source.kind for export in exports], parse_filters(args.filter, len(exports)))
        if Bitmaps(args, len(exports)).needed_for([(e.source.kind, e.source.target) for e in exports]):
            raise UsageError("dirty bitmaps (--bitmap, or an IMAGE.bitmaps/ directory) live in one process: "
                             "they need --workers 1")  # fmt: skip

    def open_exports(source_read_only: bool) -> list[tuple[str, BlockDevice]]:
        devices = _open_devices(exports, args.read_only or source_read_only, workers > 1, remote_timeout)
        return [(export.name, device) for export, device in zip(exports, devices, strict=True)]

    return serve_opened(args, open_exports, len(exports), workers=workers)


def serve_opened(
    args: argparse.Namespace,
    open_exports: Callable[[bool], list[tuple[str, BlockDevice]]],
    count: int,
    on_serving: Callable[[], None] | None = None,
    workers: int = 1,
) -> int:
    """Serve the ``count`` (name, device) exports ``open_exports(source_read_only)`` opens (read-only where the
    filters keep the source unchanged, e.g. cow), each wrapped in the --filter chain, as the serve options in
    ``args`` say, until SIGINT or SIGTERM (or the ``--run`` command exits, or a ``--oneshot`` client leaves);
    then flush and close every device; the exit status (the ``--run`` command's, else 0). Bad options, and
    devices that cannot be opened (OSError, or a UsageError from ``open_exports``), are UsageErrors raised
    before anything is served. ``on_serving`` runs once the server listens and its URIs are printed
    (``nbdproto mirror`` starts its copy there). With ``workers`` above 1, that many processes serve the
    devices (which they must be able to share: see _workers) while this one supervises them."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        # With workers, which process said it: the supervisor logs which worker has which pid.
        format=f"%(asctime)s %(levelname)s %(name)s{'[%(process)d]' if workers > 1 else ''}: %(message)s",
    )
    if workers > 1 and args.oneshot:
        raise UsageError("--oneshot serves one connection, which one process serves: it needs --workers 1")
    if workers > 1 and getattr(args, "control", None):
        raise UsageError("--control manages the exports of one process: it needs --workers 1")
    if args.busy_poll and args.backend != "threads":
        raise UsageError("--busy-poll is for --backend threads (an event loop must not spin on one connection)")
    if args.busy_poll < 0:
        raise UsageError("--busy-poll must not be negative")
    if args.loop is None:
        args.loop = default_loop()
    elif args.loop != "asyncio" and importlib.util.find_spec(args.loop) is None:
        raise UsageError(f"--loop {args.loop} needs the {args.loop} package (pip install {args.loop})")
    filtering = Filtering(parse_filters(args.filter, count), several_exports=count > 1)
    bitmaps = Bitmaps(args, count)
    tls, tls_mode = _tls(args)
    limits = server_limits(args)
    if workers > 1:  # --memory-limit bounds all connections together, whichever worker serves them
        limits = dataclasses.replace(limits, memory_limit=max(1, limits.memory_limit // workers))
    policy = connection_policy(args)
    helper = Helper(args)
    helper.watch_parent()
    listening = listen(args)
    helper.fork()
    # From here on a signal stops the server once it serves (at once, if it comes while the devices open), so
    # that what was made for it (a private socket directory, the pid file) is removed.
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    exports: list[tuple[str, BlockDevice]] = []
    try:
        exports = _filtered(open_exports(filtering.source_read_only), filtering, bitmaps)
        table = nbdproto.serving.ExportTable({n: ExportSpec(d, args.description, args.read_only) for n, d in exports})
        control = start_control(
            args, exports, table, lambda name: str(_uris(listening.sockets[0], [name], tls is not None)[0])
        )
    except (OSError, UsageError) as exc:
        _flush_and_close([device for _, device in exports])
        listening.close()
        filtering.close()
        if isinstance(exc, UsageError):
            raise
        if exc.errno == errno.EBUSY:  # another server writes it (its S3 lease, its bitmaps' lock)
            raise ImageInUse(str(exc)) from None
        raise UsageError(_cannot_open(exc, args.read_only)) from None
    except BaseException:
        listening.close()
        filtering.close()
        raise
    names = [name for name, _ in exports]
    devices = [device for _, device in exports]
    # Under socket activation or --run, standard output is not ours: the starter's, or the command's.
    quiet = listening.activated or bool(args.run)
    uris = _uris(listening.sockets[0], names, tls is not None)
    for uri in uris:
        if quiet:
            log.info("serving %s", uri)
        else:
            print(f"serving {uri}", flush=True)
    job = _Serving(
        listening.sockets, names, devices, args.description, args.read_only, tls, tls_mode, stop,
        limits, policy, lambda: helper.ready(uris[0], tls_mode, stop), args.backend, args.loop, args.busy_poll,
        table=table,
    )  # fmt: skip
    status = 0
    try:
        if workers > 1:
            status = _serve_in_workers(job, workers, filtering, helper, uris[0])
        else:
            if filtering.stats:
                _report_stats_on_sigusr1(filtering, stop)
            if on_serving is not None:
                on_serving()
            _serve_here(job)
    finally:
        if control is not None:
            control.close()
        _flush_and_close(devices)
        listening.close()
        if workers == 1:
            filtering.report_stats()
        filtering.close()
    status = helper.finish() or status
    if not quiet:
        print("stopped", flush=True)
    return status


def _cannot_open(exc: OSError, read_only: bool) -> str:
    """Why a source could not be opened, naming it; for a file that may not be written, the way out."""
    message = f"cannot open {exc.filename}: {exc.strerror or exc}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not read_only:
        message += " (serve it with --read-only?)"
    return message


def _serve_here(job: _Serving) -> None:
    (_serve_threads if job.backend == "threads" else _serve_anyio)(job)


def _flush_and_close(devices: list[BlockDevice]) -> None:
    for device in devices:
        try:
            device.flush()
        except (OSError, nbdproto.ProtocolError) as exc:  # an error filter failing on purpose, a remote gone
            log.warning("flush at exit failed: %s", exc)
        try:
            device.close()  # (which may flush again: a write-back cache, a mirror)
        except OSError as exc:
            log.warning("closing at exit failed: %s", exc)


def _serve_in_workers(job: _Serving, workers: int, filtering: Filtering, helper: Helper, uri: nbdproto.NbdUri) -> int:
    """Serve ``job`` from ``workers`` forked processes (nbdproto/cli/_workers.py) until it is stopped; this
    process supervises them. The status: 0, or 1 when a worker could not start serving."""

    def work(index: int, clients: nbdproto.serving.ClientCount, ready: Callable[[], None]) -> None:
        helper.become_worker()
        filtering.become_worker(index + 1)
        if filtering.stats:
            _report_stats_on_sigusr1(filtering, job.stop)
        job.clients, job.shared = clients, True

        def serving() -> None:
            ready()
            helper.leave_output()

        job.ready = serving
        try:
            _serve_here(job)
        finally:
            _flush_and_close(job.devices)
            filtering.report_stats()

    stop_timeout = job.limits.shutdown_grace + STOP_MARGIN
    supervisor = Supervisor(workers, work, stop_timeout=stop_timeout, forward_usr1=bool(filtering.stats))
    return supervisor.run(
        job.stop, lambda: helper.ready(uri, job.tls_mode, job.stop, watch=False), lambda: helper.command
    )


def _open_devices(
    exports: list[ExportArg], read_only: bool, shared: bool = False, remote_timeout: float = DEFAULT_REMOTE_TIMEOUT
) -> list[BlockDevice]:
    """The exports' devices; ``shared``: for processes forked to serve them, so memory:SIZE is made shared;
    ``remote_timeout`` bounds each request to a remote source."""
    devices: list[BlockDevice] = []
    try:
        for export in exports:
            if shared and export.source.kind == "memory":
                from nbdproto.devices import SharedMemoryDevice

                devices.append(SharedMemoryDevice(export.source.size, name=f"nbdproto-{export.name or 'default'}"))
                continue
            devices.append(open_source(export.source, read_only=read_only, remote_timeout=remote_timeout))
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices


def _filtered(
    exports: list[tuple[str, BlockDevice]], filtering: Filtering, bitmaps: Bitmaps
) -> list[tuple[str, BlockDevice]]:
    """Each export's device inside the --filter chain, and that in its dirty bitmaps, if any (every device
    closed if one cannot be wrapped)."""
    wrapped: list[tuple[str, BlockDevice]] = []
    try:
        for name, device in exports:
            wrapped.append((name, bitmaps.wrap(filtering.wrap(device, name), name)))
    except BaseException:
        for _, device in wrapped:
            device.close()
        for _, device in exports[len(wrapped) :]:
            device.close()
        raise
    return wrapped


def _report_stats_on_sigusr1(filtering: Filtering, stop: threading.Event) -> None:
    """Print the stats filters' figures on each SIGUSR1. The handler only wakes a reporting thread: it runs
    on the main thread, which may be in the middle of a request holding a stats filter's lock."""
    wanted = threading.Event()

    def report() -> None:
        while True:
            wanted.wait()
            wanted.clear()
            if stop.is_set():
                return
            filtering.report_stats()

    signal.signal(signal.SIGUSR1, lambda signum, frame: wanted.set())
    threading.Thread(target=report, name="stats-report", daemon=True).start()


@dataclass
class _Serving:
    """Everything a backend needs to serve what the command line asked for."""

    sockets: list[socket.socket]
    names: list[str]
    devices: list[BlockDevice]
    description: str
    read_only: bool
    tls: ssl.SSLContext | None
    tls_mode: nbdproto.TlsMode | None
    stop: threading.Event
    limits: ServerLimits
    policy: nbdproto.ConnectionPolicy
    ready: Callable[[], None]
    """Called once the server accepts connections (the pid file, --fork, --run: see _helper)."""
    backend: str = "anyio"
    loop: str = "asyncio"
    busy_poll: int = 0
    clients: nbdproto.serving.ClientCount | None = None
    """Where the policy's counts are kept when worker processes share them (see _workers)."""
    shared: bool = False
    """The listening sockets are shared with other processes (workers)."""
    table: nbdproto.serving.ExportTable | None = None
    """The exports as the server looks them up (checkpoints' views come and go in it); None: built from the
    names and devices."""

    def specs(self) -> Mapping[str, ExportSpec[Any]]:
        if self.table is not None:
            return self.table
        return {
            n: ExportSpec(d, self.description, self.read_only) for n, d in zip(self.names, self.devices, strict=True)
        }


def _serve_threads(job: _Serving) -> None:
    specs = job.specs()
    poll = job.busy_poll / 1e6
    server = ThreadsServer(
        specs, job.sockets, tls=job.tls, tls_mode=job.tls_mode, limits=job.limits, policy=job.policy, poll=poll,
        clients=job.clients, shared_sockets=job.shared,
    )  # fmt: skip

    def serve() -> None:
        try:
            server.serve_forever()
        finally:
            job.stop.set()  # a oneshot server's client has gone

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    job.ready()
    while not job.stop.wait(SIGNAL_CHECK):
        pass
    server.shutdown()


def _serve_anyio(job: _Serving) -> None:
    # Imported here, not at the top: the event loop and anyio are a good part of the start-up time of the
    # commands that do not need them (a copy's figures include it).
    import anyio

    from nbdproto_anyio import Server as AnyioServer
    from nbdproto_anyio import listen

    specs = job.specs()
    server = AnyioServer(
        specs, tls=job.tls, tls_mode=job.tls_mode, limits=job.limits, policy=job.policy, clients=job.clients
    )

    async def stop_when_asked() -> None:
        # The event loop runs on the main thread: it comes back to it every SIGNAL_CHECK seconds.
        while not await anyio.to_thread.run_sync(job.stop.wait, SIGNAL_CHECK):
            pass
        await server.shutdown()

    async def run() -> None:
        listeners = [await listen(sock) for sock in job.sockets]
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stop_when_asked)
            job.ready()
            try:
                await server.serve(listeners)  # until shutdown, or a oneshot server's client has gone
            finally:
                job.stop.set()

    if job.loop == "uvloop":
        anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(run, backend=job.loop)
