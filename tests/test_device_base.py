"""A device advertises what it implements, never more (issue 29, item 6).

A device written to the ``BlockDevice`` protocol by hand, with ``DeviceCapabilities()``'s defaults (which offer
base:allocation, FLUSH and FUA) and no ``extents``, ``flush`` or ``trim``: the servers advertise only what it
has methods for (``nbdproto.serving.capabilities_of``), so nbdinfo --map, nbdcopy and every request a client may send
succeed, and no AttributeError reaches the log. A 20-line subclass of ``nbdproto.devices.DeviceBase`` is right
by construction: nbdinfo --map and nbdcopy (both ways) work against it, with both backends, and what it
advertises follows from the methods it defines.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest

import nbdproto
import nbdproto.serving
from nbdproto import DeviceCapabilities
from nbdproto.devices import DelayFilter, DeviceBase
from nbdproto.serving import capabilities_of
from tests.conftest import PEER_ENV
from tests.serving import Export, serve_exports

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


class BareDevice:
    """The protocol by hand, as the issue found it: no extents, flush, trim, write_zeroes or cache, and the
    default capabilities."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def capabilities(self) -> DeviceCapabilities:
        return DeviceCapabilities()

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        buffer[:] = self.data[offset : offset + len(buffer)]

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        self.data[offset : offset + len(data)] = data

    def close(self) -> None:
        pass


# The 20 lines a device author writes: a RAM disk whose every write is kept (nothing to flush).
class RamDisk(DeviceBase):
    durable = True  # in memory: once pwrite returns there is nothing more to make durable
    multi_conn = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.data = bytearray(size)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        buffer[:] = self.data[offset : offset + len(buffer)]

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        self.data[offset : offset + len(data)] = data


class ReadOnlyPattern(DeviceBase):
    def pread_into(self, buffer: memoryview, offset: int) -> None:
        buffer[:] = bytes((offset + i) % 251 for i in range(len(buffer)))


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60, env=PEER_ENV)


def test_capabilities_of_leaves_out_what_the_device_has_no_method_for() -> None:
    caps = capabilities_of(BareDevice(MIB))
    assert (caps.can_write, caps.can_flush, caps.can_fua, caps.meta_contexts) == (True, False, False, ())
    assert not (caps.can_trim or caps.can_zero or caps.can_fast_zero or caps.can_cache or caps.can_resize)
    assert capabilities_of(nbdproto.devices.MemoryDevice(MIB)) == nbdproto.devices.MemoryDevice(MIB).capabilities
    # A filter over such a device is built, and says no more than the device below it.
    assert DelayFilter(BareDevice(MIB)).capabilities == caps


def test_device_base_capabilities_follow_its_methods() -> None:
    ram = RamDisk(MIB).capabilities
    assert (ram.can_write, ram.can_flush, ram.can_fua, ram.can_zero, ram.can_fast_zero) == (True, True, True, True,
                                                                                             False)  # fmt: skip
    assert (ram.can_trim, ram.can_cache, ram.can_multi_conn, ram.meta_contexts) == (False, False, True,
                                                                                     ("base:allocation",))  # fmt: skip
    pattern = ReadOnlyPattern(MIB).capabilities
    assert (pattern.can_write, pattern.can_flush, pattern.can_fua, pattern.can_zero) == (False, False, False, False)
    with pytest.raises(TypeError):
        DeviceBase(MIB)  # type: ignore[abstract]  # pread_into is the one thing every device must define
    disk = RamDisk(3 * MIB)
    disk.pwrite(b"x" * (3 * MIB), 0)
    disk.write_zeroes(1, 2 * MIB + 5)  # emulated with pwrite
    assert disk.data == b"x" + bytes(2 * MIB + 5) + b"x" * (MIB - 6)
    with pytest.raises(OSError):
        disk.write_zeroes(0, 10, fast=True)
    assert disk.extents("base:allocation", 0, 3 * MIB) == [(3 * MIB, 0)]


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_a_bare_device_is_served_without_promising_what_it_lacks(
    backend: str, peers: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peers("nbdinfo", "nbdcopy", "nbdsh")
    caplog.set_level(logging.DEBUG)
    device = BareDevice(4 * MIB)
    device.data[MIB : MIB + 5] = b"hello"
    with serve_exports(backend, {"": Export(device)}) as base:
        uri = base.format("")
        info = nbdinfo("--json", uri)
        assert info.returncode == 0, info.stderr
        export = json.loads(info.stdout)["exports"][0]
        assert export.get("contexts", []) == []
        assert (export["can_flush"], export["can_fua"], export["can_trim"], export["can_zero"]) == (False,) * 4
        # nbdinfo --map without base:allocation: one line saying so (what nbdkit's plugins without extents
        # avoid by emulating it; DeviceBase does the same, below), never an EIO from the server.
        mapped = nbdinfo("--map", uri)
        assert mapped.returncode == 1 and "does not support metadata context" in mapped.stderr, mapped.stderr
        copied = subprocess.run(["nbdcopy", uri, str(tmp_path / "copy.img")], capture_output=True, text=True,
                                timeout=60, env=PEER_ENV)  # fmt: skip
        assert copied.returncode == 0, copied.stderr
        assert (tmp_path / "copy.img").read_bytes() == bytes(device.data)
        written = subprocess.run(["nbdcopy", str(tmp_path / "copy.img"), uri], capture_output=True, text=True,
                                 timeout=60, env=PEER_ENV)  # fmt: skip
        assert written.returncode == 0, written.stderr
    assert not [r for r in caplog.records if "AttributeError" in r.getMessage() or r.exc_info], caplog.text


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_a_twenty_line_device_works_with_nbdinfo_map_and_nbdcopy(backend: str, peers: Any, tmp_path: Path) -> None:
    peers("nbdinfo", "nbdcopy")
    source = tmp_path / "source.img"
    source.write_bytes(bytes(range(256)) * (4 * MIB // 256))
    disk = RamDisk(4 * MIB)
    with serve_exports(backend, {"": Export(disk), "pattern": Export(ReadOnlyPattern(MIB), read_only=True)}) as base:
        uri = base.format("")
        copied = subprocess.run(["nbdcopy", str(source), uri], capture_output=True, text=True, timeout=60,
                                env=PEER_ENV)  # fmt: skip
        assert copied.returncode == 0, copied.stderr
        assert disk.data == source.read_bytes()
        mapped = nbdinfo("--map", "--json", uri)
        assert mapped.returncode == 0, mapped.stderr
        assert json.loads(mapped.stdout) == [{"offset": 0, "length": 4 * MIB, "type": 0, "description": "data"}]
        back = tmp_path / "back.img"
        read = subprocess.run(["nbdcopy", base.format("pattern"), str(back)], capture_output=True, text=True,
                              timeout=60, env=PEER_ENV)  # fmt: skip
        assert read.returncode == 0, read.stderr
        assert back.read_bytes() == bytes(i % 251 for i in range(MIB))
        info = json.loads(nbdinfo("--json", uri).stdout)["exports"][0]
        assert (info["can_flush"], info["can_fua"], info["can_zero"], info["can_trim"]) == (True, True, True, False)
        assert info["contexts"] == ["base:allocation"]
