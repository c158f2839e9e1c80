"""The calls of a script's own main loop (libnbd(3) "USING THE ASYNCHRONOUS API"): the socket to watch and in
which direction, the notifications that move the state machine when it is ready, ``poll`` for scripts that
let libnbd wait, the state questions, and the retirement of completed commands."""

from __future__ import annotations

import errno
import select

from ._api import Allowed, HandleBase, api
from ._errors import Failure
from ._machine import Stage

__all__ = ["LoopCalls"]

_A = Allowed
_CONNECTING = (Stage.CONNECTING, Stage.HANDSHAKE, Stage.TLS)


class LoopCalls(HandleBase):
    """poll, aio_get_fd, aio_notify_*, aio_is_*, aio_command_completed, ... (see the module docstring)."""

    @api()
    def poll(self, timeout: int) -> int:
        """Wait up to ``timeout`` ms (-1: no limit) for the socket, then move the state machine: 1, or 0 if
        the time ran out. EINVAL when there is nothing to wait for (no command or option out)."""
        return self._m.poll(int(timeout))

    @api()
    def poll2(self, fd: int, timeout: int) -> int:
        """poll, also waking when ``fd`` becomes readable (an eventfd, a pipe to self)."""
        machine = self._m
        direction = machine.direction()
        if not direction or machine.sock is None:
            raise Failure(errno.EINVAL, f"nothing to poll for in state {machine.state_name()}")
        waker = select.poll()
        waker.register(fd, select.POLLIN)
        waker.register(machine.sock, (select.POLLIN if direction & 1 else 0) | (select.POLLOUT if direction & 2 else 0))
        ready = waker.poll(int(timeout))
        if not ready:
            return 0
        if any(ready_fd == machine.sock.fileno() for ready_fd, _ in ready):
            machine.pump()
        return 1

    @api()
    def aio_get_fd(self) -> int:
        """The socket's file descriptor, to watch in the script's own loop (do nothing else with it)."""
        return self._m.fileno()

    def aio_get_direction(self) -> int:
        """AIO_DIRECTION_READ, _WRITE, _BOTH, or 0 when waiting on the socket is pointless now."""
        inside = self._h
        return inside.machine.direction() if inside is not None else 0

    @api()
    def aio_notify_read(self) -> None:
        """The socket is readable: move the state machine as far as it goes without waiting."""
        self._notify()

    @api()
    def aio_notify_write(self) -> None:
        """The socket is writable: move the state machine as far as it goes without waiting."""
        self._notify()

    def _notify(self) -> None:
        machine = self._m
        if machine.stage is Stage.DEAD and machine.failure is not None:
            raise machine.failure
        machine.pump()

    # --- The public states (no lock, no error: libnbd's are the same) ----------------------------------------

    def _stage(self) -> Stage | None:
        inside = self._h
        return inside.machine.stage if inside is not None else None

    def aio_is_created(self) -> bool:
        return self._stage() is Stage.CREATED

    def aio_is_connecting(self) -> bool:
        return self._stage() in _CONNECTING

    def aio_is_negotiating(self) -> bool:
        return self._stage() is Stage.NEGOTIATING

    def aio_is_ready(self) -> bool:
        inside = self._h
        return inside is not None and inside.machine.stage is Stage.READY and not inside.machine.processing

    def aio_is_processing(self) -> bool:
        inside = self._h
        return inside is not None and inside.machine.processing

    def aio_is_dead(self) -> bool:
        return self._stage() is Stage.DEAD

    def aio_is_closed(self) -> bool:
        return self._stage() is Stage.CLOSED

    @api()
    def connection_state(self) -> str:
        """The state, named and described (for debugging: the names may change)."""
        return self._m.describe()

    # --- Commands -------------------------------------------------------------------------------------------

    @api()
    def aio_command_completed(self, cookie: int) -> bool:
        """True (and the command retired) once command ``cookie`` succeeded, False while it is in flight (or
        unknown); raises, retiring it, if it failed."""
        if not isinstance(cookie, int):
            raise TypeError(f"cookie must be an integer, not {type(cookie).__name__}")
        return self._m.commands.retire(cookie & 0xFFFFFFFFFFFFFFFF if cookie >= 0 else 0)

    @api()
    def aio_peek_command_completed(self) -> int:
        """The cookie of the oldest completed command not yet retired; 0 if none has completed yet."""
        return self._m.commands.peek()

    @api(_A.CONNECTED, _A.CLOSED, _A.DEAD)
    def aio_in_flight(self) -> int:
        """Commands sent (or queued) whose replies are not in yet."""
        return self._m.commands.count_in_flight()
