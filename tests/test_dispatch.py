"""The shared request -> device call -> reply mapping (nbdproto.serving._carry_out)."""

from __future__ import annotations

import errno

import pytest

import nbdproto as n
from nbdproto.serving._carry_out import (
    DeviceCall,
    carry_out,
    client_message,
    device_calls,
    error_reply_for,
    nbd_errno,
    read_view_of,
    reply_for,
)

F = n.CommandFlags
CONTEXTS = {1: n.BASE_ALLOCATION, 2: "example:odd"}


def test_read_fills_a_fresh_buffer_and_replies_with_it() -> None:
    request = n.ReadRequest(7, 4096, 512)
    (call,) = device_calls(request, CONTEXTS)
    assert call.method == "pread_into" and call.args[1] == 4096 and len(call.args[0]) == 512
    reply = reply_for(request, [call], [None])
    assert isinstance(reply, n.ReadData) and reply.data is call.args[0] and reply.offset == 4096


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (n.WriteRequest(1, 0, b"ab", F.FUA), DeviceCall("pwrite", (b"ab", 0, True))),
        (n.FlushRequest(1), DeviceCall("flush", ())),
        (n.TrimRequest(1, 512, 1024), DeviceCall("trim", (512, 1024, False))),
        (n.CacheRequest(1, 0, 4096), DeviceCall("cache", (0, 4096))),
        (n.ResizeRequest(1, 1 << 30), DeviceCall("resize", (1 << 30,))),
        (
            n.WriteZeroesRequest(1, 0, 4096, F.NO_HOLE | F.FAST_ZERO),
            DeviceCall("write_zeroes", (0, 4096), {"may_trim": False, "fast": True, "fua": False}),
        ),
        (
            n.WriteZeroesRequest(1, 0, 4096, F.FUA),
            DeviceCall("write_zeroes", (0, 4096), {"may_trim": True, "fast": False, "fua": True}),
        ),
    ],
)
def test_each_command_maps_to_its_device_method(request_: n.Request, expected: DeviceCall) -> None:
    calls = device_calls(request_, CONTEXTS)
    assert calls == [expected]
    assert reply_for(request_, calls, [None]) == n.SuccessReply(1)


def test_block_status_asks_each_context_by_name() -> None:
    request = n.BlockStatusRequest(3, 0, 8192, n.NO_FLAGS, (2, 1))
    calls = device_calls(request, CONTEXTS)
    assert calls == [
        DeviceCall("extents", ("example:odd", 0, 8192)),
        DeviceCall("extents", (n.BASE_ALLOCATION, 0, 8192)),
    ]
    reply = reply_for(request, calls, [[(8192, 1)], [n.Extent(4096, 3), n.Extent(4096, 0)]])
    assert reply == n.BlockStatusReply(3, {2: (n.Extent(8192, 1),), 1: (n.Extent(4096, 3), n.Extent(4096, 0))})


def test_disconnect_needs_no_device_call() -> None:
    assert device_calls(n.DisconnectRequest(), CONTEXTS) == []


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EPERM, n.Errno.EPERM),
        (errno.EROFS, n.Errno.EPERM),
        (errno.EACCES, n.Errno.EPERM),
        (errno.ENOSPC, n.Errno.ENOSPC),
        (errno.EDQUOT, n.Errno.ENOSPC),
        (errno.EFBIG, n.Errno.ENOSPC),
        (errno.EINVAL, n.Errno.EINVAL),
        (errno.ENOMEM, n.Errno.ENOMEM),
        (errno.EOVERFLOW, n.Errno.EOVERFLOW),
        (errno.ENOTSUP, n.Errno.ENOTSUP),
        (errno.EOPNOTSUPP, n.Errno.ENOTSUP),
        (errno.ESHUTDOWN, n.Errno.ESHUTDOWN),
        (errno.EBADF, n.Errno.EIO),
    ],
)
def test_os_errors_map_to_the_nbd_error_the_spec_names(code: int, expected: n.Errno) -> None:
    exc = OSError(code, "boom")
    assert nbd_errno(exc) == expected
    reported = n.Errno.EINVAL if expected in (n.Errno.ENOTSUP, n.Errno.EOVERFLOW) else expected
    # The client is told the errno's text, never the device's own ("boom": the server's log has it).
    assert error_reply_for(n.FlushRequest(4), exc) == n.ErrorReply(4, reported, client_message(reported))


def test_enotsup_is_only_reported_for_fast_zero() -> None:
    exc = OSError(errno.ENOTSUP, "slow")
    fast = n.WriteZeroesRequest(1, 0, 512, n.CommandFlags.FAST_ZERO)
    assert error_reply_for(fast, exc).error == n.Errno.ENOTSUP
    assert error_reply_for(n.WriteZeroesRequest(1, 0, 512), exc).error == n.Errno.EINVAL
    assert error_reply_for(n.TrimRequest(1, 0, 512), exc).error == n.Errno.EINVAL


def test_other_exceptions_are_eio() -> None:
    reply = error_reply_for(n.FlushRequest(4), ValueError("bad"))
    assert reply == n.ErrorReply(4, n.Errno.EIO, client_message(n.Errno.EIO))


def test_budget_counts_the_memory_a_request_pins() -> None:
    from nbdproto.serving import RequestBudget

    chunk = bytes(1 << 20)
    write = n.WriteRequest(1, 0, memoryview(chunk)[28 : 28 + 4096])
    assert RequestBudget.cost(write) == 1 << 20  # the whole received chunk stays alive with its view
    assert RequestBudget.cost(n.WriteRequest(1, 0, b"x" * 10)) == 10
    assert RequestBudget.cost(n.ReadRequest(1, 0, 4096)) == 4096
    assert RequestBudget.cost(n.FlushRequest(1)) == 0
    budget = RequestBudget(max_requests=2, max_bytes=100)
    budget.add(60)
    assert not budget.full
    budget.add(60)
    assert budget.full and not budget.idle
    budget.done(60)
    budget.done(60)
    assert budget.idle and not budget.full


class _ViewDevice:
    """Reads from ``data``; views only of its first half (the rest goes through pread_into)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.copies = 0

    def read_view(self, offset: int, length: int) -> memoryview | None:
        if offset + length > len(self.data) // 2:
            return None
        return memoryview(self.data)[offset : offset + length]

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.copies += 1
        buffer[:] = self.data[offset : offset + len(buffer)]


def test_reads_are_answered_with_the_devices_view_where_it_has_one() -> None:
    device = _ViewDevice(bytes(range(256)) * 16)
    read_view = read_view_of(device)
    assert read_view is not None
    near = carry_out(device, n.ReadRequest(1, 16, 32), {}, None, read_view)
    assert isinstance(near, n.ReadData) and isinstance(near.data, memoryview)
    assert near.data.obj is device.data and bytes(near.data) == device.data[16:48]
    far = carry_out(device, n.ReadRequest(2, 3000, 32), {}, None, read_view)
    assert isinstance(far, n.ReadData) and bytes(far.data) == device.data[3000:3032]
    assert device.copies == 1
    # Without a read_view (a TLS connection), every read is a copy.
    carry_out(device, n.ReadRequest(3, 16, 32), {}, None, None)
    assert device.copies == 2
    assert read_view_of(object()) is None
