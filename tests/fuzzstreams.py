"""Seeded byte streams for fuzzing a server: valid client conversations, then mutated.

``client_stream(seed)`` is deterministic: the same seed gives the same bytes on every machine, so a failing case
is reproduced by its number. The seeds build from a handful of real conversations (a plain GO with requests,
structured replies and meta contexts, extended headers, listing and INFO, STARTTLS refused, writes bigger than a
receive) cut and mutated the
way hostile or broken clients are: bits flipped, bytes inserted and dropped, length fields made huge, chunks
repeated, the stream truncated anywhere.
"""

from __future__ import annotations

import random
import struct

import nbdproto as n
from tests.nbdbytes import client_flags, info_payload, meta_payload, option, request

__all__ = ["client_stream", "conversations"]

C = n.Command


def conversations() -> list[bytes]:
    """Well-formed client byte streams to mutate."""
    go = option(n.Option.GO, info_payload("", n.InfoType.BLOCK_SIZE))
    simple_requests = b"".join(
        [
            request(C.WRITE, 1, 0, 512) + bytes(range(256)) * 2,
            request(C.READ, 2, 0, 4096),
            request(C.FLUSH, 3),
            request(C.TRIM, 4, 4096, 4096),
            request(C.WRITE_ZEROES, 5, 8192, 4096, n.CommandFlags.NO_HOLE),
            request(C.CACHE, 6, 0, 65536),
            request(C.READ, 7, 65536, 512, n.CommandFlags.FUA),
            request(C.DISC, 8),
        ]
    )
    structured = (
        option(n.Option.STRUCTURED_REPLY)
        + option(n.Option.SET_META_CONTEXT, meta_payload("", "base:allocation"))
        + go
        + request(C.BLOCK_STATUS, 1, 0, 1 << 20)
        + request(C.READ, 2, 0, 65536, n.CommandFlags.DF)
        + request(C.DISC, 3)
    )
    extended = (
        option(n.Option.EXTENDED_HEADERS)
        + option(n.Option.SET_META_CONTEXT, meta_payload("", "base:allocation"))
        + go
        + request(C.WRITE, 1, 0, 1024, n.CommandFlags.PAYLOAD_LEN, extended=True)
        + bytes(1024)
        + request(C.BLOCK_STATUS, 2, 0, 1 << 20, extended=True)
        + request(C.READ, 3, 0, 4096, extended=True)
        + request(C.DISC, 4, extended=True)
    )
    listing = (
        option(n.Option.LIST)
        + option(n.Option.INFO, info_payload("", n.InfoType.NAME, n.InfoType.DESCRIPTION))
        + option(n.Option.LIST_META_CONTEXT, meta_payload("", "base:"))
        + option(n.Option.STARTTLS)
        + option(n.Option.ABORT)
    )
    old_export_name = option(n.Option.EXPORT_NAME, b"") + simple_requests
    # Writes bigger than a server's receive: their payloads straddle receives, and the server takes larger ones.
    big_writes = b"".join(request(C.WRITE, i + 1, i * 196608, 196608) + bytes([i + 1]) * 196608 for i in range(3))
    streaming = go + big_writes + request(C.READ, 4, 0, 65536) + request(C.DISC, 5)
    return [
        client_flags() + go + simple_requests,
        client_flags() + structured,
        client_flags() + extended,
        client_flags() + listing,
        client_flags() + old_export_name,
        client_flags() + streaming,
    ]


_BASES = conversations()


def client_stream(seed: int) -> bytes:
    """The mutated client stream number ``seed``."""
    rng = random.Random(seed)
    data = bytearray(_BASES[seed % len(_BASES)])
    for _ in range(rng.randint(1, 4)):
        _mutate(rng, data)
    return bytes(data)


def _mutate(rng: random.Random, data: bytearray) -> None:
    if not data:
        data.extend(rng.randbytes(rng.randint(1, 64)))
        return
    kind = rng.randrange(7)
    at = rng.randrange(len(data))
    if kind == 0:  # flip a bit
        data[at] ^= 1 << rng.randrange(8)
    elif kind == 1:  # insert junk
        data[at:at] = rng.randbytes(rng.randint(1, 32))
    elif kind == 2:  # drop bytes
        del data[at : at + rng.randint(1, 32)]
    elif kind == 3:  # a 32-bit field made huge or zero (lengths, magics, flags)
        data[at : at + 4] = struct.pack(">I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 25, 4096 * 1024]))
    elif kind == 4:  # a chunk repeated
        end = min(len(data), at + rng.randint(1, 64))
        data[end:end] = data[at:end] * rng.randint(1, 4)
    elif kind == 5:  # cut short
        del data[at:]
    else:  # random bytes over the stream
        span = rng.randint(1, 16)
        data[at : at + span] = rng.randbytes(span)
