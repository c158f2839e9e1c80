"""The server-wide memory budget alone (nbdproto.serving.MemoryBudget and its BudgetShares): the rules by hand,
in numbers, and any sequence of takes and gives by many connections against a model of the rules.

The rules (the module docstring of nbdproto/serving/_budget.py): a connection holding nothing may take a small
amount (``guaranteed``) at any time, anything from an idle server, or anything that fits in what is left; a
connection holding something may take more only while all connections together stay within the limit and it
stays within an equal share of the limit among the connections holding any (never less than ``guaranteed``).
tests/test_memory_fairness.py shows the same rules holding on real servers.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto.serving
from nbdproto.serving import DEFAULT_MEMORY_LIMIT, BudgetShare, MemoryBudget

MIB = 1 << 20


def test_the_default_limit_is_16_requests_of_the_largest_payload() -> None:
    assert DEFAULT_MEMORY_LIMIT == 16 * 32 * MIB == 512 * MIB
    assert MemoryBudget().limit == DEFAULT_MEMORY_LIMIT
    assert nbdproto.serving.ServerLimits().memory_limit == DEFAULT_MEMORY_LIMIT


def test_the_guaranteed_amount_is_1_mib_and_never_more_than_the_limit() -> None:
    assert MemoryBudget(8 * MIB).guaranteed == MIB
    assert MemoryBudget(8 * MIB, guaranteed=3).guaranteed == 3
    assert MemoryBudget(1000).guaranteed == 1000
    assert MemoryBudget(1).guaranteed == 1


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_must_be_positive(limit: int) -> None:
    with pytest.raises(ValueError) as refused:
        MemoryBudget(limit)
    assert str(refused.value) == f"memory limit {limit} must be positive"


def test_nothing_is_always_allowed_and_changes_nothing() -> None:
    budget = MemoryBudget(8 * MIB)
    first, other = budget.share(), budget.share()
    assert first.try_take(8 * MIB)
    for share in (first, other):
        assert share.try_take(0) and share.try_take(-5)
        share.give(0)
        share.give(-5)
    assert (budget.used, budget.holders, first.held, other.held) == (8 * MIB, 1, 8 * MIB, 0)


def test_the_server_wide_limit_holds_for_all_connections_together() -> None:
    """A holds the whole limit (it took it from an idle server); B may take its guaranteed 1 MiB beside it,
    and then nothing more, though its equal share (half the limit) is far from reached."""
    budget = MemoryBudget(8 * MIB)
    a, b = budget.share(), budget.share()
    assert a.try_take(8 * MIB)
    assert b.try_take(MIB)
    assert not b.try_take(1)
    assert (budget.used, budget.holders) == (9 * MIB, 2)
    a.give(MIB)  # 8 of 8 in use: still no room
    assert not b.try_take(1)
    a.give(MIB)
    assert b.try_take(MIB) and not b.try_take(1)
    assert (a.held, b.held, budget.used) == (6 * MIB, 2 * MIB, 8 * MIB)


def test_each_connection_holding_memory_is_held_to_an_equal_share() -> None:
    """A holds 3 MiB of 8; B may grow to half the limit (two hold memory) and not beyond, though the limit
    would allow it one more MiB; once A holds nothing, B may take the rest."""
    budget = MemoryBudget(8 * MIB)
    a, b = budget.share(), budget.share()
    assert a.try_take(3 * MIB)
    for _ in range(4):
        assert b.try_take(MIB)
    assert not b.try_take(MIB)
    assert (b.held, budget.used) == (4 * MIB, 7 * MIB)
    a.give_all()
    assert budget.holders == 1
    for _ in range(4):
        assert b.try_take(MIB)
    assert not b.try_take(1)
    assert (b.held, budget.used, budget.holders) == (8 * MIB, 8 * MIB, 1)


def test_the_equal_share_is_rounded_down_and_never_less_than_guaranteed() -> None:
    budget = MemoryBudget(10, guaranteed=2)
    shares = [budget.share() for _ in range(4)]
    for share in shares[:3]:
        assert share.try_take(1)
    assert shares[0].try_take(2)  # holds 3 = 10 // 3
    assert not shares[0].try_take(1)
    assert shares[3].try_take(2)  # a fourth: holders 4, the share 10 // 4 = 2
    assert not shares[1].try_take(2) and shares[1].try_take(1)  # held 2 of a share of 2
    many = MemoryBudget(100, guaranteed=20)
    holders = [many.share() for _ in range(10)]
    for share in holders:
        assert share.try_take(1)
    assert holders[0].try_take(19)  # an equal share would be 10: guaranteed (20) is the floor
    assert not holders[0].try_take(1)


def test_a_newcomer_takes_what_fits_or_its_guaranteed_amount() -> None:
    budget = MemoryBudget(8 * MIB)
    a, b, c, d = (budget.share() for _ in range(4))
    assert a.try_take(5 * MIB)
    assert b.try_take(3 * MIB)  # more than guaranteed, and it fits: 8 of 8
    assert not c.try_take(MIB + 1)  # more than guaranteed, and it does not fit
    assert c.try_take(MIB)  # the guaranteed amount always
    assert (budget.used, budget.holders) == (9 * MIB, 3)
    a.give_all()
    b.give_all()
    c.give_all()
    assert (budget.used, budget.holders) == (0, 0)
    assert d.try_take(64 * MIB)  # anything from an idle server


def test_giving_back_part_keeps_a_holder_and_all_of_it_ends_one() -> None:
    budget = MemoryBudget(8 * MIB)
    a = budget.share()
    assert a.try_take(3 * MIB)
    a.give(MIB)
    assert (a.held, budget.used, budget.holders) == (2 * MIB, 2 * MIB, 1)
    a.give(2 * MIB)
    assert (a.held, budget.used, budget.holders) == (0, 0, 0)
    assert a.try_take(MIB)
    a.give_all()
    a.give_all()  # nothing held: nothing happens
    assert (a.held, budget.used, budget.holders) == (0, 0, 0)


def test_a_share_of_the_largest_limits_is_counted_exactly() -> None:
    """Integers all the way: a limit past 2^53 (where a float loses bytes) is still kept to the byte."""
    limit = (1 << 60) + 1
    budget = MemoryBudget(limit)
    share = budget.share()
    assert share.try_take(1)
    assert share.try_take(1 << 60)  # held + amount == limit: exactly the (whole) share
    assert not share.try_take(1)


def test_a_write_s_cost_is_its_data_or_the_chunk_that_holds_it() -> None:
    """A view into received bytes keeps the whole chunk alive; a view into anything else (a mapping of the
    device, for a write received in place) costs its own length."""
    import mmap

    from nbdproto.engine import WriteRequest
    from nbdproto.serving import request_cost

    mapped = mmap.mmap(-1, 8192)
    try:
        assert request_cost(WriteRequest(1, 0, memoryview(mapped)[:4096])) == 4096
        assert request_cost(WriteRequest(1, 0, memoryview(mapped)[:0])) == 0
    finally:
        mapped.close()
    assert request_cost(WriteRequest(1, 0, memoryview(bytearray(100))[:10])) == 100


class Model:
    """The rules, stated over the amounts each connection holds."""

    def __init__(self, limit: int, guaranteed: int, connections: int) -> None:
        self.limit, self.guaranteed = limit, min(guaranteed, limit)
        self.held = [0] * connections

    def take(self, who: int, amount: int) -> bool:
        if amount <= 0:
            return True
        used, holders = sum(self.held), sum(1 for h in self.held if h)
        if self.held[who] == 0:
            allowed = amount <= self.guaranteed or used == 0 or used + amount <= self.limit
        else:
            share = max(self.guaranteed, self.limit // holders)
            allowed = used + amount <= self.limit and self.held[who] + amount <= share
        if allowed:
            self.held[who] += amount
        return allowed


operations = st.lists(
    st.tuples(st.sampled_from(["take", "give", "give_all"]), st.integers(0, 4), st.integers(-2, 40)), max_size=60
)


@settings(max_examples=400, deadline=None)
@given(limit=st.integers(1, 64), guaranteed=st.integers(1, 16), steps=operations)
def test_any_takes_and_gives_follow_the_model(limit: int, guaranteed: int, steps: list[tuple[str, int, int]]) -> None:
    """Five connections taking and giving back in any order: every take is allowed exactly when the model
    allows it, and the budget's counts (used, holders, each held) are the model's after every step."""
    budget = MemoryBudget(limit, guaranteed=guaranteed)
    shares: list[BudgetShare] = [budget.share() for _ in range(5)]
    model = Model(limit, guaranteed, 5)
    for operation, who, amount in steps:
        if operation == "take":
            assert shares[who].try_take(amount) == model.take(who, amount), (operation, who, amount)
        elif operation == "give":
            amount = min(amount, model.held[who])  # a connection gives back only what it took
            shares[who].give(amount)
            model.held[who] -= max(amount, 0)
        else:
            shares[who].give_all()
            model.held[who] = 0
        assert [s.held for s in shares] == model.held
        assert budget.used == sum(model.held)
        assert budget.holders == sum(1 for h in model.held if h)


def test_settle_has_every_share_give_back_what_it_holds_until_wanted_and_says_whether_memory_came_back() -> None:
    budget = MemoryBudget(8 << 20)
    keeping, other = budget.share(), budget.share()
    assert keeping.try_take(4 << 20)
    calls: list[str] = []
    keeping.settle_with(lambda: calls.append("nothing"))
    assert budget.settle() is False and calls == ["nothing"]  # called, but nothing came back

    def give_some() -> None:
        calls.append("gave")
        keeping.give(1 << 20)

    keeping.settle_with(give_some)  # replaces the first
    other.settle_with(lambda: calls.append("other"))
    assert budget.settle() is True and sorted(calls[1:]) == ["gave", "other"] and budget.used == 3 << 20
    keeping.settle_with(None)
    other.settle_with(None)
    assert not budget.settlers and budget.settle() is False
