"""A worker that runs libnbd scripts and reports what they did, for the differential tests (tests/libnbd_diff.py).

Run as ``python libnbd_worker.py real`` (``import nbd``: Debian's binding, only /usr/bin/python3 has it) or
``python libnbd_worker.py ours`` (``from nbdproto import libnbd as nbd``). It reads one JSON job a line on
stdin, ``{"script": ..., "params": {...}}``, runs the script with ``nbd``, ``PARAMS`` and the recording helpers
below, and writes the script's trace as one JSON line on its original stdout (what the script prints goes to
stderr). The same script text runs on both sides; the tests compare the traces.

This file runs under the system Python too: standard library only, no nbdproto, no pytest.
"""

import ctypes
import hashlib
import json
import os
import sys
import traceback

PRELUDE = '''
def norm(value):
    """A JSON-able form of what a call returned or a callback got."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) <= 64:
            return "bytes:" + data.hex()
        return "sha256:%d:%s" % (len(data), _hashlib.sha256(data).hexdigest())
    if isinstance(value, _ctypes.c_int):
        return {"c_int": value.value}
    if isinstance(value, nbd.Buffer):
        return norm(value.to_bytearray())
    if isinstance(value, (list, tuple)):
        return [norm(item) for item in value]
    if isinstance(value, dict):
        return {str(key): norm(item) for key, item in sorted(value.items())}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "<%s>" % type(value).__name__


def rec(*items):
    """Record one entry of the trace."""
    trace.append(norm(list(items)))


def failure(label, exc):
    """How a call failed: the exception's type, and for nbd.Error its errno and the call its message names."""
    if isinstance(exc, nbd.Error):
        rec(label, "Error", exc.errnum, exc.errno, exc.string.split(":", 1)[0])
        messages.append(exc.string)
    else:
        rec(label, type(exc).__name__)


def attempt(label, fn, *args, **kwargs):
    """Call fn and record its result, or how it failed; returns the result (None on failure)."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        failure(label, exc)
        return None
    rec(label, "ok", result)
    return result


def recorder(label, returns=0):
    """A callback that records its arguments and returns ``returns``."""
    def callback(*args):
        rec(label, *args)
        return returns
    return callback
'''


def main() -> None:
    implementation = sys.argv[1]
    if implementation == "real":
        import nbd
    else:
        from nbdproto import libnbd as nbd
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a script's prints go to stderr: stdout carries the traces only
    sys.stdout = sys.stderr
    for line in sys.stdin:
        job = json.loads(line)
        namespace = {
            "nbd": nbd,
            "PARAMS": job["params"],
            "trace": [],
            "messages": [],
            "_hashlib": hashlib,
            "_ctypes": ctypes,
        }
        exec(PRELUDE, namespace)
        try:
            exec(compile(job["script"], "<script>", "exec"), namespace)
        except BaseException as exc:  # the test shows what escaped, whatever it was
            namespace["trace"].append(["uncaught", type(exc).__name__])
            traceback.print_exc()
        answers.write(json.dumps({"trace": namespace["trace"], "messages": namespace["messages"]}) + "\n")
        answers.flush()
        namespace.clear()


if __name__ == "__main__":
    main()
