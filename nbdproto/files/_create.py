"""Files created safely: new ones exclusively, existing ones only when they pass the rule, whole ones replaced
atomically (see nbdproto/files/__init__.py for the rules and why).

The attacks this stops, each by one step: a symlink planted where the server will create a file (O_NOFOLLOW,
and O_EXCL, under which even a dangling symlink counts as existing); a file another user created first, so that
they can read or rewrite what the server puts in it (the owner and mode check); a guessable temporary name
(``mkstemp``'s random name, created exclusively, in the target's own directory so that the rename is atomic);
a device node or FIFO named as a log file (only regular files are opened, after an ``lstat``, with
O_NONBLOCK and O_NOCTTY in case one appears in between, and the descriptor's ``fstat`` compared with it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile

__all__ = [
    "DATA_MODE",
    "PID_FILE_MODE",
    "RULE",
    "UnsafeFileError",
    "refusal_of_existing",
    "new_file",
    "writable_file",
    "replace_file",
    "private_directory",
]

DATA_MODE = 0o600
"""The mode of every file holding data or what a server says about its clients (overlays, logs, stats)."""
PID_FILE_MODE = 0o644
"""The mode of a pid file: other programs (a service manager, a backup tool) read it."""
RULE = "an existing file is used only if it is a regular file that this server's user owns and no other user can write"
"""The rule for existing files, in the words every refusal ends with."""

_SYMLINK = "is a symbolic link"
_NEW = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EXISTING = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class UnsafeFileError(OSError):
    """A path the rules refuse: a symbolic link (errno ELOOP), not a regular file (or directory), another
    user's, or writable by other users (EPERM). ``strerror`` says which and states the rule, ``filename`` is the
    path."""


def refusal_of_existing(info: os.stat_result, *, directory: bool = False) -> str | None:
    """Why an existing file (``os.lstat`` or ``os.fstat`` of it) must not be used, or None when it may: it is a
    regular file (a directory, with ``directory``) that the server's effective user owns, and no other user can
    write to it (not world-writable, nor group-writable unless its group is the server's own)."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return _SYMLINK
    if directory and not stat.S_ISDIR(mode):
        return "is not a directory"
    if not directory and not stat.S_ISREG(mode):
        return "is not a regular file"
    if info.st_uid != os.geteuid():
        return f"belongs to another user (uid {info.st_uid})"
    if mode & stat.S_IWOTH:
        return "can be written by every user"
    if mode & stat.S_IWGRP and info.st_gid != os.getegid():
        return f"can be written by the users of group {info.st_gid}"
    return None


def _refuse(path: str | os.PathLike[str], reason: str) -> UnsafeFileError:
    code = errno.ELOOP if reason == _SYMLINK else errno.EPERM
    return UnsafeFileError(code, f"exists and {reason}: {RULE}", os.fspath(path))


def new_file(
    path: str | os.PathLike[str], mode: int = DATA_MODE, *, read: bool = False, dir_fd: int | None = None
) -> int:
    """A descriptor of a new file at ``path`` (relative to ``dir_fd`` if given), open for writing (and reading
    with ``read``), with exactly ``mode`` whatever the umask. FileExistsError when anything is there already,
    a symbolic link included."""
    fd = os.open(path, _NEW | (os.O_RDWR if read else os.O_WRONLY), mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away: the mode asked for is the mode meant
    except BaseException:
        os.close(fd)
        raise
    return fd


def writable_file(
    path: str | os.PathLike[str], mode: int = DATA_MODE, *, read: bool = False, truncate: bool = True
) -> int:
    """A descriptor of the file at ``path`` open for writing (and reading with ``read``): a new one with
    ``mode``, or the existing one if it passes the rule (then emptied with ``truncate``, its mode left as its
    owner set it). UnsafeFileError when the existing one does not pass; OSError as ``open`` raises it."""
    for _ in range(3):  # a file removed between our two looks is looked at again
        try:
            return new_file(path, mode, read=read)
        except FileExistsError:
            pass
        try:
            seen = os.lstat(path)
        except FileNotFoundError:
            continue
        reason = refusal_of_existing(seen)
        if reason is not None:
            raise _refuse(path, reason)
        try:
            fd = os.open(path, _EXISTING | (os.O_RDWR if read else os.O_WRONLY))
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a symlink since the lstat
                raise _refuse(path, _SYMLINK) from None
            raise
        try:
            info = os.fstat(fd)
            reason = refusal_of_existing(info)
            if reason is None and (info.st_dev, info.st_ino) != (seen.st_dev, seen.st_ino):
                reason = "was replaced while it was being opened"
            if reason is not None:
                raise _refuse(path, reason)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            if truncate:
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EAGAIN, "the file kept appearing and disappearing while it was being opened", os.fspath(path))


def replace_file(path: str | os.PathLike[str], data: bytes, mode: int = DATA_MODE, *, sync: bool = False) -> None:
    """Make ``data`` the whole content of the file at ``path``, atomically: written to a new file of a random
    name in the same directory (``mkstemp``: exclusive, no symlink followed), given ``mode``, then renamed over
    ``path`` (which never follows a symlink either). ``sync``: fsync the file and its directory first. An
    existing ``path`` must pass the rule (UnsafeFileError otherwise)."""
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    try:
        reason = refusal_of_existing(os.lstat(target))
    except FileNotFoundError:
        reason = None
    if reason is not None:
        raise _refuse(target, reason)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with open(fd, "wb", closefd=False) as file:
            os.fchmod(fd, mode)
            file.write(data)
            file.flush()
            if sync:
                os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if sync:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def private_directory(path: str | os.PathLike[str], mode: int = 0o700) -> int:
    """A descriptor (O_DIRECTORY) of the directory at ``path``: made with ``mode`` if missing, else one that
    passes the rule (ours, not writable by other users, not a symlink: UnsafeFileError otherwise). Files made
    relative to it (``new_file(name, dir_fd=...)``) are then out of other users' reach."""
    created = False
    try:
        os.mkdir(path, mode)
        created = True
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            info = os.lstat(path)
            raise _refuse(path, refusal_of_existing(info, directory=True) or "is not a directory") from None
        raise
    try:
        reason = refusal_of_existing(os.fstat(fd), directory=True)
        if reason is not None:
            raise _refuse(path, reason)
        if created:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd
