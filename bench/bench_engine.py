"""How many pipelined 4 KiB READ requests per second ServerConnection parses and answers, on one core.

The stream is what a client at queue depth N sends: many 28-byte READ headers back to back. Each round feeds
a batch to the engine, takes every event, answers each read with one ReadData chunk, and collects the bytes
to send; no sockets. Beside it, the raw baseline: the same loop with struct.Struct alone (parse the header,
pack a simple reply), i.e. the least any Python server must do per request.

    python bench/bench_engine.py [--requests 200000] [--batch 64] [--mode simple|structured|extended]
"""

from __future__ import annotations

import argparse
import struct
import time

import nbdproto as n
from nbdproto._server import ServerConnection

MIB = 1 << 20


def connected_server(mode: str) -> ServerConnection:
    server = ServerConnection()
    server.data_to_send()
    opts = b""
    if mode == "structured":
        opts += struct.pack(">QII", n.IHAVEOPT, n.Option.STRUCTURED_REPLY, 0)
    elif mode == "extended":
        opts += struct.pack(">QII", n.IHAVEOPT, n.Option.EXTENDED_HEADERS, 0)
    go = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
    opts += struct.pack(">QII", n.IHAVEOPT, n.Option.GO, len(go)) + go
    server.receive_data(struct.pack(">I", 3) + opts)
    while not isinstance(server.next_event(), n.ExportRequested):
        pass
    server.send(n.Export("disk", 1 << 30))
    assert isinstance(server.next_event(), n.HandshakeComplete)
    server.data_to_send()
    return server


def stream(batch: int, extended: bool) -> bytes:
    fmt = struct.Struct(">IHHQQQ" if extended else ">IHHQQI")
    magic = n.EXTENDED_REQUEST_MAGIC if extended else n.REQUEST_MAGIC
    return b"".join(fmt.pack(magic, 0, n.Command.READ, i, (i * 4096) % (1 << 30), 4096) for i in range(batch))


def run_engine(requests: int, batch: int, mode: str) -> float:
    server = connected_server(mode)
    data = stream(batch, mode == "extended")
    payload = bytes(4096)
    read_data = n.ReadData
    read_request = n.ReadRequest
    rounds = requests // batch
    start = time.perf_counter()
    for _ in range(rounds):
        server.receive_data(data)
        next_event, send = server.next_event, server.send
        while True:
            event = next_event()
            if type(event) is read_request:
                send(read_data(event.cookie, event.offset, payload))
            else:
                break
        server.data_to_send()
    return rounds * batch / (time.perf_counter() - start)


def run_raw(requests: int, batch: int) -> float:
    header = struct.Struct(">IHHQQI")
    reply = struct.Struct(">IIQ")
    data = stream(batch, False)
    payload = bytes(4096)
    rounds = requests // batch
    start = time.perf_counter()
    for _ in range(rounds):
        out = []
        for pos in range(0, len(data), 28):
            magic, _flags, command, cookie, offset, length = header.unpack_from(data, pos)
            if magic != n.REQUEST_MAGIC or command != 0 or offset + length > 1 << 30:
                raise ValueError
            out.append(reply.pack(n.SIMPLE_REPLY_MAGIC, 0, cookie))
            out.append(payload)
    return rounds * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=64, help="requests per receive_data call")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    raw = max(run_raw(args.requests, args.batch) for _ in range(args.repeat))
    print(f"raw struct baseline          {raw:12,.0f} requests/s")
    for mode in ("simple", "structured", "extended"):
        rate = max(run_engine(args.requests, args.batch, mode) for _ in range(args.repeat))
        print(f"ServerConnection {mode:<11} {rate:12,.0f} requests/s   ({rate / raw:.2f}x raw)")


if __name__ == "__main__":
    main()
