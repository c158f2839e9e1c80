"""The data commands, aio and synchronous: pread, pwrite, flush, trim, cache, zero, block status, disconnect.

An aio call checks its request the way libnbd does, in libnbd's order and words (flags the call does not take;
with STRICT_COMMANDS what the server did not advertise; then NBD_CMD_DISC already sent, a zero length with
STRICT_ZERO_SIZE, a range past the end with STRICT_BOUNDS, misalignment with STRICT_ALIGN, a size over libnbd's
limits), hands it to the engine (which holds it to the protocol whatever the strict mode says; see
docs/howto/libnbd.md), queues it, and returns its cookie. A synchronous call is the same and a wait for the
reply (``aio_command_completed`` retires it, raising if it failed): ``read: command failed: ...``.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import Any

import nbdproto.engine
import nbdproto.wire
from nbdproto.wire import CommandFlags, LocalProtocolError

from ._api import Allowed, HandleBase, api
from ._buffer import view_of
from ._callbacks import Callback, check_callable
from ._calls_settings import check_flags
from ._commands import Command, system_errno
from ._constants import (
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_PAYLOAD_LEN,
    CMD_FLAG_REQ_ONE,
    MAX_REQUEST_SIZE,
    SHUTDOWN_MASK,
    STRICT_ALIGN,
    STRICT_AUTO_FLAG,
    STRICT_BOUNDS,
    STRICT_COMMANDS,
    STRICT_FLAGS,
    STRICT_PAYLOAD,
    STRICT_ZERO_SIZE,
)
from ._errors import Failure
from ._machine import Stage

__all__ = ["DataCalls"]

_CONNECTED = Allowed.CONNECTED
_TF = nbdproto.wire.TransmissionFlags
_U64 = 0xFFFFFFFFFFFFFFFF
_NO_CONTEXTS = (
    "did not negotiate any metadata contexts, either you did not call nbd_add_meta_context before connecting or "
    "the server does not support it"
)


_RANGED_FLAGS = {"trim": CMD_FLAG_FUA, "cache": 0, "write-zeroes": CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO}
_RANGED_REQUESTS: dict[
    str, type[nbdproto.engine.TrimRequest | nbdproto.engine.CacheRequest | nbdproto.engine.WriteZeroesRequest]
] = {
    "trim": nbdproto.engine.TrimRequest,
    "cache": nbdproto.engine.CacheRequest,
    "write-zeroes": nbdproto.engine.WriteZeroesRequest,
}


def _number(value: object, name: str) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    return value & _U64  # an unsigned 64-bit argument: the binding wraps negative numbers


def _zero(view: memoryview) -> None:
    if len(view):
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(view)), 0, len(view))


class DataCalls(HandleBase):
    """pread, pwrite, ... and their aio forms (see the module docstring)."""

    # --- The path every request takes ------------------------------------------------------------------------

    def _flags(self, flags: int, allowed: int) -> int:
        """The flags argument of a call that takes ``allowed``: others are refused here with STRICT_FLAGS (or
        beyond 16 bits), else left for the engine to refuse. PAYLOAD_LEN is the connection's to set, with
        STRICT_AUTO_FLAG (the default) it is ignored."""
        value = check_flags("flags", flags, 0xFFFFFFFF)
        strict = self._s.strict
        if strict & STRICT_AUTO_FLAG:
            allowed |= CMD_FLAG_PAYLOAD_LEN
        if value & ~allowed and (strict & STRICT_FLAGS or value > 0xFFFF):
            raise Failure(errno.EINVAL, f"flags: invalid value for flag: {value:#x}")
        return value & ~CMD_FLAG_PAYLOAD_LEN if strict & STRICT_AUTO_FLAG else value

    def _advertised(self, flag: nbdproto.wire.TransmissionFlags) -> bool:
        export = self._m.facts.export
        return export is not None and bool(export.flags & flag)

    def _check_writable(self, flags: int) -> None:
        if self._advertised(_TF.READ_ONLY):
            raise Failure(errno.EPERM, "server does not support write operations")
        if flags & CMD_FLAG_FUA and not self._advertised(_TF.SEND_FUA):
            raise Failure(errno.EINVAL, "server does not support the FUA flag")

    def _check_range(self, command: str, offset: int, count: int, past_end: int) -> None:
        machine, strict = self._m, self._s.strict
        if machine.commands.disconnecting:
            raise Failure(errno.EINVAL, "cannot request more commands after NBD_CMD_DISC")
        export = machine.facts.export
        assert export is not None
        if command == "flush":
            return
        if strict & STRICT_ZERO_SIZE and count == 0:
            raise Failure(errno.EINVAL, "count cannot be 0")
        if strict & STRICT_BOUNDS and (offset > export.size or count > export.size - offset):
            raise Failure(past_end, "request out of bounds")
        minimum = export.minimum_block_size if export.block_sizes_known else 0
        if minimum and strict & STRICT_ALIGN and (offset | count) & (minimum - 1):
            raise Failure(errno.EINVAL, "request is unaligned")
        if command in ("read", "write"):
            if count > MAX_REQUEST_SIZE:
                raise Failure(errno.ERANGE, f"request too large: maximum request size is {MAX_REQUEST_SIZE}")
            limited = command == "write" and strict & STRICT_PAYLOAD and export.block_sizes_known
            if limited and count > export.maximum_payload:
                raise Failure(errno.ERANGE, f"request too large: maximum payload size is {export.maximum_payload}")
        elif count > 0xFFFFFFFF and not machine.facts.extended_headers:
            raise Failure(errno.ERANGE, "request too large: maximum request size is 4294967295")

    def _submit(self, command: Command, make: Callable[[int], nbdproto.engine.Event]) -> int:
        machine = self._m
        engine = machine.engine
        assert engine is not None
        try:
            engine.send(make(command.cookie))
        except LocalProtocolError as exc:
            raise Failure(system_errno(exc.error_code) if exc.error_code else errno.EINVAL, str(exc)) from None
        machine.commands.add(command)
        machine.queue()
        machine.send_now()
        return command.cookie

    def _new(self, name: str, offset: int = 0, completion: Callback | None = None, **callbacks: Any) -> Command:
        if completion is not None:
            check_callable(completion, "completion")
        return Command(self._m.commands.next_cookie(), name, offset, completion, **callbacks)

    def _wait(self, cookie: int) -> None:
        machine = self._m
        in_flight = machine.commands.in_flight
        machine.wait_until(lambda: cookie not in in_flight)
        machine.commands.retire(cookie)

    # --- Reads ----------------------------------------------------------------------------------------------

    def _read(self, view: memoryview, offset: Any, completion: Any, flags: Any, chunk: Callback | None) -> int:
        value = self._flags(flags, CMD_FLAG_DF if chunk is not None else 0)
        start, count = _number(offset, "offset"), len(view)
        can_df = self._advertised(_TF.SEND_DF) and self._m.facts.structured_replies
        if chunk is not None and value & CMD_FLAG_DF and self._s.strict & STRICT_COMMANDS and not can_df:
            raise Failure(errno.EINVAL, "server does not support the DF flag")
        self._check_range("read", start, count, errno.EINVAL)
        command = self._new("read", start, completion, chunk=chunk, buffer=view)
        flag_set = CommandFlags(value)
        return self._submit(command, lambda cookie: nbdproto.engine.ReadRequest(cookie, start, count, flag_set, view))

    @api(_CONNECTED)
    def pread(self, count: int, offset: int, flags: int = 0) -> bytearray:
        """``count`` bytes at ``offset``."""
        buf = bytearray(count)
        self._wait(self._read(memoryview(buf), offset, None, flags, None))
        return buf

    @api(_CONNECTED)
    def pread_structured(self, count: int, offset: int, chunk: Callback, flags: int = 0) -> bytearray:
        """pread, with ``chunk(subbuf, offset, status, err)`` told of the data (CMD_FLAG_DF: in one piece)."""
        check_callable(chunk, "chunk")
        buf = bytearray(count)
        self._wait(self._read(memoryview(buf), offset, None, flags, chunk))
        return buf

    @api(_CONNECTED)
    def aio_pread(self, buf: Any, offset: int, completion: Callback | None = None, flags: int = 0) -> int:
        """Start reading ``len(buf)`` bytes at ``offset`` into ``buf`` (an nbd.Buffer or writable buffer)."""
        view = view_of(buf, writable=True)
        if self._s.pread_initialize:
            _zero(view)
        return self._read(view, offset, completion, flags, None)

    @api(_CONNECTED)
    def aio_pread_structured(
        self, buf: Any, offset: int, chunk: Callback, completion: Callback | None = None, flags: int = 0
    ) -> int:
        check_callable(chunk, "chunk")
        view = view_of(buf, writable=True)
        if self._s.pread_initialize:
            _zero(view)
        return self._read(view, offset, completion, flags, chunk)

    # --- Writes ---------------------------------------------------------------------------------------------

    def _write(self, data: Any, offset: Any, completion: Any, flags: Any) -> int:
        value = self._flags(flags, CMD_FLAG_FUA)
        start, count = _number(offset, "offset"), len(data)
        if self._s.strict & STRICT_COMMANDS:
            self._check_writable(value)
        self._check_range("write", start, count, errno.ENOSPC)
        command = self._new("write", start, completion)
        flag_set = CommandFlags(value)
        return self._submit(command, lambda cookie: nbdproto.engine.WriteRequest(cookie, start, data, flag_set))

    @api(_CONNECTED)
    def pwrite(self, buf: Any, offset: int, flags: int = 0) -> None:
        """Write ``buf`` (any bytes-like object) at ``offset`` (CMD_FLAG_FUA: durably)."""
        self._wait(self._write(view_of(buf, writable=False), offset, None, flags))

    @api(_CONNECTED)
    def aio_pwrite(self, buf: Any, offset: int, completion: Callback | None = None, flags: int = 0) -> int:
        """Start writing ``buf`` (an nbd.Buffer or bytes-like object, which must not change until done)."""
        return self._write(view_of(buf, writable=False), offset, completion, flags)

    # --- Flush, trim, cache, zero --------------------------------------------------------------------------

    def _flush(self, completion: Any, flags: Any) -> int:
        self._flags(flags, 0)
        if self._s.strict & STRICT_COMMANDS and not self._advertised(_TF.SEND_FLUSH):
            raise Failure(errno.EINVAL, "server does not support flush operations")
        self._check_range("flush", 0, 0, errno.EINVAL)
        return self._submit(self._new("flush", 0, completion), nbdproto.engine.FlushRequest)

    def _ranged(self, name: str, count: Any, offset: Any, completion: Any, flags: Any) -> int:
        value = self._flags(flags, _RANGED_FLAGS[name])
        length, start = _number(count, "count"), _number(offset, "offset")
        if self._s.strict & STRICT_COMMANDS:
            word, flag = {"trim": ("trim", _TF.SEND_TRIM), "cache": ("cache", _TF.SEND_CACHE),
                          "write-zeroes": ("zero", _TF.SEND_WRITE_ZEROES)}[name]  # fmt: skip
            if not self._advertised(flag):
                raise Failure(errno.EINVAL, f"server does not support {word} operations")
            if name != "cache":
                self._check_writable(value)
            if value & CMD_FLAG_FAST_ZERO and not self._advertised(_TF.SEND_FAST_ZERO):
                raise Failure(errno.EINVAL, "server does not support the fast zero flag")
        self._check_range(name, start, length, errno.EINVAL if name == "cache" else errno.ENOSPC)
        flag_set, kind = CommandFlags(value), _RANGED_REQUESTS[name]
        return self._submit(self._new(name, start, completion), lambda c: kind(c, start, length, flag_set))

    @api(_CONNECTED)
    def flush(self, flags: int = 0) -> None:
        self._wait(self._flush(None, flags))

    @api(_CONNECTED)
    def aio_flush(self, completion: Callback | None = None, flags: int = 0) -> int:
        return self._flush(completion, flags)

    @api(_CONNECTED)
    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        self._wait(self._ranged("trim", count, offset, None, flags))

    @api(_CONNECTED)
    def aio_trim(self, count: int, offset: int, completion: Callback | None = None, flags: int = 0) -> int:
        return self._ranged("trim", count, offset, completion, flags)

    @api(_CONNECTED)
    def cache(self, count: int, offset: int, flags: int = 0) -> None:
        self._wait(self._ranged("cache", count, offset, None, flags))

    @api(_CONNECTED)
    def aio_cache(self, count: int, offset: int, completion: Callback | None = None, flags: int = 0) -> int:
        return self._ranged("cache", count, offset, completion, flags)

    @api(_CONNECTED)
    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        """Make the range read as zeroes (CMD_FLAG_NO_HOLE: allocated; CMD_FLAG_FAST_ZERO: fail if slow)."""
        self._wait(self._ranged("write-zeroes", count, offset, None, flags))

    @api(_CONNECTED)
    def aio_zero(self, count: int, offset: int, completion: Callback | None = None, flags: int = 0) -> int:
        return self._ranged("write-zeroes", count, offset, completion, flags)

    # --- Block status ---------------------------------------------------------------------------------------

    def _block_status(
        self, count: Any, offset: Any, extent: Any, completion: Any, flags: Any, wide: bool, names: Any = None
    ) -> int:
        check_callable(extent, "extent64" if wide else "extent")
        value = self._flags(flags, CMD_FLAG_REQ_ONE)
        length, start = _number(count, "count"), _number(offset, "offset")
        facts = self._m.facts
        if self._s.strict & STRICT_COMMANDS:
            if not facts.structured_replies:
                raise Failure(errno.ENOTSUP, "server does not support structured replies")
            if not facts.meta_contexts:
                raise Failure(errno.ENOTSUP, _NO_CONTEXTS)
        ids: tuple[int, ...] = ()
        if names is not None:
            if not isinstance(names, list):
                raise TypeError("expecting a list parameter")
            by_name = {name: context_id for context_id, name in facts.meta_contexts.items()}
            unknown = [name for name in names if name not in by_name]
            if unknown or not names:
                raise Failure(errno.EINVAL, f"filter contains a context that was not negotiated: {unknown[:1]}")
            ids = tuple(by_name[name] for name in names)
        self._check_range("block-status", start, length, errno.EINVAL)
        command = self._new("block-status", start, completion, extent=extent, wide=wide)
        flag_set = CommandFlags(value)
        return self._submit(command, lambda c: nbdproto.engine.BlockStatusRequest(c, start, length, flag_set, ids))

    @api(_CONNECTED)
    def block_status(self, count: int, offset: int, extent: Callback, flags: int = 0) -> None:
        """Extents from ``offset``: ``extent(metacontext, offset, entries, err)`` once per meta context, with
        ``entries`` a flat list of length, flags, length, flags, ... (CMD_FLAG_REQ_ONE: one extent each)."""
        self._wait(self._block_status(count, offset, extent, None, flags, False))

    @api(_CONNECTED)
    def block_status_64(self, count: int, offset: int, extent64: Callback, flags: int = 0) -> None:
        """block_status with ``entries`` a list of (length, flags) pairs of 64 bits (libnbd 1.20)."""
        self._wait(self._block_status(count, offset, extent64, None, flags, True))

    @api(_CONNECTED)
    def block_status_filter(
        self, count: int, offset: int, contexts: list[str], extent64: Callback, flags: int = 0
    ) -> None:
        """block_status_64 for the named meta contexts only (libnbd 1.20; can_block_status_payload)."""
        self._wait(self._block_status(count, offset, extent64, None, flags, True, contexts))

    @api(_CONNECTED)
    def aio_block_status(
        self, count: int, offset: int, extent: Callback, completion: Callback | None = None, flags: int = 0
    ) -> int:
        return self._block_status(count, offset, extent, completion, flags, False)

    @api(_CONNECTED)
    def aio_block_status_64(
        self, count: int, offset: int, extent64: Callback, completion: Callback | None = None, flags: int = 0
    ) -> int:
        return self._block_status(count, offset, extent64, completion, flags, True)

    @api(_CONNECTED)
    def aio_block_status_filter(
        self,
        count: int,
        offset: int,
        contexts: list[str],
        extent64: Callback,
        completion: Callback | None = None,
        flags: int = 0,
    ) -> int:
        return self._block_status(count, offset, extent64, completion, flags, True, contexts)

    # --- Disconnecting --------------------------------------------------------------------------------------

    @api(_CONNECTED)
    def aio_disconnect(self, flags: int = 0) -> None:
        """Send NBD_CMD_DISC: no request may follow; the server closes once it has answered the others."""
        self._flags(flags, 0)
        self._disconnect()

    def _disconnect(self) -> None:
        machine = self._m
        commands = machine.commands
        if commands.disconnecting:
            raise Failure(errno.EINVAL, "cannot request more commands after NBD_CMD_DISC")
        engine = machine.engine
        assert engine is not None
        engine.send(nbdproto.engine.DisconnectRequest(commands.next_cookie()))
        commands.disconnecting = True
        machine.queue()
        machine.send_now()

    @api(_CONNECTED)
    def shutdown(self, flags: int = 0) -> None:
        """Disconnect politely (NBD_CMD_DISC after the requests queued) and wait until the server closes."""
        check_flags("flags", flags, SHUTDOWN_MASK)
        machine = self._m
        if not machine.commands.disconnecting and machine.stage is Stage.READY:
            self._disconnect()
        machine.wait_until(lambda: machine.stage is Stage.CLOSED or machine.stage is Stage.DEAD)
