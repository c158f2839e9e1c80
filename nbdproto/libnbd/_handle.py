"""``NBD``: one handle, one connection, as in libnbd. The calls come in families (settings, connecting,
option mode, export queries, data, the main loop), each in a module of its own; this one joins them and adds
what belongs to the handle itself: closing it, naming the library, its subprocess, its URI."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from ._api import Allowed, HandleBase, Internals, api
from ._calls_connect import ConnectCalls
from ._calls_data import DataCalls
from ._calls_loop import LoopCalls
from ._calls_options import OptionCalls
from ._calls_queries import QueryCalls
from ._calls_settings import SettingsCalls
from ._constants import TLS_REQUIRE
from ._errors import Failure
from ._uri import format_nbd_uri

__all__ = ["NBD", "nbd", "VERSION", "PACKAGE_NAME"]

VERSION = "1.20.0"
"""The libnbd API this binding offers: 1.14's (Debian's python3-libnbd) and the calls added up to 1.20
(extended headers, 64-bit block status, stats, the qemu meta contexts); docs/howto/libnbd.md has the list."""
PACKAGE_NAME = "nbdproto"

_A = Allowed


class NBD(SettingsCalls, ConnectCalls, OptionCalls, QueryCalls, DataCalls, LoopCalls, HandleBase):
    """An NBD handle: ``NBD()``, set it up, connect it, use it (libnbd(3))."""

    def __init__(self) -> None:
        inside = Internals()
        self._h: Internals | None = inside
        self._m = inside.machine
        self._s = inside.settings

    def __del__(self) -> None:
        inside = getattr(self, "_h", None)
        if inside is not None:
            self._h = None
            inside.machine.close()

    def close(self) -> None:
        """Close the handle now (else it closes when no longer referenced): the connection is dropped and a
        server it started is reaped. No method may be called afterwards (ClosedHandle)."""
        self._check()
        inside = self._h
        assert inside is not None
        with inside.lock:
            self._h = None
            if inside.settings.debug:
                inside.emit("nbd_close", "closing handle")
            inside.machine.close()

    def _check(self) -> None:
        from ._errors import ClosedHandle

        if self._h is None:
            raise ClosedHandle("libnbd: method called on closed handle")

    @api()
    def get_package_name(self) -> str:
        return PACKAGE_NAME

    @api()
    def get_version(self) -> str:
        return VERSION

    @api()
    def supports_tls(self) -> bool:
        return True

    @api()
    def supports_uri(self) -> bool:
        return True

    @api()
    def supports_vsock(self) -> bool:
        return hasattr(socket, "AF_VSOCK")

    @api()
    def kill_subprocess(self, signum: int) -> None:
        """Send ``signum`` (0: SIGTERM) to the server connect_command or socket activation started."""
        process = self._m.subprocess
        if process is None:
            raise Failure(errno.ESRCH, "no subprocess exists")
        if signum < 0:
            raise Failure(errno.EINVAL, f"invalid signal number: {signum}")
        process.kill(signum or 15)

    @api(_A.CONNECTING, _A.NEGOTIATING, _A.CONNECTED, _A.CLOSED, _A.DEAD)
    def get_uri(self) -> str:
        """A URI that would connect to the same server and export (not for connect_command or a socket the
        script made)."""
        machine = self._m
        tls = self._s.tls == TLS_REQUIRE or machine.facts.tls_negotiated
        if machine.host is not None and machine.port is not None:
            return format_nbd_uri(self._s, tls, machine.host, machine.port, None)
        address = machine.address
        if address is not None:
            family, where = address
            if family == socket.AF_UNIX:
                return format_nbd_uri(self._s, tls, None, None, str(where))
            if family in (socket.AF_INET, socket.AF_INET6):
                return format_nbd_uri(self._s, tls, str(where[0]), str(where[1]), None)
        raise Failure(errno.EINVAL, "cannot construct a URI for this connection type")


@contextmanager
def nbd() -> Iterator[NBD]:
    """``with nbd.nbd() as h:``: a handle closed at the end of the block (newer bindings offer it)."""
    handle = NBD()
    try:
        yield handle
    finally:
        if handle._h is not None:
            handle.close()
