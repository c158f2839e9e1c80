"""nbdproto.libnbd: libnbd's Python binding (``import nbd``), on nbdproto's engine and the standard library.

Scripts written for libnbd's binding run unchanged with one line changed::

    from nbdproto import libnbd as nbd

    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri("nbd://localhost/disk")
    data = h.pread(512, 0)

The names, signatures, defaults, callback conventions, errors (``nbd.Error`` with ``.string``, ``.errno``,
``.errnum``) and state rules follow libnbd(3) and its generated binding (libnbd 1.14, Debian's python3-libnbd,
plus the calls added up to 1.20). One ``NBD()`` is one connection: a state machine driven by poll over a
non-blocking socket, as in libnbd; the synchronous calls are their aio twins and a wait. What differs from
libnbd, and why, is in docs/howto/libnbd.md. Nothing here imports a backend (nbdproto_threads, nbdproto_anyio).
"""

from ._buffer import Buffer
from ._constants import *  # noqa: F403
from ._constants import __all__ as _constants_all
from ._errors import ClosedHandle, Error
from ._handle import NBD, nbd

__all__ = ["NBD", "Buffer", "Error", "ClosedHandle", "nbd", "package_name", "__version__", *_constants_all]

# As the binding does: its module-level names come from handles made at import (so a script's first handle is
# named nbd3, as under libnbd's binding).
package_name = NBD().get_package_name()
__version__ = NBD().get_version()
