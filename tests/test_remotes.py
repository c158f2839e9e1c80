"""The tests' own helpers for servers in child processes (tests/remotes.py): the ports they are given."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys

from tests import remotes


def test_free_ports_are_below_the_kernels_range_and_not_given_twice() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        low = int(ranges.read().split()[0])
    ports = [remotes.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports) and all(1024 < port < low for port in ports)


def test_a_port_something_listens_on_is_passed_over() -> None:
    port = remotes.free_port()
    with socket.create_server(("127.0.0.1", port)):
        remotes._turn[0] = (port - remotes._first) % remotes._PORTS_PER_WORKER  # its turn again
        assert remotes.free_port() != port


def test_each_worker_has_a_block_of_its_own() -> None:
    code = "from tests import remotes; print(remotes._first)"
    firsts = set()
    for worker in ("gw0", "gw1", "gw2", "gw3"):
        env = {**os.environ, "PYTEST_XDIST_WORKER": worker}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        firsts.add(int(out.stdout))
    blocks = sorted(firsts)
    assert len(blocks) == 4 and all(b - a >= remotes._PORTS_PER_WORKER for a, b in itertools.pairwise(blocks))
