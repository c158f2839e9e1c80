"""``--filter NAME[:KEY=VALUE,...]`` of ``nbdproto serve``: filter specs, checked before anything is served.

A spec names a filter of ``nbdproto.devices`` and its settings; several ``--filter`` options stack in the
order given, the first outermost (the first sees the client's requests as sent), as nbdkit's ``--filter``
options do. ``parse_filters`` checks every name, key and value and raises a one-line UsageError for a bad one,
before the server listens; ``Filtering`` then wraps each export's device, and keeps what the command line
reports at the end (stats) or must close (log files).

    cow        overlay=PATH (a new or empty file; default: memory)
    readonly
    delay      read, write, zero, trim, flush, extents, cache = DURATION (10ms, 1.5s, 250us, 2)
    error      errno=EIO|EPERM|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN, rate=PROBABILITY (0.1 or 10%; default 1),
               commands=read+write+zero+trim+flush+extents+cache (default all), trigger=PATH
    log        file=PATH (default: stderr)
    stats      file=PATH (default: stderr); written at exit and on SIGUSR1
    blocksize  minimum=SIZE (default: the device's own minimum), maximum=SIZE (default: its maximum)
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from nbdproto import BlockDevice
from nbdproto.devices import FILTER_COMMANDS
from nbdproto.files import replace_file, writable_file

from ._errors import UsageError, parse_size

if TYPE_CHECKING:
    from nbdproto.devices import StatsFilter

__all__ = ["FilterSpec", "parse_filter", "parse_filters", "Filtering"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s)?\s*$")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
_ERRNOS = ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "ESHUTDOWN")
_COMMANDS = tuple(FILTER_COMMANDS)


def _duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 10ms, 1.5s, 250us, 2)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _errno(text: str) -> int:
    name = text.strip().upper()
    if name not in _ERRNOS:
        raise ValueError(f"{text!r} is not an NBD error (one of {', '.join(_ERRNOS)})")
    return int(getattr(errno, name))


def _rate(text: str) -> float:
    try:
        rate = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a probability (examples: 0.1, 10%)") from None
    if not 0 <= rate <= 1:
        raise ValueError(f"{text!r} is not a probability from 0 to 1 (or 0% to 100%)")
    return rate


def _commands(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split("+"))
    for name in names:
        if name not in _COMMANDS:
            raise ValueError(f"{name!r} is not a command (commands: {'+'.join(_COMMANDS)})")
    return names


def _block_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0 or size & (size - 1) or size > 65536:
        raise ValueError(f"{text!r} is not a power of two from 1 to 64K")
    return size


def _request_size(text: str) -> int:
    size = parse_size(text)
    if not 0 < size <= 0xFFFFFFFF:
        raise ValueError(f"{text!r} is not a size from 1 byte to 4 GiB")
    return size


def _path(text: str) -> str:
    if not text:
        raise ValueError("a path cannot be empty")
    return text


def _overlay(text: str) -> str:
    path = _path(text)
    if os.path.exists(path) and (not os.path.isfile(path) or os.path.getsize(path)):
        raise ValueError(f"{path} exists and is not an empty file (the overlay is a new file)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory")
    return path


def _output(text: str) -> str:
    path = _path(text)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory")
    return path


_KEYS: dict[str, dict[str, Callable[[str], Any]]] = {
    "cow": {"overlay": _overlay},
    "readonly": {},
    "delay": {command: _duration for command in _COMMANDS},
    "error": {"errno": _errno, "rate": _rate, "commands": _commands, "trigger": _path},
    "log": {"file": _output},
    "stats": {"file": _output},
    "blocksize": {"minimum": _block_size, "maximum": _request_size},
}


@dataclass(frozen=True)
class FilterSpec:
    """One ``--filter``: the filter's name and its settings, already checked and converted."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_filter(text: str) -> FilterSpec:
    """The FilterSpec ``text`` names, or a UsageError naming what is wrong with it."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in _KEYS:
        raise UsageError(f"--filter {text!r}: no filter named {name!r} (filters: {', '.join(_KEYS)})")
    keys = _KEYS[name]
    options: dict[str, Any] = {}
    for item in rest.split(",") if rest else ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in keys:
            known = f"keys: {', '.join(keys)}" if keys else "it takes no keys"
            raise UsageError(f"--filter {name}: unknown key {key!r} ({known})")
        if not sep:
            raise UsageError(f"--filter {name}: {key} needs a value ({key}=VALUE)")
        if key in options:
            raise UsageError(f"--filter {name}: {key} given twice")
        try:
            options[key] = keys[key](value.strip())
        except ValueError as exc:
            raise UsageError(f"--filter {name}: {key}: {exc}") from None
    minimum, maximum = options.get("minimum"), options.get("maximum")
    if minimum is not None and maximum is not None and maximum % minimum:
        raise UsageError(f"--filter blocksize: maximum {maximum} is not a multiple of minimum {minimum}")
    return FilterSpec(name, options)


def parse_filters(texts: Sequence[str], exports: int = 1) -> list[FilterSpec]:
    """Every ``--filter`` in order (the first outermost), checked; ``exports`` is how many exports they wrap."""
    specs = [parse_filter(text) for text in texts]
    if exports > 1 and any(spec.name == "cow" and "overlay" in spec.options for spec in specs):
        raise UsageError("--filter cow:overlay=PATH serves one export (an overlay file belongs to one device)")
    logs = {os.path.abspath(s.options["file"]) for s in specs if s.name == "log" and "file" in s.options}
    stats = {os.path.abspath(s.options["file"]) for s in specs if s.name == "stats" and "file" in s.options}
    if logs & stats:
        raise UsageError(f"--filter log and --filter stats cannot write to one file ({sorted(logs & stats)[0]})")
    return specs


class Filtering:
    """Applies the filters to each export's device and keeps what must be reported or closed at the end."""

    def __init__(self, specs: Sequence[FilterSpec], several_exports: bool = False) -> None:
        self.specs = list(specs)
        self._several = several_exports
        self._streams: dict[str, IO[str]] = {}
        self.stats: list[tuple[str, StatsFilter, str | None]] = []  # (export, filter, file)
        self.worker: int | None = None
        """With ``serve --workers``, the worker (from 1) this process is: its stats are its own, headed with
        its number and pid, and a stats ``file=PATH`` is written to PATH.N (each worker its own)."""

    def become_worker(self, number: int) -> None:
        """This (forked) process is worker ``number``: its stats count from now (see ``worker``)."""
        import time

        self.worker = number
        for _, stats, _ in self.stats:
            stats.started = time.monotonic()

    @property
    def source_read_only(self) -> bool:
        """True when nothing is ever written to the source (a cow or readonly filter sits above it), so it can
        be opened read-only."""
        return any(spec.name in ("cow", "readonly") for spec in self.specs)

    def _stream(self, path: str | None) -> IO[str]:
        if path is None:
            return sys.stderr
        if path not in self._streams:
            # Created as nbdproto.files creates every file: no symlink followed, another user's file refused.
            self._streams[path] = open(writable_file(path), "w", buffering=1, encoding="utf-8")  # noqa: SIM115
        return self._streams[path]

    def wrap(self, device: BlockDevice, export: str) -> BlockDevice:
        """``device`` inside every filter, the first spec outermost. OSError when a file cannot be opened;
        UsageError when a setting does not suit the device (e.g. a blocksize minimum below its own)."""
        from nbdproto import devices

        for spec in reversed(self.specs):
            options = spec.options
            try:
                if spec.name == "cow":
                    device = devices.CowFilter(device, overlay=options.get("overlay"))
                elif spec.name == "readonly":
                    device = devices.ReadOnlyFilter(device)
                elif spec.name == "delay":
                    device = devices.DelayFilter(device, **options)
                elif spec.name == "error":
                    device = devices.ErrorFilter(
                        device,
                        error=options.get("errno", errno.EIO),
                        rate=options.get("rate", 1.0),
                        commands=options.get("commands", _COMMANDS),
                        trigger=options.get("trigger"),
                    )
                elif spec.name == "log":
                    stream = self._stream(options.get("file"))
                    device = devices.LogFilter(device, stream, export=export if self._several else None)
                elif spec.name == "stats":
                    stats = devices.StatsFilter(device)
                    self.stats.append((export, stats, options.get("file")))
                    device = stats
                elif spec.name == "blocksize":
                    device = devices.BlockSizeFilter(device, **options)
            except ValueError as exc:
                raise UsageError(f"--filter {spec.name}: {exc}") from None
        return device

    def report_stats(self) -> None:
        """Write every stats filter's figures: to its file (replacing what an earlier report wrote) or stderr."""
        by_file: dict[str | None, list[str]] = {}
        for export, stats, path in self.stats:
            title = f"export {export!r}" if self._several else ""
            if self.worker is not None:
                title = ", ".join(filter(None, (f"worker {self.worker} (pid {os.getpid()})", title)))
                path = None if path is None else f"{path}.{self.worker}"
            by_file.setdefault(path, []).append(stats.report(title))
        for path, reports in by_file.items():
            if path is None:
                sys.stderr.write("".join(reports))
                sys.stderr.flush()
            else:
                try:
                    replace_file(path, "".join(reports).encode())
                except OSError as exc:  # (a file another user planted there since: refused, and said)
                    print(f"nbdproto: cannot write the stats to {path}: {exc.strerror or exc}", file=sys.stderr)

    def close(self) -> None:
        """Close the log files (after the devices are closed)."""
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
