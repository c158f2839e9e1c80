"""read_ahead: let OpenSSL take every TLS record that has arrived with one receive, as it can be asked to.

Python's ssl module reads a TLS record with two system calls, its 5-byte header and then its body, and asks the
socket for nothing more: libnbd sends each request in a record of its own, so sixteen pipelined 4 KiB writes
cost a server 32 receives, a fifth of its CPU spent in the kernel receiving. OpenSSL's read-ahead
(SSL_set_read_ahead) has it ask the socket for as much as its buffer holds instead, and decrypt the records that
came with it from there: 4 KiB writes over TLS at QD16 went 12% faster at 10% less CPU, nbdcopy's writes took a
tenth less CPU (bench/bench_tls.py, see docs/explanation/speed.md).

The ssl module does not offer it, so it is set through ctypes on the ``SSL *`` that CPython's ``_ssl._SSLSocket``
holds right after its weak reference to the socket (Modules/_ssl.c, the same from 3.10 to 3.13), and only once
that pointer is confirmed: the ``SSL_CTX`` it belongs to must be the one the socket's SSLContext holds (the first
field of ``_ssl._SSLContext``). On any other Python (another version, another implementation, OpenSSL's symbols
not found) nothing is changed, and receives work as before, two system calls a record.

Only for a socket whose every receive goes on until OpenSSL says it wants more bytes (TlsChannel's do), and
that waits for the socket only then: records read ahead sit in OpenSSL's buffer, where no poll sees them.
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys
from typing import Any

__all__ = ["read_ahead"]

_SET_READ_AHEAD, _GET_READ_AHEAD = 41, 40  # SSL_CTRL_SET_READ_AHEAD, SSL_CTRL_GET_READ_AHEAD (openssl/ssl.h)
_LAYOUTS_KNOWN = sys.implementation.name == "cpython" and (3, 10) <= sys.version_info[:2] <= (3, 13)
_HEAD = object.__basicsize__  # PyObject_HEAD: the fields of _ssl's objects follow it
_POINTER = ctypes.sizeof(ctypes.c_void_p)


def read_ahead(sock: ssl.SSLSocket) -> bool:
    """Turn OpenSSL's read-ahead on for ``sock`` (see the module docstring); whether it is on."""
    if not _LAYOUTS_KNOWN:
        return False
    functions, sslobj = _openssl(), getattr(sock, "_sslobj", None)
    if functions is None or sslobj is None:
        return False
    ctrl, context_of = functions
    ssl_pointer = ctypes.c_void_p.from_address(id(sslobj) + _HEAD + _POINTER).value
    context_pointer = ctypes.c_void_p.from_address(id(sock.context) + _HEAD).value
    if not ssl_pointer or not context_pointer or context_of(ssl_pointer) != context_pointer:
        return False
    ctrl(ssl_pointer, _SET_READ_AHEAD, 1, None)
    return bool(ctrl(ssl_pointer, _GET_READ_AHEAD, 0, None))


@functools.cache
def _openssl() -> tuple[Any, Any] | None:
    """SSL_ctrl and SSL_get_SSL_CTX of the OpenSSL the ssl module uses, or None."""
    try:
        import _ssl

        library = ctypes.CDLL(getattr(_ssl, "__file__", None))  # (None: the interpreter, _ssl built in)
        ctrl, context_of = library.SSL_ctrl, library.SSL_get_SSL_CTX
    except (OSError, AttributeError, ImportError):
        return None
    ctrl.restype, ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    context_of.restype, context_of.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    return ctrl, context_of
