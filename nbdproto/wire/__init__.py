"""nbdproto.wire: the bytes of NBD, and nothing above them.

- ``_constants``: every number the spec names (magics, flags, options, commands, errors), as the spec names it.
- ``layout``: every message as a declarative ``construct`` definition, the single source of truth for the byte
  layout, with ``decode`` / ``encode`` as its only entry points.
- ``headers``: fast ``struct`` codecs for the fixed-size headers of the hot path, derived from ``layout``.
- ``_receivebuffer``: the one receive buffer both connection roles parse from.
- ``_errors``: the only exceptions nbdproto raises (as in h11: local and remote protocol errors).

The engine (``nbdproto.engine``) builds on this package and nothing here knows of events or connections.
"""

from __future__ import annotations

from . import headers, layout
from ._constants import *  # noqa: F403
from ._constants import __all__ as _constants_all
from ._errors import LocalProtocolError, NBDError, ProtocolError, RemoteProtocolError
from ._receivebuffer import ReceiveBuffer

__all__ = [
    *_constants_all,
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "NBDError",
    "ReceiveBuffer",
    "headers",
    "layout",
]
