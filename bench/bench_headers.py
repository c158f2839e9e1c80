"""Nanoseconds per parse and per build of each hot header: the derived codec, raw struct, and construct.

The codecs in nbdproto.wire.headers are derived from the construct definitions in nbdproto.wire.layout; this shows they
cost what a hand-written struct.Struct costs (target: ratio <= 1.5), and what construct alone would cost.

    python bench/bench_headers.py [--number 200000]
"""

from __future__ import annotations

import argparse
import struct
import timeit

from nbdproto.wire import headers as h
from nbdproto.wire import layout as w

# The hand-written baseline: the layouts typed out again, as a server without the wire layer would.
RAW = {
    "Request": struct.Struct(">IHHQQI"),
    "ExtendedRequest": struct.Struct(">IHHQQQ"),
    "SimpleReply": struct.Struct(">IIQ"),
    "StructuredReplyHeader": struct.Struct(">IHHQI"),
    "ExtendedReplyHeader": struct.Struct(">IHHQQQ"),
}
CODECS = [h.REQUEST, h.EXTENDED_REQUEST, h.SIMPLE_REPLY, h.STRUCTURED_REPLY, h.EXTENDED_REPLY]


def best(statement: str, names: dict[str, object], number: int, repeat: int = 7) -> float:
    """Nanoseconds per run of ``statement`` (timeit, no wrapper call in the loop), best of ``repeat``."""
    return min(timeit.repeat(statement, globals=names, number=number, repeat=repeat)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    number = args.number
    print(f"{'header':<22} {'op':<6} {'codec ns':>9} {'raw ns':>8} {'ratio':>6} {'construct ns':>13}")
    worst = 0.0
    for codec in CODECS:
        raw = RAW[codec.name]
        values = tuple(codec.magic if i == 0 else i + 1 for i in range(len(codec.names)))
        data = codec.pack(*values)
        compiled = w.MESSAGES[codec.name].compile()
        fields = dict(zip(codec.names, values, strict=True))
        names = {"codec": codec, "raw": raw, "compiled": compiled, "data": data, "values": values, "fields": fields}
        rows = [
            ("parse", "codec.unpack_from(data, 0)", "raw.unpack_from(data, 0)", "compiled.parse(data)"),
            ("build", "codec.pack(*values)", "raw.pack(*values)", "compiled.build(fields)"),
        ]
        for op, fast, baseline, slow in rows:
            ns_codec, ns_raw = best(fast, names, number), best(baseline, names, number)
            ns_construct = best(slow, names, max(number // 20, 1000))
            ratio = ns_codec / ns_raw
            worst = max(worst, ratio)
            print(f"{codec.name:<22} {op:<6} {ns_codec:9.0f} {ns_raw:8.0f} {ratio:6.2f} {ns_construct:13.0f}")
    print(f"worst codec/raw ratio: {worst:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
