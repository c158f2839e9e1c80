"""The floor for one request at a time: the obvious Python NBD server, and nothing else.

Fixed newstyle, NBD_OPT_GO answered with the export's size, then for each 28-byte request header: pread the
file, sendall the simple reply. No engine, no checks, no structured replies. bench/bench_qd1.sh runs it beside
nbdkit and our servers so the per-wake-up cost of Python itself can be seen.

    python bench/plain_server.py FILE PORT
"""

from __future__ import annotations

import os
import socket
import struct
import sys


def serve(path: str, port: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            _handshake(sock, size)
            _transmission(sock, fd)
        except (ConnectionError, struct.error):
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
        if option == 7:  # GO: NBD_INFO_EXPORT, then ACK
            info = struct.pack(">HQH", 0, size, 1)
            sock.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 3, len(info)) + info)
            sock.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 1, 0))
            return
        sock.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 0x80000001, 0))  # everything else: UNSUP


def _transmission(sock: socket.socket, fd: int) -> None:
    header = struct.Struct(">IHHQQI")
    reply = struct.Struct(">IIQ")
    while True:
        _, _, command, cookie, offset, length = header.unpack(_recv(sock, 28))
        if command == 2:  # DISC
            return
        if command == 0:
            sock.sendall(reply.pack(0x67446698, 0, cookie) + os.pread(fd, length, offset))
        else:
            sock.sendall(reply.pack(0x67446698, 22, cookie))  # EINVAL: this floor serves reads only


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
