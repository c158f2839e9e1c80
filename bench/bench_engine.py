"""How many pipelined 4 KiB READ requests per second ServerConnection parses and answers, on one core; and how
many requests per second ClientConnection sends and takes the replies of.

The stream is what a client at queue depth N sends: many 28-byte READ headers back to back. Each round feeds
a batch to the engine, takes every request (``next_requests``, as the servers' serving logic does; one row
takes them with ``next_event`` one at a time), answers each read with one ReadData chunk, and collects the
bytes to send; no sockets. Beside it, the raw baseline: the same loop with struct.Struct alone (parse the header,
pack a simple reply), i.e. the least any Python server must do per request.

The client rounds send a batch of requests, feed the server's replies (made once, by ServerConnection) and
take every event: 4 KiB reads answered in one chunk, reads answered as a hole and a data chunk, and block
status answered with four extents.

    python bench/bench_engine.py [--requests 200000] [--batch 64]
"""

from __future__ import annotations

import argparse
import struct
import time

import nbdproto as n
import nbdproto.wire
from nbdproto.engine import ServerConnection

MIB = 1 << 20


def connected_server(mode: str) -> ServerConnection:
    server = ServerConnection()
    server.data_to_send()
    opts = b""
    if mode == "structured":
        opts += struct.pack(">QII", n.wire.IHAVEOPT, n.Option.STRUCTURED_REPLY, 0)
    elif mode == "extended":
        opts += struct.pack(">QII", n.wire.IHAVEOPT, n.Option.EXTENDED_HEADERS, 0)
    go = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
    opts += struct.pack(">QII", n.wire.IHAVEOPT, n.Option.GO, len(go)) + go
    server.receive_data(struct.pack(">I", 3) + opts)
    while not isinstance(server.next_event(), n.ExportRequested):
        pass
    server.send(n.Export("disk", 1 << 30))
    assert isinstance(server.next_event(), n.HandshakeComplete)
    server.data_to_send()
    return server


def stream(batch: int, extended: bool) -> bytes:
    fmt = struct.Struct(">IHHQQQ" if extended else ">IHHQQI")
    magic = n.wire.EXTENDED_REQUEST_MAGIC if extended else n.wire.REQUEST_MAGIC
    return b"".join(fmt.pack(magic, 0, n.Command.READ, i, (i * 4096) % (1 << 30), 4096) for i in range(batch))


def run_engine(requests: int, batch: int, mode: str, one_by_one: bool = False) -> float:
    """Server pairs per second: each round's requests taken with ``next_requests`` (as nbdproto.serving takes
    them), or with ``next_event`` one at a time."""
    server = connected_server(mode)
    data = stream(batch, mode == "extended")
    payload = bytes(4096)
    read_data = n.ReadData
    read_request = n.ReadRequest
    rounds = requests // batch
    taken: list[n.Event] = []
    start = time.perf_counter()
    for _ in range(rounds):
        server.receive_data(data)
        send = server.send
        if one_by_one:
            next_event = server.next_event
            while True:
                event = next_event()
                if type(event) is read_request:
                    send(read_data(event.cookie, event.offset, payload))
                else:
                    break
        else:
            server.next_requests(taken)
            for event in taken:
                send(read_data(event.cookie, event.offset, payload))  # type: ignore[attr-defined]
            taken.clear()
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
            if magic != n.wire.REQUEST_MAGIC or command != 0 or offset + length > 1 << 30:
                raise ValueError
            out.append(reply.pack(n.wire.SIMPLE_REPLY_MAGIC, 0, cookie))
            out.append(payload)
    return rounds * batch / (time.perf_counter() - start)


