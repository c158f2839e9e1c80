"""``nbd.Buffer``: the persistent buffer of an asynchronous read or write, and how the aio calls take theirs.

An aio call returns before its data moves, so its buffer must outlive the call: ``aio_pread`` fills it when the
reply arrives, ``aio_pwrite`` sends from it when the socket takes it. A Buffer wraps a bytearray (or, with
``from_buffer``, any object with the buffer protocol, shared); the aio calls also take such objects directly,
as the binding does. Unlike libnbd's, a fresh Buffer is zeroed from the start, so there is no uninitialised
memory to hide: ``is_zero`` and ``to_bytearray`` give what libnbd's promise to zero it on first use gives.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Buffer", "view_of"]


class Buffer:
    """A buffer for ``aio_pread`` and ``aio_pwrite`` (``Buffer(n)``: n zero bytes)."""

    def __init__(self, len: int) -> None:  # the binding's parameter name
        self._o: Any = bytearray(len)

    @classmethod
    def from_buffer(cls, buf: Any) -> Buffer:
        """A Buffer sharing ``buf`` (any buffer-like object): changes on either side show on the other."""
        with memoryview(buf):  # TypeError here for an object without the buffer protocol
            pass
        made = cls(0)
        made._o = buf
        return made

    @classmethod
    def from_bytearray(cls, ba: Any) -> Buffer:
        """A Buffer holding a copy of ``ba`` (a buffer-like object, or anything ``bytearray()`` takes)."""
        return cls.from_buffer(bytearray(ba))

    def to_buffer(self) -> Any:
        """The object holding the contents, shared (a bytearray unless made by ``from_buffer``)."""
        return self._o

    def to_bytearray(self) -> bytearray:
        """A copy of the contents."""
        return bytearray(self._o)

    def size(self) -> int:
        return len(self)

    def __len__(self) -> int:
        with memoryview(self._o) as view:
            return view.nbytes

    def is_zero(self, offset: int = 0, size: int = -1) -> bool:
        """Whether bytes ``offset`` .. ``offset + size - 1`` are all zero (``size`` -1: to the end; 0: always
        true). IndexError for a range outside the buffer."""
        if size == 0:
            return True
        with memoryview(self._o) as whole:
            view = whole.cast("B")
            if offset < 0 or offset > len(view):
                raise IndexError("offset out of range")
            if size == -1:
                size = len(view) - offset
            elif size < 0:
                raise IndexError("size cannot be negative, except -1 to mean to the end of the buffer")
            elif offset + size > len(view):
                raise IndexError("size out of range")
            return view[offset : offset + size].tobytes().count(0) == size


def view_of(buf: Any, writable: bool) -> memoryview:
    """The bytes of an aio call's buffer (a Buffer or any buffer-like object) as a flat view. TypeError for
    anything else, BufferError when a read needs a writable buffer and it is not (the binding's errors)."""
    target = buf._o if isinstance(buf, Buffer) else buf
    try:
        view = memoryview(target)
    except TypeError:
        raise TypeError("aio_buffer: expecting buffer or nbd.Buffer instance") from None
    if writable and view.readonly:
        view.release()
        raise BufferError("underlying buffer is not writable")
    if not view.c_contiguous:
        view.release()
        raise BufferError("aio_buffer: the buffer must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
