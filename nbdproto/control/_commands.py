"""The control socket's commands, without I/O: a request object in, an answer object out.

``Controller`` knows a server's exports (``ControlledExport``: the name a client asks for, and the
``DirtyBitmapFilter`` that keeps its bitmaps and checkpoints), and the ``ExportTable`` the server looks names up
in, where a checkpoint's view is added as ``EXPORT@NAME`` and removed again when it is released. Every command
takes ``export`` (the export's name; it may be left out when the server has one export) and answers with a
``result``; docs/howto/backup.md shows each with its answer.

=================  ========================================  ===============================================
command            arguments                                 result
=================  ========================================  ===============================================
``bitmap-add``     ``name``, ``granularity`` (bytes)          the bitmap (name, granularity, dirty_bytes, ...)
``bitmap-remove``  ``name``                                  {export, name}
``bitmap-clear``   ``name``                                  the bitmap, every granule clean
``bitmap-list``    (``export``: else every export's)         a list of bitmaps
``checkpoint``     ``name``, ``since``, ``granularity``,      {export, name, view, uri, since, bitmap, dirty}
                   ``limit`` (bytes kept aside at most)
``release``        ``name``                                  the view's status as it ended
``status``         (``export``: else every export)           {version, exports: [{..., bitmaps, views}]}
``help``                                                     {command: its arguments}
=================  ========================================  ===============================================

Commands that change something run one at a time (a lock), so two checkpoints never race for a name; the
others answer at once, even while a checkpoint waits for the instant it needs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nbdproto.devices.bitmaps import BitmapError, BitmapInfo, DirtyBitmapFilter, ViewStatus, check_granularity
from nbdproto.serving import ExportSpec, ExportTable

from ._protocol import (
    PROTOCOL_VERSION,
    Arguments,
    ControlError,
    encode_answer,
    error_answer,
    ok_answer,
    parse_request,
)

__all__ = ["Controller", "ControlledExport", "COMMANDS"]

log = logging.getLogger("nbdproto.control")

COMMANDS: dict[str, list[str]] = {
    "bitmap-add": ["export", "name", "granularity"],
    "bitmap-remove": ["export", "name"],
    "bitmap-clear": ["export", "name"],
    "bitmap-list": ["export"],
    "checkpoint": ["export", "name", "since", "granularity", "limit"],
    "release": ["export", "name"],
    "status": ["export"],
    "help": [],
}
"""Every command and the arguments it takes (``help`` answers with this)."""


@dataclass
class ControlledExport:
    """One export as the control socket sees it: its ``name``, and ``bitmaps``, the filter that keeps its
    bitmaps and checkpoints (None: a read-only export, which keeps none)."""

    name: str
    bitmaps: DirtyBitmapFilter | None
    size: int = 0


def _bitmap(export: str, info: BitmapInfo) -> dict[str, Any]:
    return {
        "export": export,
        "name": info.name,
        "granularity": info.granularity,
        "dirty_bytes": info.dirty_bytes,
        "size": info.size,
        "context": info.context,
    }


class Controller:
    """The commands (module docstring) over ``exports``, adding views to ``table`` (None: views are not
    served). ``uri_for(export name)`` gives the URI a view is served at, for ``checkpoint``'s answer;
    ``default_limit`` what a view keeps aside at most when ``checkpoint`` gives no ``limit`` (None: its size)."""

    def __init__(
        self,
        exports: Sequence[ControlledExport],
        table: ExportTable | None = None,
        *,
        uri_for: Callable[[str], str] | None = None,
        default_limit: int | None = None,
    ) -> None:
        self._exports = {export.name: export for export in exports}
        self._default_limit = default_limit
        self._table = table
        self._uri_for = uri_for
        self._changing = threading.Lock()
        self._handlers: dict[str, Callable[[Arguments], Any]] = {
            "bitmap-add": self._bitmap_add,
            "bitmap-remove": self._bitmap_remove,
            "bitmap-clear": self._bitmap_clear,
            "bitmap-list": self._bitmap_list,
            "checkpoint": self._checkpoint,
            "release": self._release,
            "status": self._status,
            "help": self._help,
        }

    def handle_line(self, line: bytes | bytearray | memoryview) -> bytes:
        """The answer line to a request line (see ``_protocol``)."""
        try:
            request = parse_request(line)
        except ControlError as exc:
            return encode_answer(error_answer(exc.code, exc.message))
        return encode_answer(self.handle(request))

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The answer object to a request object (one ``parse_request`` gave). Never raises: an unexpected
        failure is logged with its traceback and answered ``internal``."""
        request_id = request.get("id")
        command = request.get("command")
        handler = self._handlers.get(command) if isinstance(command, str) else None
        try:
            if handler is None:
                raise ControlError("unknown-command", f"unknown command {command!r} (one of: {', '.join(COMMANDS)})")
            if command in ("bitmap-list", "status", "help"):
                return ok_answer(handler(Arguments(request)), request_id)
            with self._changing:
                answer = ok_answer(handler(Arguments(request)), request_id)
            log.info("control: %s %s", command, {k: v for k, v in request.items() if k not in ("command", "id")})
            return answer
        except ControlError as exc:
            return error_answer(exc.code, exc.message, request_id)
        except BitmapError as exc:
            return error_answer("bad-argument", str(exc), request_id)
        except TimeoutError as exc:
            return error_answer("timeout", str(exc) or "timed out", request_id)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            return error_answer("failed", f"{exc.strerror or exc}{where}", request_id)
        except Exception as exc:
            log.exception("control command %r failed", command)
            return error_answer("internal", f"internal error: {type(exc).__name__}: {exc}", request_id)

    # --- Finding what a command names -----------------------------------------------------------------------

    def _export(self, args: Arguments) -> ControlledExport:
        name = args.string("export")
        if name is None:
            if len(self._exports) != 1:
                raise ControlError("bad-argument", f"{args.command} needs 'export': one of {sorted(self._exports)}")
            return next(iter(self._exports.values()))
        export = self._exports.get(name)
        if export is None:
            raise ControlError("not-found", f"no export named {name!r} (the exports: {sorted(self._exports)})")
        return export

    def _filter(self, export: ControlledExport) -> DirtyBitmapFilter:
        if export.bitmaps is None:
            raise ControlError("refused", f"export {export.name!r} keeps no bitmaps (it is served read-only)")
        return export.bitmaps

    def _existing(self, export: ControlledExport, name: str) -> None:
        names = [info.name for info in self._filter(export).bitmap_list()]
        if name not in names:
            raise ControlError("not-found", f"no bitmap named {name!r} on export {export.name!r}")

    def _view_name(self, export: ControlledExport, name: str) -> str:
        return f"{export.name}@{name}"

    # --- The commands ---------------------------------------------------------------------------------------

    def _bitmap_add(self, args: Arguments) -> Any:
        export, name, granularity = self._export(args), args.name(), args.integer("granularity")
        args.done()
        tracked = self._filter(export)
        if name in [info.name for info in tracked.bitmap_list()]:
            raise ControlError("exists", f"bitmap {name!r} exists already on export {export.name!r}")
        return _bitmap(export.name, tracked.bitmap_add(name, check_granularity(granularity or 65536)))

    def _bitmap_remove(self, args: Arguments) -> Any:
        export, name = self._export(args), args.name()
        args.done()
        self._existing(export, name)
        self._filter(export).bitmap_remove(name)
        return {"export": export.name, "name": name}

    def _bitmap_clear(self, args: Arguments) -> Any:
        export, name = self._export(args), args.name()
        args.done()
        self._existing(export, name)
        return _bitmap(export.name, self._filter(export).bitmap_clear(name))

    def _bitmap_list(self, args: Arguments) -> Any:
        chosen = [self._export(args)] if args.has("export") else list(self._exports.values())
        args.done()
        return [
            _bitmap(export.name, info)
            for export in chosen
            if export.bitmaps is not None
            for info in export.bitmaps.bitmap_list()
        ]

    def _checkpoint(self, args: Arguments) -> Any:
        export, name = self._export(args), args.name()
        since, granularity, limit = args.string("since"), args.integer("granularity"), args.integer("limit")
        args.done()
        tracked = self._filter(export)
        if since is not None:
            self._existing(export, since)
        if name in [info.name for info in tracked.bitmap_list()]:
            raise ControlError("exists", f"bitmap {name!r} exists already on export {export.name!r}")
        if name in [view.name for view in tracked.views()]:
            raise ControlError("exists", f"checkpoint {name!r} has a view already on export {export.name!r}")
        served = self._view_name(export, name)
        if self._table is not None and served in self._table:
            raise ControlError("exists", f"an export named {served!r} exists already")
        limit = self._default_limit if limit is None else limit
        view = tracked.checkpoint(name, since, granularity=granularity, limit=limit)
        if self._table is not None:
            self._table.add(served, ExportSpec(view, f"{export.name} as of checkpoint {name}", read_only=True))
        return {
            "export": export.name,
            "name": name,
            "view": served if self._table is not None else None,
            "uri": self._uri_for(served) if self._uri_for is not None and self._table is not None else None,
            "since": since,
            "bitmap": _bitmap(export.name, tracked.bitmap_info(name)),
            "dirty_bytes": None if view.since is None else view.since.info().dirty_bytes,
        }

    def _release(self, args: Arguments) -> Any:
        export, name = self._export(args), args.name()
        args.done()
        tracked = self._filter(export)
        if name not in [view.name for view in tracked.views()]:
            raise ControlError("not-found", f"no checkpoint view named {name!r} on export {export.name!r}")
        if self._table is not None:
            self._table.remove(self._view_name(export, name))
        return self._view(export, tracked.release(name))

    def _view(self, export: ControlledExport, status: ViewStatus) -> dict[str, Any]:
        out = asdict(status)
        out["view"] = self._view_name(export, status.name)
        out["state"] = "active" if status.broken is None else "broken"
        return out

    def _status(self, args: Arguments) -> Any:
        chosen = [self._export(args)] if args.has("export") else list(self._exports.values())
        args.done()
        exports = []
        for export in chosen:
            tracked = export.bitmaps
            exports.append(
                {
                    "name": export.name,
                    "size": export.size if tracked is None else tracked.size,
                    "read_only": tracked is None,
                    "bitmaps": [] if tracked is None else [_bitmap(export.name, i) for i in tracked.bitmap_list()],
                    "views": [] if tracked is None else [self._view(export, v.status()) for v in tracked.views()],
                }
            )
        return {"version": PROTOCOL_VERSION, "exports": exports}

    def _help(self, args: Arguments) -> Any:
        args.done()
        return dict(COMMANDS)
