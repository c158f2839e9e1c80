"""Hostile and broken clients against a running server, on every backend.

Each bad client gets the answer the spec names (an option error, an NBD error reply) or a clean close, and
meanwhile a well-behaved client on another connection keeps writing and reading back its data: the server
keeps serving everyone else and loses no acknowledged write.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

import nbdproto as n
import nbdproto.wire
from nbdproto.devices import FileDevice, MemoryDevice
from nbdproto.wire import layout as w
from tests.nbdbytes import client_flags, info_payload, option, request
from tests.serving import BACKENDS, Export, serve_exports

MIB = 1 << 20
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class RawClient:
    """A hand-driven client on a socket: exact bytes out, exact bytes in, every read bounded by a timeout."""

    def __init__(self, address: tuple[str, int] | socket.socket) -> None:
        """Connect to ``address``, or take a connected socket (one end of a socketpair, say)."""
        if isinstance(address, socket.socket):
            self.sock = address
            self.sock.settimeout(10)
        else:
            self.sock = socket.create_connection(address, timeout=10)
        greeting = self.recv_exactly(18)
        assert w.decode(w.NewstyleGreeting, greeting).handshake_flags & n.HandshakeFlags.FIXED_NEWSTYLE

    def recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, reply_type, length = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == n.wire.OPTION_REPLY_MAGIC
        return opt, reply_type, self.recv_exactly(length)

    def go(self, name: str) -> None:
        """Negotiate into transmission with simple replies (the oldest, strictest reply form)."""
        self.sock.sendall(client_flags() + option(n.Option.GO, info_payload(name)))
        while True:
            _, reply_type, _ = self.option_reply()
            if reply_type == n.OptionReplyType.ACK:
                return
            assert reply_type == n.OptionReplyType.INFO, reply_type

    def simple_reply(self, cookie: int, data_length: int = 0) -> tuple[int, bytes]:
        magic, error, got = struct.unpack(">IIQ", self.recv_exactly(16))
        assert magic == n.wire.SIMPLE_REPLY_MAGIC and got == cookie
        return error, self.recv_exactly(data_length) if error == 0 else b""

    def closed_by_server(self) -> bool:
        """True once the server has closed (reads until EOF, bounded by the socket timeout)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def served(backend: str) -> Iterator[tuple[tuple[str, int], MemoryDevice]]:
    device = MemoryDevice(16 * MIB)
    with serve_exports(backend, {"disk": Export(device)}) as base:
        port = int(base.split(":")[2].split("/")[0])
        yield ("127.0.0.1", port), device


class GoodClient(threading.Thread):
    """A well-behaved client: verified writes of ``block`` bytes, each read back, over ``blocks`` blocks of
    ``export``, counted, until stopped (and for at least ``at_least`` rounds); ``written`` keeps what each
    block last got."""

    def __init__(
        self, address: tuple[str, int], export: str = "disk", block: int = 65536, blocks: int = 64, at_least: int = 3
    ) -> None:
        super().__init__(daemon=True)
        self.address, self.export, self.block, self.blocks, self.at_least = address, export, block, blocks, at_least
        self.stop = threading.Event()
        self.rounds = 0
        self.failure: BaseException | None = None
        self.written: dict[int, bytes] = {}

    def run(self) -> None:
        try:
            client = RawClient(self.address)
            client.go(self.export)
            cookie = 0
            while not self.stop.is_set() or self.rounds < self.at_least:
                offset = (self.rounds % self.blocks) * self.block
                data = os.urandom(self.block)
                cookie += 1
                client.sock.sendall(request(n.Command.WRITE, cookie, offset, len(data)) + data)
                assert client.simple_reply(cookie) == (0, b"")
                self.written[offset] = data
                cookie += 1
                client.sock.sendall(request(n.Command.READ, cookie, offset, len(data)))
                assert client.simple_reply(cookie, len(data)) == (0, data)
                self.rounds += 1
            client.sock.sendall(request(n.Command.DISC, 0))
            client.close()
        except BaseException as exc:
            self.failure = exc

    def finish(self) -> int:
        """Stop, and the rounds done; fails the test if the client hung or failed."""
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "the good client hung"
        assert self.failure is None, f"the good client failed: {self.failure!r}"
        return self.rounds


BadClient = Callable[[tuple[str, int]], None]


