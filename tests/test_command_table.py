"""The per-command rules (nbdproto.engine._commands) against the spec, command by command: the table itself, and
each rule of ``request_error`` (the one check both roles make of a request) with the error and the words it
gives, where it applies and where it does not.

SPEC_RULES restates proto.md ("Request types", "Command flags", "Error values", "Block size constraints") for
each command; it is written here from the spec, not read from the table it checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import nbdproto as n
from nbdproto.engine._commands import COMMANDS, RULE_OF, CommandRule, allowed_flags, request_error, usable

C, F, TF, E = n.Command, n.CommandFlags, n.TransmissionFlags, n.Errno
MIB = 1 << 20

# command: (its own flags, the transmission flag it needs advertised, writes, ranged, aligned to the minimum
# block size, may carry a payload, the error for a range past the end)
SPEC_RULES: dict[n.Command, tuple[int, int, bool, bool, bool, bool, n.Errno]] = {
    C.READ: (F.DF, 0, False, True, True, False, E.EINVAL),
    C.WRITE: (0, 0, True, True, True, True, E.ENOSPC),
    C.DISC: (0, 0, False, False, False, False, E.EINVAL),
    C.FLUSH: (0, TF.SEND_FLUSH, False, False, False, False, E.EINVAL),
    C.TRIM: (0, TF.SEND_TRIM, True, True, True, False, E.EINVAL),
    C.CACHE: (0, TF.SEND_CACHE, False, True, True, False, E.EINVAL),
    C.WRITE_ZEROES: (F.NO_HOLE | F.FAST_ZERO, TF.SEND_WRITE_ZEROES, True, True, True, False, E.ENOSPC),
    C.BLOCK_STATUS: (F.REQ_ONE, 0, False, True, False, True, E.EINVAL),
    C.RESIZE: (0, TF.SEND_RESIZE, True, False, False, False, E.EINVAL),
}
EVERYTHING = int(
    TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO
    | TF.SEND_CACHE | TF.SEND_RESIZE | TF.SEND_DF
)  # fmt: skip
SIZE = 16 * MIB


def check(command: n.Command, flags: int = 0, offset: int = 0, length: int = 4096, **kw: Any) -> Any:
    """request_error for ``command`` on an export that advertises everything, with every field fine unless
    ``kw`` says otherwise."""
    settings = dict(export_flags=EVERYTHING, size=SIZE, alignment=512, max_payload=MIB, has_contexts=True,
                    structured=True)  # fmt: skip
    settings.update(kw)
    return request_error(COMMANDS[command], flags, offset, length, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", list(C))
def test_the_table_says_what_the_spec_says(command: n.Command) -> None:
    rule = COMMANDS[command]
    flags, advertised, writes, ranged, aligned, payload, past_end = SPEC_RULES[command]
    assert (rule.command, rule.flags, rule.advertised) == (command, flags, advertised)
    assert (rule.writes, rule.ranged, rule.aligned, rule.payload, rule.past_end) == (
        writes, ranged, aligned, payload, past_end
    )  # fmt: skip
    assert RULE_OF[rule.request_type] is rule


def test_a_rule_cannot_change_once_made() -> None:
    rule = COMMANDS[C.READ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.writes = True  # type: ignore[misc]
    assert not hasattr(rule, "__dict__")  # slots: one of a few small objects read for every request
    bare = CommandRule(C.DISC, n.DisconnectRequest)
    assert (bare.flags, bare.advertised, bare.writes, bare.ranged, bare.aligned, bare.payload) == (
        0, 0, False, False, False, False
    )  # fmt: skip
    assert bare.past_end is E.EINVAL


@pytest.mark.parametrize("command", list(C))
def test_flags_each_command_may_carry(command: n.Command) -> None:
    own = SPEC_RULES[command][0]
    rule = COMMANDS[command]
    assert allowed_flags(rule, EVERYTHING) == own | F.FUA  # FUA on every command once SEND_FUA is advertised
    assert allowed_flags(rule, EVERYTHING & ~TF.SEND_FUA) == own
    for flag in F:
        refused = check(command, int(flag))
        if flag is F.PAYLOAD_LEN or not (own | F.FUA) & flag:
            assert refused == (E.EINVAL, f"flags {int(flag):#x} are not valid for {command.name}")
        else:
            assert refused is None or "flags" not in refused[1]


@pytest.mark.parametrize("command", list(C))
def test_usable_on_a_read_only_export_and_without_advertising(command: n.Command) -> None:
    _, advertised, writes, *_ = SPEC_RULES[command]
    rule = COMMANDS[command]
    assert usable(rule, EVERYTHING)
    assert usable(rule, EVERYTHING | TF.READ_ONLY) == (not writes)
    assert usable(rule, EVERYTHING & ~advertised) == (not advertised)
    assert usable(rule, int(TF.HAS_FLAGS)) == (not advertised)


@pytest.mark.parametrize("command", [c for c in C if SPEC_RULES[c][2]])
def test_a_write_on_a_read_only_export_is_eperm(command: n.Command) -> None:
    assert check(command, export_flags=EVERYTHING | TF.READ_ONLY) == (
        E.EPERM, f"{command.name} on a read-only export"
    )  # fmt: skip


@pytest.mark.parametrize("command", [c for c in C if not SPEC_RULES[c][2]])
def test_what_does_not_write_is_fine_on_a_read_only_export(command: n.Command) -> None:
    assert check(command, export_flags=EVERYTHING | TF.READ_ONLY) is None


@pytest.mark.parametrize("command", [c for c in C if SPEC_RULES[c][1]])
def test_a_command_not_advertised_is_einval(command: n.Command) -> None:
    flags = EVERYTHING & ~SPEC_RULES[command][1]
    assert check(command, export_flags=flags) == (E.EINVAL, f"{command.name} was not advertised for this export")


def test_a_flag_needs_what_it_depends_on() -> None:
    assert check(C.READ, F.DF, structured=False) == (E.EINVAL, "DF needs structured replies")
    assert check(C.READ, F.DF, export_flags=EVERYTHING & ~TF.SEND_DF) == (
        E.EINVAL,
        "DF was not advertised for this export",
    )
    assert check(C.READ, F.DF) is None
    without_fast_zero = EVERYTHING & ~TF.SEND_FAST_ZERO
    assert check(C.WRITE_ZEROES, F.FAST_ZERO, export_flags=without_fast_zero) == (
        E.EINVAL, "FAST_ZERO was not advertised for this export"
    )  # fmt: skip
    assert check(C.WRITE_ZEROES, F.FAST_ZERO | F.NO_HOLE) is None
    assert check(C.WRITE_ZEROES, F.NO_HOLE, export_flags=without_fast_zero) is None  # NO_HOLE needs nothing more
    assert check(C.BLOCK_STATUS, F.REQ_ONE, export_flags=int(TF.HAS_FLAGS)) is None


def test_block_status_needs_a_meta_context() -> None:
    assert check(C.BLOCK_STATUS, has_contexts=False) == (E.EINVAL, "no meta context was negotiated for block status")
    assert check(C.BLOCK_STATUS) is None
    assert check(C.READ, has_contexts=False) is None


@pytest.mark.parametrize("command", [c for c in C if SPEC_RULES[c][3]])
def test_a_ranged_command_needs_a_range_inside_the_export(command: n.Command) -> None:
    past_end, aligned = SPEC_RULES[command][6], SPEC_RULES[command][4]
    unit = 512 if aligned else 1
    assert check(command, length=0) == (E.EINVAL, f"{command.name} of length 0")
    assert check(command, length=-1) == (E.EINVAL, f"{command.name} of length -1")
    assert check(command, length=unit) is None
    assert check(command, offset=SIZE - unit, length=unit) is None
    assert check(command, offset=SIZE - unit, length=2 * unit) == (
        past_end, f"offset {SIZE - unit} + length {2 * unit} is past the export size {SIZE}"
    )  # fmt: skip
    assert check(command, offset=SIZE, length=unit)[0] == past_end
    assert check(command, offset=-unit, length=unit) == (
        past_end, f"offset {-unit} + length {unit} is past the export size {SIZE}"
    )  # fmt: skip
    assert check(command, offset=0, length=1, alignment=1) is None


@pytest.mark.parametrize("command", [c for c in C if not SPEC_RULES[c][3]])
def test_a_command_without_a_range_ignores_offset_and_length(command: n.Command) -> None:
    assert check(command, offset=SIZE * 2, length=0) is None
    assert check(command, offset=3, length=-1, alignment=4096) is None


@pytest.mark.parametrize("command", [c for c in C if SPEC_RULES[c][3]])
def test_alignment_binds_exactly_the_aligned_commands(command: n.Command) -> None:
    aligned = SPEC_RULES[command][4]
    for offset, length in ((1, 512), (512, 1), (512, 513)):
        expected = (E.EINVAL, f"offset {offset} / length {length} not aligned to 512 bytes") if aligned else None
        assert check(command, offset=offset, length=length) == expected
    assert check(command, offset=4096, length=8192, alignment=4096) is None


def test_a_read_longer_than_the_maximum_payload() -> None:
    assert check(C.READ, length=MIB) is None
    assert check(C.READ, length=MIB + 512) == (
        E.EOVERFLOW,
        f"read of {MIB + 512} bytes exceeds the maximum payload {MIB}",
    )
    assert check(C.READ, length=MIB + 512, structured=False) == (
        E.EINVAL, f"read of {MIB + 512} bytes exceeds the maximum payload {MIB}"
    )  # fmt: skip


def test_a_write_longer_than_the_maximum_payload_only_where_the_limit_binds_writes() -> None:
    """Spec "Size constraints": a client MUST NOT send more than the maximum payload; a server MAY take it."""
    assert check(C.WRITE, length=MIB + 512) is None
    assert check(C.WRITE, length=MIB, write_limit=True) is None
    assert check(C.WRITE, length=MIB + 512, write_limit=True) == (
        E.EINVAL, f"write of {MIB + 512} bytes exceeds the maximum payload {MIB}"
    )  # fmt: skip
    for other in (C.TRIM, C.WRITE_ZEROES, C.CACHE, C.BLOCK_STATUS):
        assert check(other, length=2 * MIB, write_limit=True) is None  # no payload of that length: no limit
