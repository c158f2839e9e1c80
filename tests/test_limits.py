"""ServerLimits alone (nbdproto.ServerLimits): its defaults, what it refuses, and how a limit reads as a wait.
The servers' keeping of each limit is in tests/test_server_limits.py and tests/test_hostile_clients.py."""

from __future__ import annotations

import dataclasses

import pytest

import nbdproto
from nbdproto.serving import DEFAULT_LIMITS, DEFAULT_MEMORY_LIMIT, ServerLimits


def test_the_defaults_are_the_documented_ones() -> None:
    limits = ServerLimits()
    assert limits.handshake_timeout == 10.0  # qemu-nbd's
    assert limits.request_timeout == 30.0
    assert limits.idle_timeout is None
    assert limits.memory_limit == DEFAULT_MEMORY_LIMIT
    assert limits.max_requests == 64
    assert limits.shutdown_grace == 3.0
    assert limits.max_handshakes == 64  # docs/howto/hardening.md, docs/reference/cli/serve.md
    assert limits == DEFAULT_LIMITS and nbdproto.ServerLimits is ServerLimits


def test_limits_cannot_change_once_made() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.idle_timeout = 5.0  # type: ignore[misc]
    assert not hasattr(DEFAULT_LIMITS, "__dict__")


@pytest.mark.parametrize("name", ["handshake_timeout", "request_timeout", "idle_timeout"])
def test_a_time_limit_may_be_none_or_zero_but_not_negative(name: str) -> None:
    for fine in (None, 0, 0.5, 3600):
        assert getattr(ServerLimits(**{name: fine}), name) == fine
    with pytest.raises(ValueError, match=f"^{name} -0.5 must not be negative$"):
        ServerLimits(**{name: -0.5})


@pytest.mark.parametrize(
    "wrong",
    [
        {"memory_limit": 0},
        {"memory_limit": -1},
        {"max_requests": 0},
        {"max_requests": -1},
        {"shutdown_grace": -0.1},
        {"max_handshakes": -1},
    ],
)
def test_sizes_must_be_positive_and_the_grace_not_negative(wrong: dict[str, float]) -> None:
    words = "memory_limit and max_requests must be positive, shutdown_grace and max_handshakes not negative"
    with pytest.raises(ValueError, match=f"^{words}$"):
        ServerLimits(**wrong)  # type: ignore[arg-type]


def test_the_smallest_allowed_values() -> None:
    limits = ServerLimits(memory_limit=1, max_requests=1, shutdown_grace=0, max_handshakes=0)  # 0: no limit
    assert (limits.memory_limit, limits.max_requests, limits.shutdown_grace, limits.max_handshakes) == (1, 1, 0, 0)


def test_a_limit_as_a_wait_none_and_zero_are_for_ever() -> None:
    assert DEFAULT_LIMITS.seconds(DEFAULT_LIMITS.idle_timeout) is None  # as the servers ask it, on an instance
    assert DEFAULT_LIMITS.seconds(DEFAULT_LIMITS.handshake_timeout) == 10.0
    assert ServerLimits.seconds(None) is None
    assert ServerLimits.seconds(0) is None
    assert ServerLimits.seconds(0.0) is None
    assert ServerLimits.seconds(2.5) == 2.5
    assert ServerLimits.seconds(1e-3) == 1e-3
