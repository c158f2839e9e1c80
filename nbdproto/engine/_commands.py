"""What the spec says of each command, stated once: the table the server's checks, its fast paths and the
client's checks all read (spec: "Request types", "Command flags", "Error values", "Block size constraints").

``COMMANDS`` maps each command to its ``CommandRule``; ``RULE_OF`` maps each request event type to the same
rule. ``request_error`` is the one check of a request against the export and the negotiated connection: the
server answers a request it fails with the error it names (the client never sees its request), and the client
refuses to send one (a LocalProtocolError with the same words).
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdproto.wire import Command, CommandFlags, Errno, TransmissionFlags

from ._events import Event
from ._transmission_events import (
    BlockStatusRequest,
    CacheRequest,
    DisconnectRequest,
    FlushRequest,
    ReadRequest,
    ResizeRequest,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

__all__ = [
    "FUA_BIT",
    "NO_HOLE_BIT",
    "DF_BIT",
    "REQ_ONE_BIT",
    "FAST_ZERO_BIT",
    "PAYLOAD_LEN_BIT",
    "CommandRule",
    "COMMANDS",
    "RULE_OF",
    "FLAG_NEEDS",
    "allowed_flags",
    "usable",
    "request_error",
]

FUA_BIT, NO_HOLE_BIT, DF_BIT, REQ_ONE_BIT, FAST_ZERO_BIT, PAYLOAD_LEN_BIT = (int(f) for f in CommandFlags)
"""The command flags as plain ints, for both roles' per-request checks: an IntFlag operation builds a new flag
object in Python, which these hot paths do not pay for."""
_FUA, _NO_HOLE, _DF, _REQ_ONE, _FAST_ZERO, _PAYLOAD_LEN = (
    FUA_BIT,
    NO_HOLE_BIT,
    DF_BIT,
    REQ_ONE_BIT,
    FAST_ZERO_BIT,
    PAYLOAD_LEN_BIT,
)
_TF = TransmissionFlags
_SEND_FUA, _READ_ONLY = int(_TF.SEND_FUA), int(_TF.READ_ONLY)  # ints: this module runs for every request


@dataclass(frozen=True, slots=True)
class CommandRule:
    """One command's rules.

    - ``flags``: the command flags it may carry of its own (FUA is allowed on every command once SEND_FUA is
      advertised, and PAYLOAD_LEN is the extended header's business; neither is listed here).
    - ``advertised``: the transmission flag the server must have advertised for it to be used (0: none).
    - ``writes``: it changes the export, so a read-only export refuses it with EPERM.
    - ``ranged``: its offset and length name a non-empty range inside the export; ``aligned`` when that range
      must also be a multiple of the minimum block size (block status only asks, so it need not be).
    - ``payload``: it may carry a payload (WRITE's data; BLOCK_STATUS's context list with extended headers).
    - ``past_end``: the error for a range past the export's end (spec "Error values": ENOSPC for writes).
    """

    command: Command
    request_type: type[Event]
    flags: int = 0
    advertised: int = 0
    writes: bool = False
    ranged: bool = False
    aligned: bool = False
    payload: bool = False
    past_end: Errno = Errno.EINVAL


COMMANDS: dict[int, CommandRule] = {
    rule.command: rule
    for rule in (
        CommandRule(Command.READ, ReadRequest, _DF, ranged=True, aligned=True),
        CommandRule(
            Command.WRITE, WriteRequest, writes=True, ranged=True, aligned=True, payload=True, past_end=Errno.ENOSPC
        ),
        CommandRule(Command.DISC, DisconnectRequest),
        CommandRule(Command.FLUSH, FlushRequest, advertised=int(_TF.SEND_FLUSH)),
        CommandRule(Command.TRIM, TrimRequest, advertised=int(_TF.SEND_TRIM), writes=True, ranged=True, aligned=True),
        CommandRule(Command.CACHE, CacheRequest, advertised=int(_TF.SEND_CACHE), ranged=True, aligned=True),
        CommandRule(
            Command.WRITE_ZEROES,
            WriteZeroesRequest,
            _NO_HOLE | _FAST_ZERO,
            int(_TF.SEND_WRITE_ZEROES),
            writes=True,
            ranged=True,
            aligned=True,
            past_end=Errno.ENOSPC,
        ),
        CommandRule(Command.BLOCK_STATUS, BlockStatusRequest, _REQ_ONE, ranged=True, payload=True),
        CommandRule(Command.RESIZE, ResizeRequest, advertised=int(_TF.SEND_RESIZE), writes=True),
    )
}

RULE_OF: dict[type[Event], CommandRule] = {rule.request_type: rule for rule in COMMANDS.values()}

FLAG_NEEDS = {_FUA: _SEND_FUA, _FAST_ZERO: int(_TF.SEND_FAST_ZERO), _DF: int(_TF.SEND_DF)}
"""The transmission flag each optional command flag needs advertised (DF is advertised only with structured
replies)."""


def allowed_flags(rule: CommandRule, export_flags: int) -> int:
    """The command flags ``rule``'s command may carry on an export with ``export_flags``."""
    return rule.flags | (_FUA if export_flags & _SEND_FUA else 0)


def usable(rule: CommandRule, export_flags: int) -> bool:
    """Whether the command may be used at all on an export with ``export_flags`` (advertised, and not a write
    on a read-only export)."""
    return not (rule.writes and export_flags & _READ_ONLY) and not (
        rule.advertised and not export_flags & rule.advertised
    )


def request_error(
    rule: CommandRule,
    flags: int,
    offset: int,
    length: int,
    *,
    export_flags: int,
    size: int,
    alignment: int,
    max_payload: int,
    has_contexts: bool,
    structured: bool,
    write_limit: bool = False,
) -> tuple[Errno, str] | None:
    """Why a request may not be made, as (the error a server answers, what was wrong), or None if it may.

    ``flags`` without PAYLOAD_LEN; ``alignment`` is the minimum block size that binds the request (1 where
    none does); ``has_contexts``: a meta context was agreed (block status needs one); ``write_limit``: a
    write's payload is held to ``max_payload`` as a read's is (a strict client's rule: spec "Size
    constraints" says a client MUST NOT send more, a server MAY still take it).
    """
    if flags & ~allowed_flags(rule, export_flags):
        return Errno.EINVAL, f"flags {flags:#x} are not valid for {rule.command.name}"
    if rule.writes and export_flags & _READ_ONLY:
        return Errno.EPERM, f"{rule.command.name} on a read-only export"
    if rule.advertised and not export_flags & rule.advertised:
        return Errno.EINVAL, f"{rule.command.name} was not advertised for this export"
    if flags:
        if flags & _DF and not structured:
            return Errno.EINVAL, "DF needs structured replies"
        for flag, needed in FLAG_NEEDS.items():
            if flags & flag and not export_flags & needed:
                return Errno.EINVAL, f"{CommandFlags(flag).name} was not advertised for this export"
    if rule.command is Command.BLOCK_STATUS and not has_contexts:
        return Errno.EINVAL, "no meta context was negotiated for block status"
    if rule.ranged:
        if length <= 0:
            return Errno.EINVAL, f"{rule.command.name} of length {length}"
        if offset < 0 or offset + length > size:
            return rule.past_end, f"offset {offset} + length {length} is past the export size {size}"
        if rule.aligned and (offset | length) % alignment:
            return Errno.EINVAL, f"offset {offset} / length {length} not aligned to {alignment} bytes"
        if rule.command is Command.READ and length > max_payload:
            error = Errno.EOVERFLOW if structured else Errno.EINVAL
            return error, f"read of {length} bytes exceeds the maximum payload {max_payload}"
        if write_limit and rule.command is Command.WRITE and length > max_payload:
            return Errno.EINVAL, f"write of {length} bytes exceeds the maximum payload {max_payload}"
    return None
