"""Where the command line's failures become messages and exit statuses, and the argument types every command
shares.

This is the one place: ``main`` hands every exception that ends a command to ``exit_status``, and the parsers
(``CommandParser``) hand every argument error to it as a ``UsageError``. What a user sees is one line on
stderr, ``nbdproto COMMAND: what went wrong``, that names the thing it is about (the file, the address, the
option), and the exit status of the tool the command mirrors:

- a usage error, a server that cannot be reached or refuses, a file that cannot be opened: 1, as nbdkit,
  nbdinfo, nbdcopy and nbdfuse all exit (``info --can`` / ``--is`` keep 2 for "no", so a typo is never read as
  "cannot");
- Ctrl-C: the process ends by SIGINT, silently (a shell sees 130), as nbdcopy does;
- standard output closed early (``nbdproto copy URI - | head -c 10``): the process ends by SIGPIPE, silently
  (141), as nbdcopy does.

What is not foreseen here (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import select
import signal
import ssl
import sys
from typing import Any, NoReturn

__all__ = [
    "USAGE_EXIT",
    "FAILURE_EXIT",
    "UsageError",
    "CommandParser",
    "exit_status",
    "describe",
    "ImageInUse",
    "IN_USE_EXIT",
    "parse_size",
    "size_argument",
    "port_argument",
    "count_argument",
    "seconds_argument",
    "add_timeout_argument",
    "timeout_of",
    "DEFAULT_TIMEOUT",
]

USAGE_EXIT = 1
"""A bad argument: nbdkit, nbdinfo, nbdcopy and nbdfuse all exit 1 (EXIT_FAILURE) for one."""

FAILURE_EXIT = 1
"""Anything else that stops a command (a server unreachable, a file unreadable, a copy that failed)."""

IN_USE_EXIT = 2
"""An image another server is writing (its S3 lease held, its dirty bitmaps locked): nothing asked was wrong,
it cannot be served now. Apart from 1, so that a failover script can tell "wait for the holder" from a mistake."""

DEFAULT_TIMEOUT = 30.0
"""Seconds a client command waits for a server that stopped answering (the connect, the handshake, a reply)."""

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)
_SSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")


class UsageError(Exception):
    """A bad argument: reported as one line (``prog``: the command it was given to, when the parser knows it)
    and exit status USAGE_EXIT, before anything is served or copied."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class ImageInUse(Exception):
    """The image ``serve`` was asked for is another server's to write now (EBUSY): one line, IN_USE_EXIT."""


class CommandParser(argparse.ArgumentParser):
    """argparse, with its errors made UsageErrors: one line, not a usage block, and the mirrored tools' status.
    Options are taken by their whole names only: an abbreviation that happens to fit another option
    (``mirror --memory 1G`` read as ``--memory-limit``) would do what was not asked, without a word."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def exit_status(exc: BaseException, prog: str) -> int:
    """Report ``exc``, which ended ``prog`` (``nbdproto info``...), as the module docstring says, and return the
    exit status; re-raise what is not foreseen (a bug, with its traceback). SIGINT and SIGPIPE end the
    process here."""
    if isinstance(exc, KeyboardInterrupt):
        _end_by(signal.SIGINT)
    if _output_closed(exc):
        _end_by(signal.SIGPIPE)
    if isinstance(exc, UsageError):
        _say(exc.prog or prog, str(exc))
        return USAGE_EXIT
    if isinstance(exc, ImageInUse):
        _say(prog, str(exc))
        return IN_USE_EXIT
    message = describe(exc)
    if message is None:
        raise exc
    _say(prog, message)
    return FAILURE_EXIT


def describe(exc: BaseException) -> str | None:
    """One line that says what failed and names what it failed on; None for an exception that is a bug."""
    from nbdproto import NegotiationError, OptionReplyType, ProtocolError
    from nbdproto_threads import CopyFailed

    if isinstance(exc, CopyFailed):
        cause = describe(exc.__cause__) if exc.__cause__ is not None else None
        return f"{cause} ({exc.copied} of {exc.total} bytes copied)" if cause else str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate was refused: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        # OpenSSL's own text ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:992)") gets what it is
        # about; nbdproto.tls's names the file already.
        text = _SSL_LOCATION.sub("", str(exc.args[1]) if len(exc.args) > 1 else str(exc))
        return f"TLS: {text}" if text.startswith("[") else text
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, NegotiationError) and exc.reply_type == OptionReplyType.ERR_UNKNOWN:
        return f"{exc} (nbdproto list URI shows the exports the server offers)"
    if isinstance(exc, (ValueError, NotImplementedError, ProtocolError, UnicodeError)):
        return str(exc) or type(exc).__name__
    return None


def _os_error(exc: OSError) -> str:
    if exc.strerror is None:
        return str(exc) or type(exc).__name__
    if exc.filename is not None:
        where = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes)) else str(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {os.fsdecode(exc.filename2)}"
        return f"{where}: {exc.strerror}"
    return str(exc.strerror)


def _say(prog: str, message: str) -> None:
    # One line, whatever the message carries (a server's error text may hold newlines).
    line = " ".join(message.split("\n"))
    with contextlib.suppress(OSError):  # stderr itself gone: nothing left to tell
        print(f"{prog}: {line}", file=sys.stderr, flush=True)


def _output_closed(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is EPIPE from standard output whose reader has gone."""
    seen: BaseException | None = exc
    epipe = False
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno == errno.EPIPE:
            epipe = True
            break
        seen = seen.__cause__ or seen.__context__
    if not epipe:
        return False
    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno() if sys.__stdout__ is not None else 1, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _end_by(signum: int) -> NoReturn:
    """End the process by ``signum`` with its default action, as a C tool that never caught it would end (the
    shell then sees 128 + signum, and so does a script that asks how it ended)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal is blocked in this thread


def parse_size(text: str) -> int:
    """Sizes as qemu and nbdkit write them: 512, 64K, 1M, 1G, 1.5T (binary units); ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 512, 64K, 1M, 1.5G, 2T)")
    number, unit = match.groups()
    size = float(number) * _UNITS[unit.upper()]
    if size != int(size):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(size)


def size_argument(text: str, what: str = "size") -> int:
    """A positive size from the command line, or a UsageError naming ``what``."""
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    if size <= 0:
        raise UsageError(f"{what} {text!r} must be positive")
    return size


def port_argument(text: str) -> int:
    """A TCP port for argparse: decimal digits, 0 to 65535 (0: any free port)."""
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 0 to 65535")
    return int(text)


def count_argument(minimum: int) -> Any:
    """An argparse type: a whole number of at least ``minimum``."""

    def count(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value

    count.__name__ = "count"
    return count


def seconds_argument(text: str) -> float:
    """An argparse type: seconds, 0 or more (``inf`` allowed; never NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds, 0 or more")
    return value


def add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """``--timeout SECONDS``, for the commands that talk to a server."""
    parser.add_argument(
        "--timeout",
        type=seconds_argument,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on a server that makes no progress for this long: the connect, the handshake, a reply "
        f"(default {DEFAULT_TIMEOUT:g}; 0: wait forever)",
    )


def timeout_of(args: argparse.Namespace) -> float | None:
    """The --timeout as a client library takes it (None: no limit)."""
    seconds: float = args.timeout
    if seconds < 0:
        raise UsageError(f"--timeout {seconds:g} must not be negative")
    return None if not seconds or math.isinf(seconds) else seconds
