"""The only exceptions nbdproto raises, and why each is raised.

As in h11: ``LocalProtocolError`` means our side (the code driving this library) tried to break a rule of the
protocol; ``RemoteProtocolError`` means the peer did. Both carry a message that names the offending value and
the rule it broke. After either is raised by a connection, that connection is in its terminal ERROR state.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError", "NBDError"]


class ProtocolError(Exception):
    """Base class of every error nbdproto raises.

    ``error_code`` is the NBD error value (an ``Errno``) the server would answer the offending request with, or
    0 where the only answer is to drop the connection.
    """

    def __init__(self, message: str, error_code: int = 0) -> None:
        super().__init__(message)
        self.error_code = error_code


class LocalProtocolError(ProtocolError):
    """Our side asked for something the protocol does not allow (a bug in the calling code)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow; the connection cannot go on."""


class NBDError(OSError):
    """Not a protocol error: the server answered a request with an NBD error. ``errno`` is the NBD error value
    (EIO, ENOSPC, ...), ``strerror`` the server's message or the errno's own. The clients raise it."""
