"""Capture real NBD conversations: nbdinfo and nbdsh (libnbd) talking to nbdkit, through the recording proxy.

``python -m tests.capture`` rewrites spec/vectors/transcripts/nbdkit-*.json from fresh captures; the test
suite calls ``capture(...)`` to check, live, that the wire layer still parses every byte real peers send.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import PEER_ENV
from tests.recording_proxy import RecordingProxy
from tests.remotes import free_port, wait_for_port
from tests.transcript import decode_transcript, to_json

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "transcripts"

NBDSH_SCRIPT = """
h.pwrite(b"hello, nbd", 4096)
assert h.pread(10, 4096) == b"hello, nbd"
h.flush()
h.trim(65536, 131072)
h.zero(4096, 196608)
h.cache(8192, 0)
seen = []
h.block_status(262144, 0, lambda ctx, off, entries, err: seen.append(entries))
assert seen
"""

# name -> (nbdkit plugin arguments, client command; {uri} is replaced)
SCENARIOS: dict[str, tuple[list[str], list[str]]] = {
    "nbdinfo-map": (["data", "data=1 2 3 @0x10000 4 5 6", "size=1M"], ["nbdinfo", "--map", "{uri}"]),
    "nbdinfo-list": (["memory", "size=1M"], ["nbdinfo", "--list", "{uri}"]),
    "nbdsh-commands": (["memory", "size=1M"], ["nbdsh", "--base-allocation", "-u", "{uri}", "-c", NBDSH_SCRIPT]),
}


@contextlib.contextmanager
def nbdkit(plugin_args: list[str], timeout: float = 10.0) -> Iterator[int]:
    """Run nbdkit on a free loopback port; yields the port once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), *plugin_args],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc, "nbdkit", timeout)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout)


def capture(name: str) -> list[tuple[str, bytes]]:
    """Run scenario ``name`` through the proxy; the chunks of the client's last connection (libnbd tools may
    probe first)."""
    plugin_args, command = SCENARIOS[name]
    with nbdkit(plugin_args) as port, RecordingProxy(("127.0.0.1", port)) as proxy:
        uri = f"nbd://127.0.0.1:{proxy.port}/"
        args = [arg.replace("{uri}", uri) for arg in command]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=PEER_ENV)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed: {result.stderr}")
    return proxy.connections[-1]


def main() -> None:
    TRANSCRIPTS.mkdir(parents=True, exist_ok=True)
    for name in SCENARIOS:
        chunks = capture(name)
        document = {
            "description": f"{name}: captured from libnbd talking to nbdkit (see tests/capture.py)",
            "peers": {"client": SCENARIOS[name][1][0], "server": "nbdkit " + SCENARIOS[name][0][0]},
            "chunks": [{"direction": d, "hex": data.hex()} for d, data in chunks],
            "messages": to_json(decode_transcript(chunks)),
        }
        path = TRANSCRIPTS / f"nbdkit-{name}.json"
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {path} ({len(document['messages'])} messages)", file=sys.stderr)


if __name__ == "__main__":
    main()