def garbage_before_flags(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.sock.sendall(os.urandom(4096))
    assert c.closed_by_server()


def unknown_option_then_go_on(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.sock.sendall(client_flags() + option(0xDEAD, b"junk"))
    assert c.option_reply()[1] == n.OptionReplyType.ERR_UNSUP
    c.sock.sendall(option(n.Option.ABORT))
    assert c.option_reply()[1] == n.OptionReplyType.ACK
    c.close()


def oversized_option(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.sock.sendall(client_flags() + struct.pack(">QII", n.wire.IHAVEOPT, n.Option.GO, 0xFFFFFFFF) + os.urandom(65536))
    assert c.option_reply()[1] == n.OptionReplyType.ERR_TOO_BIG
    c.close()  # it never sends the other 4 GiB: the server must not wait on them forever, nor buffer them


def export_name_unknown(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.sock.sendall(client_flags() + option(n.Option.EXPORT_NAME, b"no-such-export"))
    assert c.closed_by_server()


def lying_info_payload(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.sock.sendall(client_flags() + option(n.Option.GO, struct.pack(">I", 0xFFFFFFF0) + b"x"))
    assert c.option_reply()[1] == n.OptionReplyType.ERR_INVALID
    c.close()


def requests_past_the_end(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.go("disk")
    c.sock.sendall(request(n.Command.READ, 1, 16 * MIB, 4096) + request(n.Command.READ, 2, (1 << 64) - 4096, 4096))
    assert c.simple_reply(1)[0] == n.Errno.EINVAL
    assert c.simple_reply(2)[0] == n.Errno.EINVAL
    c.sock.sendall(request(n.Command.WRITE, 3, 16 * MIB - 1, 2) + b"zz")
    assert c.simple_reply(3)[0] == n.Errno.ENOSPC
    c.sock.sendall(request(n.Command.READ, 4, 0, 0xFFFFFFFF))
    assert c.simple_reply(4)[0] == n.Errno.EINVAL
    c.close()


def wrong_request_magic(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.go("disk")
    c.sock.sendall(struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 512))
    assert c.closed_by_server()


def disconnect_mid_payload(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.go("disk")
    c.sock.sendall(request(n.Command.WRITE, 1, 0, MIB) + os.urandom(1000))
    c.close()


def garbage_in_transmission(address: tuple[str, int]) -> None:
    c = RawClient(address)
    c.go("disk")
    c.sock.sendall(os.urandom(100_000))
    assert c.closed_by_server()


BAD_CLIENTS = [
    garbage_before_flags,
    unknown_option_then_go_on,
    oversized_option,
    export_name_unknown,
    lying_info_payload,
    requests_past_the_end,
    wrong_request_magic,
    disconnect_mid_payload,
    garbage_in_transmission,
]


def test_bad_clients_are_answered_or_dropped_while_a_good_one_keeps_working(
    served: tuple[tuple[str, int], MemoryDevice],
) -> None:
    address, device = served
    good = GoodClient(address)
    good.start()
    try:
        for bad in BAD_CLIENTS:
            bad(address)
    finally:
        rounds = good.finish()
    assert rounds >= 3
    # Every acknowledged write is in the device.
    for offset, data in good.written.items():
        buf = memoryview(bytearray(len(data)))
        device.pread_into(buf, offset)
        assert bytes(buf) == data


@pytest.mark.parametrize("bad", BAD_CLIENTS, ids=[b.__name__ for b in BAD_CLIENTS])
def test_each_bad_client_alone(served: tuple[tuple[str, int], MemoryDevice], bad: BadClient) -> None:
    address, _ = served
    bad(address)
    # The server is still there for the next client.
    c = RawClient(address)
    c.go("disk")
    c.sock.sendall(request(n.Command.READ, 9, 0, 512))
    assert c.simple_reply(9, 512)[0] == 0
    c.close()


def test_a_file_truncated_under_the_server_ends_only_the_connection_that_reads_past_its_end(backend: str) -> None:
    # Plaintext reads of a FileDevice are views of the file's mapping, sent by the kernel. If someone truncates
    # the file while it is served, sending a view of a vanished page fails (EFAULT) instead of killing the
    # process with SIGBUS: that one connection ends, every other client goes on.
    path = f"/dev/shm/nbdproto-test-{os.getpid()}-shrink.img"
    data = os.urandom(MIB)
    with open(path, "wb") as f:
        f.write(data)
    device = FileDevice(path)
    try:
        with serve_exports(backend, {"disk": Export(device, read_only=False)}) as base:
            port = int(base.split(":")[2].split("/")[0])
            victim, bystander = RawClient(("127.0.0.1", port)), RawClient(("127.0.0.1", port))
            victim.go("disk")
            bystander.go("disk")
            os.truncate(path, 64 * 1024)
            victim.sock.sendall(request(n.Command.READ, 1, 512 * 1024, 4096))
            assert victim.closed_by_server()
            bystander.sock.sendall(request(n.Command.READ, 2, 0, 4096))
            assert bystander.simple_reply(2, 4096) == (0, data[:4096])
            bystander.close()
            victim.close()
            newcomer = RawClient(("127.0.0.1", port))
            newcomer.go("disk")
            newcomer.sock.sendall(request(n.Command.WRITE, 3, 0, 4) + b"abcd")
            assert newcomer.simple_reply(3) == (0, b"")
            newcomer.close()
        with open(path, "rb") as f:
            assert f.read() == b"abcd" + data[4 : 64 * 1024]
    finally:
        device.close()
        os.unlink(path)
