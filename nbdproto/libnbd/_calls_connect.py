"""connect_* and aio_connect_*: where the handle's one connection goes (libnbd(3) "CONNECTING TO LOCAL OR
REMOTE NBD SERVERS"). The aio forms start connecting and return; the synchronous ones wait until the handle
is ready (or negotiating, in option mode), as libnbd's do. A handle connects once: every connect call needs a
newly created handle."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from ._api import Allowed, HandleBase, api
from ._calls_settings import check_string
from ._constants import TLS_REQUIRE
from ._errors import Failure
from ._machine import Stage
from ._transport import activate, adopt, spawn, tcp_addresses, unix_address, vsock_address
from ._uri import parse_nbd_uri

__all__ = ["ConnectCalls", "string_list"]

_CREATED = Allowed.CREATED
_CONNECTING = (Stage.CONNECTING, Stage.HANDSHAKE, Stage.TLS)


def string_list(argv: object) -> list[str]:
    """A command line as the binding takes it: a list of strings."""
    if not isinstance(argv, list):
        raise TypeError("expecting a list parameter")
    if not argv:
        raise Failure(errno.EINVAL, "missing command name in argv list")
    return [check_string(arg, "argv item") for arg in argv]


class ConnectCalls(HandleBase):
    """The connect calls (see the module docstring)."""

    def _until_connected(self, start: Callable[[], None]) -> None:
        start()
        machine = self._m
        machine.wait_until(lambda: machine.stage not in _CONNECTING)
        if machine.stage is Stage.READY or machine.stage is Stage.NEGOTIATING:
            return
        if machine.stage is Stage.DEAD and machine.failure is not None:
            raise machine.failure
        raise Failure(0, "connection is closed")

    # --- Starting -------------------------------------------------------------------------------------------

    def _start_tcp(self, hostname: str, port: str) -> None:
        host, service = check_string(hostname, "hostname"), check_string(port, "port")
        try:
            addresses = tcp_addresses(host, service)
        except Failure as failure:
            raise self._m.die(failure) from None  # the handle was connecting: it is dead, as libnbd's is
        self._m.connect(addresses, host, service)
        self._m.pump()

    def _start_unix(self, unixsocket: str) -> None:
        path = check_string(unixsocket, "unixsocket")
        if len(path.encode()) > 108:
            raise Failure(errno.ENAMETOOLONG, f"socket name too long: {path}")
        self._m.connect([unix_address(path)])
        self._m.pump()

    def _start_vsock(self, cid: int, port: int) -> None:
        self._m.connect([vsock_address(int(cid) & 0xFFFFFFFF, int(port) & 0xFFFFFFFF)])
        self._m.pump()

    def _start_socket(self, sock: int) -> None:
        if not isinstance(sock, int):
            raise TypeError(f"sock must be an integer file descriptor, not {type(sock).__name__}")
        self._m.adopt(adopt(sock))
        self._m.pump()

    def _start_command(self, argv: list[str]) -> None:
        ours, process = spawn(string_list(argv))
        self._m.adopt(ours, process)
        self._m.pump()

    def _start_activation(self, argv: list[str]) -> None:
        path, server = activate(string_list(argv))
        self._m.subprocess = server
        self._m.connect([unix_address(path)])
        self._m.pump()

    def _start_uri(self, uri: str) -> None:
        settings = self._s
        parsed = parse_nbd_uri(check_string(uri, "uri"), settings)
        if parsed.tls:
            settings.tls = TLS_REQUIRE
        if "tls-certificates" in parsed.files:
            settings.tls_certificates = parsed.files["tls-certificates"]
        if "tls-psk-file" in parsed.files:
            settings.tls_psk_file = parsed.files["tls-psk-file"]
        if parsed.verify_peer is not None:
            settings.tls_verify_peer = parsed.verify_peer
        if parsed.user is not None:
            settings.tls_username = parsed.user
        settings.export_name = parsed.export_name
        if parsed.transport == "tcp":
            self._start_tcp(parsed.host, str(parsed.port))
        elif parsed.transport == "unix":
            self._start_unix(parsed.socket)
        else:
            try:
                cid = int(parsed.host)
            except ValueError:
                raise Failure(errno.EINVAL, f"cannot parse vsock CID from NBD URI: {parsed.host}") from None
            self._start_vsock(cid, parsed.port)

    # --- The calls ------------------------------------------------------------------------------------------

    @api(_CREATED)
    def connect_uri(self, uri: str) -> None:
        """Connect to an NBD URI (``nbd://host:port/export``, ``nbd+unix:///export?socket=PATH``, ...)."""
        self._until_connected(lambda: self._start_uri(uri))

    @api(_CREATED)
    def connect_unix(self, unixsocket: str) -> None:
        self._until_connected(lambda: self._start_unix(unixsocket))

    @api(_CREATED)
    def connect_vsock(self, cid: int, port: int) -> None:
        self._until_connected(lambda: self._start_vsock(cid, port))

    @api(_CREATED)
    def connect_tcp(self, hostname: str, port: str) -> None:
        """Connect to ``hostname``:``port`` (a port number or service name, as a string)."""
        self._until_connected(lambda: self._start_tcp(hostname, port))

    @api(_CREATED)
    def connect_socket(self, sock: int) -> None:
        """Talk over a socket the script connected (a file descriptor; the handle owns it from now on)."""
        self._until_connected(lambda: self._start_socket(sock))

    @api(_CREATED)
    def connect_command(self, argv: list[str]) -> None:
        """Run a server on a socket pair as its stdin and stdout (``nbdkit -s ...``); it is reaped at close."""
        self._until_connected(lambda: self._start_command(argv))

    @api(_CREATED)
    def connect_systemd_socket_activation(self, argv: list[str]) -> None:
        """Run a server with systemd socket activation on a private unix socket (qemu-nbd, nbdkit)."""
        self._until_connected(lambda: self._start_activation(argv))

    @api(_CREATED)
    def aio_connect(self, addr: Any) -> None:
        """Start connecting to a socket address: a unix socket path (the one form the binding converts)."""
        if not isinstance(addr, str):
            raise TypeError("get_sockaddr: unknown address type")
        self._m.connect([(socket.AF_UNIX, addr)])
        self._m.pump()

    @api(_CREATED)
    def aio_connect_uri(self, uri: str) -> None:
        self._start_uri(uri)

    @api(_CREATED)
    def aio_connect_unix(self, unixsocket: str) -> None:
        self._start_unix(unixsocket)

    @api(_CREATED)
    def aio_connect_vsock(self, cid: int, port: int) -> None:
        self._start_vsock(cid, port)

    @api(_CREATED)
    def aio_connect_tcp(self, hostname: str, port: str) -> None:
        self._start_tcp(hostname, port)

    @api(_CREATED)
    def aio_connect_socket(self, sock: int) -> None:
        self._start_socket(sock)

    @api(_CREATED)
    def aio_connect_command(self, argv: list[str]) -> None:
        self._start_command(argv)

    @api(_CREATED)
    def aio_connect_systemd_socket_activation(self, argv: list[str]) -> None:
        self._start_activation(argv)
