"""The floor: the obvious Python NBD server, and nothing else.

Fixed newstyle, NBD_OPT_GO answered with the export's size, then for each 28-byte request header: a read is a
pread and one sendall of the simple reply; a write is received with recv_into into one buffer the connection
keeps (its payload never joined or copied in Python), pwritten, and answered; anything else is answered with
success (flush: the page cache is the file). No engine, no checks, no structured replies, a thread per
connection. bench/bench_qd1.sh and bench/bench_table.py run it beside nbdkit and our servers, so the cost of
Python itself (a wake-up per request, the interpreter lock, the bytecode of the loop) can be seen.

    python bench/plain_server.py FILE PORT
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading

_HEADER = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_REPLY_MAGIC = 0x67446698
_MAX_WRITE = 32 << 20


def serve(path: str, port: int) -> None:
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_connection, args=(sock, fd, size), daemon=True).start()


def _connection(sock: socket.socket, fd: int, size: int) -> None:
    try:
        _handshake(sock, size)
        _transmission(sock, fd)
    except (ConnectionError, struct.error, ValueError):
        pass
    finally:
        sock.close()


def _recv(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError
        data += chunk
    return data


def _handshake(sock: socket.socket, size: int) -> None:
    sock.sendall(b"NBDMAGIC" + struct.pack(">QH", 0x49484156454F5054, 3))
    _recv(sock, 4)
    while True:
        _, option, length = struct.unpack(">QII", _recv(sock, 16))
        _recv(sock, length)
        if option == 7:  # GO: NBD_INFO_EXPORT (flags: HAS_FLAGS, SEND_FLUSH, CAN_MULTI_CONN), then ACK
            info = struct.pack(">HQH", 0, size, 1 | 4 | 256)
            sock.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 3, len(info)) + info)
            sock.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 1, 0))
            return
        sock.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 0x80000001, 0))  # everything else: UNSUP


def _transmission(sock: socket.socket, fd: int) -> None:
    payload = memoryview(bytearray(_MAX_WRITE))
    while True:
        _, _, command, cookie, offset, length = _HEADER.unpack(_recv(sock, 28))
        if command == 0:  # READ
            sock.sendall(_REPLY.pack(_REPLY_MAGIC, 0, cookie) + os.pread(fd, length, offset))
        elif command == 1:  # WRITE
            if length > _MAX_WRITE:
                raise ValueError("write too large for the floor")
            view, got = payload[:length], 0
            while got < length:
                count = sock.recv_into(view[got:])
                if not count:
                    raise ConnectionError
                got += count
            os.pwrite(fd, view, offset)
            sock.sendall(_REPLY.pack(_REPLY_MAGIC, 0, cookie))
        elif command == 2:  # DISC
            return
        else:  # FLUSH and the rest: nothing to do for a file in the page cache
            sock.sendall(_REPLY.pack(_REPLY_MAGIC, 0, cookie))


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
