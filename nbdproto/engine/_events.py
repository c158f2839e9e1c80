"""The base every event shares, and the one event of both phases: the peer closed the stream.

An event is a small slotted record named after what the spec calls the message or outcome. A connection's
``next_event()`` returns the events its peer caused; ``send(event)`` takes the events our side causes. Which
role may send or receive which event is the connection's business; the events themselves only carry data.
The events of each phase live apart: ``_handshake_events`` (the greeting, options and their outcomes) and
``_transmission_events`` (requests and replies); the plain data they carry (extents, file regions) in
``_payloads``. ``nbdproto`` re-exports them all.
"""

from __future__ import annotations

__all__ = ["Event", "ConnectionClosed"]


class Event:
    """The base of every event: a plain slotted record whose fields are its ``__slots__``, in order.

    Events are written out by hand rather than as dataclasses: dataclasses cost every start-up the time to
    build forty classes (nbdproto copy's time includes it), and an event made per request must be cheap to
    create, which a frozen dataclass's __init__ is not (bench/bench_engine.py measures the engine per request).
    Events are immutable by contract: nothing in nbdproto changes an event after creating it, and callers
    must not either. Equal when of the same type with equal fields (``_hidden`` ones aside); hashable so.
    """

    __slots__: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()
    """Fields left out of ==, hash() and repr() (a read's buffer is where data goes, not what it asks)."""

    _fields: tuple[str, ...] = ()
    """Every field of the class, its bases' first (a shared private base holds the fields of a group)."""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._fields = (*cls._fields, *cls.__slots__)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields if name not in self._hidden)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields if name not in self._hidden)
        return f"{type(self).__name__}({fields})"


class ConnectionClosed(Event):
    """The peer closed its end of the stream."""

    __slots__ = ()
