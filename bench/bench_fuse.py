"""Sequential reads of an export through FUSE against ``nbdproto copy`` to null:, side by side in one run.

    python bench/bench_fuse.py [--size 1G] [--rounds 3]

Serves a file of random data from tmpfs with ``nbdproto serve`` and, each round, times:

- ``nbdproto copy URI null:`` (the reference: the copy's own start-up included);
- ``dd if=MOUNT/disk of=/dev/null bs=1M`` through ``nbdproto fuse`` (mfusepy, the binding nbdproto uses);
- the same dd through a minimal read-only pyfuse3 file system over the anyio client on trio, when pyfuse3 is
  installed (``pip install pyfuse3``: it compiles against libfuse3-dev), the binding measured against it.

Prints each figure in MB/s, the FUSE/copy ratios, and the load average before and after (the machine is shared:
only ratios taken side by side mean anything). Needs root (or fusermount3) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

CLI = [sys.executable, "-m", "nbdproto"]


def parse_size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMG]?)", text.upper()).groups()  # type: ignore[union-attr]
    return int(number) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


@contextlib.contextmanager
def serving(path: str) -> Iterator[str]:
    proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--name", "disk", path], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def mounted(command: list[str], mountpoint: str) -> Iterator[None]:
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not mount {mountpoint}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            if os.path.ismount(mountpoint):
                subprocess.run(["umount", "-l", mountpoint], check=False)


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


PYFUSE3_FS = r"""
import errno, os, stat, sys
import pyfuse3, trio
import nbdproto_anyio as na

URI, MOUNT = sys.argv[1], sys.argv[2]

class ExportFile(pyfuse3.Operations):
    def __init__(self, client):
        super().__init__()
        self.client = client

    async def getattr(self, inode, ctx=None):
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode, entry.st_size = stat.S_IFDIR | 0o755, 0
        else:
            entry.st_mode, entry.st_size = stat.S_IFREG | 0o444, self.client.size
        return entry

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != b"disk":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"disk", await self.getattr(2), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        size = min(size, self.client.size - off)
        return await self.client.pread(size, off) if size > 0 else b""

async def main():
    async with await na.connect(URI) as client:
        options = set(pyfuse3.default_options)
        options.update({"fsname=pyfuse3-nbd", "ro"})  # max_read: pyfuse3 cannot set the matching conn.max_read
        pyfuse3.init(ExportFile(client), MOUNT, options)
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=16)
        finally:
            pyfuse3.close(unmount=True)

trio.run(main)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    try:
        import pyfuse3  # noqa: F401

        with_pyfuse3 = True
    except ImportError:
        with_pyfuse3 = False
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, tempfile.TemporaryDirectory() as mountpoint:
        image = os.path.join(shm, "disk.img")
        with open(image, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        script = os.path.join(shm, "pyfuse3_fs.py")
        with open(script, "w") as f:
            f.write(PYFUSE3_FS)
        with serving(image) as uri:
            dd = ["dd", f"if={mountpoint}/disk", "of=/dev/null", "bs=1M"]
            for round_ in range(1, args.rounds + 1):
                copy = timed([*CLI, "copy", "--no-progress", uri, "null:"])
                with mounted([*CLI, "fuse", "--read-only", uri, mountpoint], mountpoint):
                    mfusepy = timed(dd)
                line = (f"round {round_}: copy to null: {size / copy / 1e6:.0f} MB/s; "
                        f"fuse (mfusepy) dd: {size / mfusepy / 1e6:.0f} MB/s = {copy / mfusepy:.2f}x copy")  # fmt: skip
                if with_pyfuse3:
                    with mounted([sys.executable, script, uri, mountpoint], mountpoint):
                        pyfuse3_time = timed(dd)
                    line += f"; pyfuse3 dd: {size / pyfuse3_time / 1e6:.0f} MB/s = {copy / pyfuse3_time:.2f}x copy"
                print(line, flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