def connected_client(mode: str) -> tuple[n.ClientConnection, ServerConnection]:
    """A client engine and a server engine in transmission with each other (base:allocation agreed)."""
    client, server = n.ClientConnection(), ServerConnection()

    def pump() -> None:
        for _ in range(20):
            for src, dst in ((server, client), (client, server)):
                data = b"".join(bytes(p) for p in src.data_to_send())
                if data:
                    dst.receive_data(data)
            while True:
                event = server.next_event()
                if isinstance(event, n.ExportRequested):
                    server.send(n.Export("disk", 1 << 30, meta_contexts=(n.BASE_ALLOCATION,)))
                elif event is n.NEED_DATA or event is n.PAUSED or isinstance(event, n.HandshakeComplete):
                    break

    pump()
    assert isinstance(client.next_event(), n.ServerGreeting)
    options: list[n.Event] = []
    if mode == "structured":
        options += [n.OptionStructuredReply(), n.OptionSetMetaContext("disk", (n.BASE_ALLOCATION,))]
    elif mode == "extended":
        options += [n.OptionExtendedHeaders(), n.OptionSetMetaContext("disk", (n.BASE_ALLOCATION,))]
    options.append(n.OptionGo("disk", (n.InfoType.BLOCK_SIZE,)))
    for option in options:
        client.send(option)
        pump()
        event = client.next_event()
        assert not isinstance(event, n.OptionError), event
    assert client.phase is n.Phase.TRANSMISSION
    return client, server


def client_replies(server: ServerConnection, requests: list[bytes], kind: str) -> bytes:
    """The server's reply bytes to one batch of the client's request bytes."""
    server.receive_data(b"".join(requests))
    payload = bytes(4096)
    while True:
        event = server.next_event()
        if isinstance(event, n.ReadRequest):
            if kind == "read+hole":
                server.send(n.ReadHole(event.cookie, event.offset, 2048))
                server.send(n.ReadData(event.cookie, event.offset + 2048, payload[2048:]))
            else:
                server.send(n.ReadData(event.cookie, event.offset, payload))
        elif isinstance(event, n.BlockStatusRequest):
            extents = tuple(n.Extent(1024, i % 4) for i in range(4))
            server.send(n.BlockStatusReply(event.cookie, {i: extents for i in event.context_ids}))
        else:
            break
    return b"".join(bytes(p) for p in server.data_to_send())


def run_client(requests: int, batch: int, mode: str, kind: str) -> float:
    client, server = connected_client(mode)
    make = n.BlockStatusRequest if kind == "block status" else n.ReadRequest
    context = tuple(client.meta_contexts)
    for cookie in range(batch):
        if make is n.BlockStatusRequest:
            client.send(n.BlockStatusRequest(cookie, cookie * 4096, 4096, context_ids=context))
        else:
            client.send(n.ReadRequest(cookie, cookie * 4096, 4096))
    replies = client_replies(server, [bytes(p) for p in client.data_to_send()], kind)
    client.receive_data(replies)
    while client.next_event() is not n.NEED_DATA:
        pass
    rounds = requests // batch
    offsets = [cookie * 4096 for cookie in range(batch)]
    start = time.perf_counter()
    for _ in range(rounds):
        send = client.send
        for cookie, offset in enumerate(offsets):
            send(make(cookie, offset, 4096))
        client.data_to_send()
        client.receive_data(replies)
        next_event = client.next_event
        while next_event() is not n.NEED_DATA:
            pass
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
    rate = max(run_engine(args.requests, args.batch, "simple", one_by_one=True) for _ in range(args.repeat))
    print(f"ServerConnection simple, next_event one by one {rate:12,.0f} requests/s   ({rate / raw:.2f}x raw)")
    for mode, kind in (("simple", "read"), ("structured", "read"), ("extended", "read"),
                       ("structured", "read+hole"), ("structured", "block status"),
                       ("extended", "block status")):  # fmt: skip
        rate = max(run_client(args.requests, args.batch, mode, kind) for _ in range(args.repeat))
        print(f"ClientConnection {mode:<11} {kind:<12} {rate:12,.0f} requests/s")


if __name__ == "__main__":
    main()
