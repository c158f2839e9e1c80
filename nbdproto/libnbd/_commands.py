"""The commands of one handle, from the aio call that made them to their retirement (libnbd(3) "Issuing
asynchronous commands", "Completion callbacks").

A command gets a cookie (1, 2, 3, ... per handle, NBD_CMD_DISC included) and is in flight until its reply is
complete; then its mid-command callbacks run (block status: one call per meta context; a structured read's
chunk callback), then its completion callback. A completion callback returning 1 retires the command at once;
otherwise it waits, completed, until ``aio_command_completed`` retires it (and raises if it failed).
``aio_peek_command_completed`` names the oldest completed one. When the connection ends, the commands still in
flight complete with ENOTCONN.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Mapping

import nbdproto.engine
from nbdproto.wire import Errno

from ._callbacks import Callback, call_with_error
from ._constants import READ_DATA, READ_ERROR
from ._errors import Failure

__all__ = ["Command", "CommandTable", "system_errno"]

_SYSTEM_ERRNO = {
    Errno.EPERM: errno.EPERM,
    Errno.EIO: errno.EIO,
    Errno.ENOMEM: errno.ENOMEM,
    Errno.EINVAL: errno.EINVAL,
    Errno.ENOSPC: errno.ENOSPC,
    Errno.EOVERFLOW: errno.EOVERFLOW,
    Errno.ENOTSUP: errno.ENOTSUP,
    Errno.ESHUTDOWN: errno.ESHUTDOWN,
}
_KNOWN = {int(value) for value in _SYSTEM_ERRNO}
_LARGE_READ = 32 * 1024
"""A read this large has its reply's header received alone, its data straight into place (Machine)."""
_EXTENT32_LIMIT = 0xFFFFFFFF


def system_errno(nbd_error: int) -> int:
    """The errno of an NBD error value (an unknown one counts as EINVAL, as the spec says)."""
    return _SYSTEM_ERRNO.get(Errno(nbd_error), errno.EINVAL) if nbd_error in _KNOWN else errno.EINVAL


class Command:
    """One command: its cookie, libnbd's name for it (error messages say "read: command failed"), its
    callbacks, and the errno it ended with (0: success)."""

    __slots__ = ("cookie", "name", "offset", "completion", "extent", "wide", "chunk", "buffer", "error", "large")

    def __init__(
        self,
        cookie: int,
        name: str,
        offset: int = 0,
        completion: Callback | None = None,
        extent: Callback | None = None,
        wide: bool = False,
        chunk: Callback | None = None,
        buffer: memoryview | None = None,
    ) -> None:
        self.cookie = cookie
        self.name = name
        self.offset = offset
        self.completion = completion
        self.extent = extent
        self.wide = wide
        """``extent`` takes 64-bit extents, as (length, flags) pairs (block_status_64)."""
        self.chunk = chunk
        self.buffer = buffer
        self.error = 0
        self.large = buffer is not None and len(buffer) >= _LARGE_READ


class CommandTable:
    """Every command of a handle that is not retired."""

    def __init__(self) -> None:
        self._cookies = itertools.count(1)
        self.in_flight: dict[int, Command] = {}
        self.completed: dict[int, Command] = {}  # in the order they completed
        self.disconnecting = False
        """NBD_CMD_DISC was sent: it counts as in flight until the connection ends, and nothing may follow it."""
        self.large_reads = 0
        """Large reads in flight (see Command.large)."""

    def next_cookie(self) -> int:
        return next(self._cookies)

    def count_in_flight(self) -> int:
        return len(self.in_flight) + self.disconnecting

    def add(self, command: Command) -> None:
        self.in_flight[command.cookie] = command
        self.large_reads += command.large

    def finish(self, reply: nbdproto.engine.Event, contexts: Mapping[int, str]) -> None:
        """The complete reply to a command in flight: run its callbacks, then retire it or keep it completed."""
        command = self.in_flight.pop(reply.cookie)  # type: ignore[attr-defined]
        self.large_reads -= command.large
        kind = type(reply)
        if kind is nbdproto.engine.ErrorReply:
            error: nbdproto.engine.ErrorReply = reply  # type: ignore[assignment]
            command.error = system_errno(error.error)
            if command.chunk is not None and error.offset is not None:
                self._mid_call(command, command.chunk, command.error, memoryview(b""), error.offset, READ_ERROR)
        elif kind is nbdproto.engine.BlockStatusReply and command.extent is not None:
            status: nbdproto.engine.BlockStatusReply = reply  # type: ignore[assignment]
            for context_id, extents in status.extents.items():
                name = contexts.get(context_id)
                if name is not None:
                    self._mid_call(command, command.extent, command.error, name, command.offset,
                                   _entries(extents, command.wide))  # fmt: skip
        elif kind is nbdproto.engine.ReadReply and command.chunk is not None and command.buffer is not None:
            self._mid_call(command, command.chunk, command.error, command.buffer.toreadonly(), command.offset,
                           READ_DATA)  # fmt: skip
        self._complete(command)

    def abort(self, error: int = errno.ENOTCONN) -> None:
        """The connection ended: every command in flight completes with ``error`` (unless it failed already)."""
        stranded, self.in_flight = self.in_flight, {}
        self.disconnecting = False
        self.large_reads = 0
        for command in stranded.values():
            command.error = command.error or error
            self._complete(command)

    def retire(self, cookie: int) -> bool:
        """aio_command_completed: True (and retired) if it succeeded, False while in flight or unknown; raises
        Failure, retiring it, if it failed."""
        if cookie < 1:
            raise Failure(errno.EINVAL, f"invalid aio cookie {cookie}")
        command = self.completed.pop(cookie, None)
        if command is None:
            return False
        if command.error:
            raise Failure(command.error, f"{command.name}: command failed")
        return True

    def peek(self) -> int:
        """aio_peek_command_completed: the oldest completed cookie, 0 while commands are in flight but none has
        completed; Failure when there are none at all."""
        for cookie in self.completed:
            return cookie
        if self.in_flight:
            return 0
        raise Failure(errno.EINVAL, "no commands are in flight")

    @staticmethod
    def _mid_call(command: Command, fn: Callback, error: int, *args: object) -> None:
        result, value = call_with_error(fn, error, *args)
        if result == -1 and command.error == 0:
            command.error = value or errno.EPROTO

    def _complete(self, command: Command) -> None:
        if command.completion is not None:
            result, value = call_with_error(command.completion, command.error)
            if result == -1 and value:
                command.error = value
            elif result == 1:
                return  # retired by its callback
        self.completed[command.cookie] = command


def _entries(extents: tuple[nbdproto.engine.Extent, ...], wide: bool) -> list[object]:
    """The extents as the callback takes them: (length, flags) pairs (64-bit callback), or one flat list of
    length, flags, length, flags, ... (32-bit callback: an extent longer than 32 bits is cut short and ends
    the list, as libnbd does)."""
    if wide:
        return [(extent.length, extent.status) for extent in extents]
    flat: list[object] = []
    for length, status in extents:
        if length > _EXTENT32_LIMIT:
            flat += [_EXTENT32_LIMIT & ~0x1FF, status & _EXTENT32_LIMIT]
            break
        flat += [length, status]
    return flat
