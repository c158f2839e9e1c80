"""The limits a server puts on its clients, in one place for both backends and the command line."""

from __future__ import annotations

from dataclasses import dataclass

from ._budget import DEFAULT_MEMORY_LIMIT

__all__ = ["ServerLimits", "DEFAULT_LIMITS", "DEFAULT_MAX_HANDSHAKES"]

DEFAULT_MAX_HANDSHAKES = 64
"""Connections in their handshake at once, by default: far more than clients that connect together need (a
handshake takes milliseconds), few enough that stalled ones cost a few MiB."""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """How long a server waits on a client, and how much it holds for it. A time of None (or 0) waits forever.

    - ``handshake_timeout``: the whole handshake, the TLS handshake included, must finish within this many
      seconds (qemu-nbd's default is 10).
    - ``request_timeout``: once part of a request has arrived (a header, some of a write's payload), the rest
      must keep coming: this many seconds without a byte of it ends the connection.
    - ``idle_timeout``: a connection with nothing in flight that sends nothing for this long is closed.
    - ``memory_limit``: the request and reply data all connections together may hold (nbdproto.serving.MemoryBudget).
    - ``max_requests``: requests one connection may have carried out at once where they run concurrently.
    - ``max_handshakes``: connections that may be in their handshake (TLS included) at once (0: no limit); a
      connection accepted beyond it is closed at once, before the greeting. Each stalled TLS handshake holds
      tens of KiB that the process does not give back after it ends: without a bound, 2,000 of them raise a
      server's memory several times over (bench/bench_stalled_handshakes.py). Clients that finished their
      handshake do not count (``ConnectionPolicy.max_connections`` bounds those).
    - ``shutdown_grace``: on shutdown, how long in-flight requests may take to finish (requests arriving
      meanwhile get ESHUTDOWN) before every connection is closed; a client that does not read is not waited for
      longer than this.
    """

    handshake_timeout: float | None = 10.0
    request_timeout: float | None = 30.0
    idle_timeout: float | None = None
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    max_requests: int = 64
    shutdown_grace: float = 3.0
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "request_timeout", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} {value} must not be negative")
        if self.memory_limit <= 0 or self.max_requests <= 0 or self.shutdown_grace < 0 or self.max_handshakes < 0:
            raise ValueError(
                "memory_limit and max_requests must be positive, shutdown_grace and max_handshakes not negative"
            )

    @staticmethod
    def seconds(value: float | None) -> float | None:
        """A limit as a wait: None for "forever" (None or 0)."""
        return value if value else None


DEFAULT_LIMITS = ServerLimits()
"""The limits a server has unless it is given others."""
