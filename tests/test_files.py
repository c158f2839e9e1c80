"""nbdproto.files, each helper on its own (the attacks through the command line: tests/test_hardening.py): new
files exclusive and with exactly their mode, existing ones used only when they pass the rule, whole files
replaced atomically, and unix sockets bound with their mode, exclusively, stale ones of ours replaced."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from nbdproto import files

pytestmark = pytest.mark.timeout(30)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_new_files_are_exclusive_and_have_exactly_their_mode(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        os.close(files.new_file(tmp_path / "pid", files.PID_FILE_MODE))
    finally:
        os.umask(old)
    assert mode(tmp_path / "pid") == 0o644  # the umask took nothing away
    with pytest.raises(FileExistsError):
        files.new_file(tmp_path / "pid")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    with pytest.raises(FileExistsError):
        files.new_file(tmp_path / "dangling")  # not created through a dangling symlink either
    assert not (tmp_path / "missing").exists()


def test_an_existing_file_is_used_only_when_it_passes_the_rule(tmp_path: Path) -> None:
    ours = tmp_path / "log"
    ours.write_text("old")
    ours.chmod(0o640)
    fd = files.writable_file(ours)
    os.write(fd, b"new")
    os.close(fd)
    assert ours.read_text() == "new" and mode(ours) == 0o640  # emptied first; its mode as its owner set it
    ours.chmod(0o666)
    with pytest.raises(files.UnsafeFileError) as raised:
        files.writable_file(ours)
    assert raised.value.errno == errno.EPERM and raised.value.filename == str(ours)
    assert "can be written by every user" in raised.value.strerror and files.RULE in raised.value.strerror
    os.symlink(ours, tmp_path / "link")
    with pytest.raises(files.UnsafeFileError) as raised:
        files.writable_file(tmp_path / "link")
    assert raised.value.errno == errno.ELOOP
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(files.UnsafeFileError, match="not a regular file"):
        files.writable_file(tmp_path / "fifo")  # never opened: a FIFO would block the server


def test_the_rule_names_each_reason() -> None:
    me, group = os.geteuid(), os.getegid()

    def status(kind: int, permissions: int, uid: int = me, gid: int = group) -> os.stat_result:
        return os.stat_result((kind | permissions, 1, 1, 1, uid, gid, 0, 0, 0, 0))

    assert files.refusal_of_existing(status(stat.S_IFREG, 0o644)) is None
    assert files.refusal_of_existing(status(stat.S_IFREG, 0o664)) is None  # writable by our own group
    assert "group" in str(files.refusal_of_existing(status(stat.S_IFREG, 0o664, gid=group + 1)))
    assert "another user" in str(files.refusal_of_existing(status(stat.S_IFREG, 0o600, uid=me + 1)))
    assert "every user" in str(files.refusal_of_existing(status(stat.S_IFREG, 0o602)))
    assert "symbolic link" in str(files.refusal_of_existing(status(stat.S_IFLNK, 0o777)))
    assert files.refusal_of_existing(status(stat.S_IFDIR, 0o700), directory=True) is None


def test_a_file_is_replaced_whole_with_its_mode_and_no_temporary_left(tmp_path: Path) -> None:
    target = tmp_path / "stats.txt"
    files.replace_file(target, b"first")
    files.replace_file(target, b"second", sync=True)
    assert target.read_bytes() == b"second" and mode(target) == 0o600
    assert os.listdir(tmp_path) == ["stats.txt"]
    target.unlink()
    os.symlink(tmp_path / "elsewhere", target)
    with pytest.raises(files.UnsafeFileError):
        files.replace_file(target, b"third")
    assert not (tmp_path / "elsewhere").exists()


def test_a_private_directory_is_made_or_checked(tmp_path: Path) -> None:
    fd = files.private_directory(tmp_path / "d")
    os.close(fd)
    assert mode(tmp_path / "d") == 0o700
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(files.UnsafeFileError, match="every user"):
        files.private_directory(tmp_path / "open")
    os.symlink(tmp_path / "d", tmp_path / "link")
    with pytest.raises(files.UnsafeFileError, match="symbolic link"):
        files.private_directory(tmp_path / "link")


def test_a_unix_socket_is_bound_with_its_mode_exclusively(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        files.bind_unix_socket(sock, path)
        sock.listen()
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and mode(path) == 0o600
        assert os.listdir(tmp_path) == ["control.sock"]  # the private directory it was made in is gone
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
        with socket.socket(socket.AF_UNIX) as other, pytest.raises(FileExistsError):
            files.bind_unix_socket(other, path, replace_stale=True)  # someone listens: not stale
    # The listener is gone, its file left: a stale socket of ours, replaced on request only.
    with socket.socket(socket.AF_UNIX) as sock:
        with pytest.raises(FileExistsError):
            files.bind_unix_socket(sock, path)
        files.bind_unix_socket(sock, path, replace_stale=True)  # (the refusal left it unbound)
        sock.listen()
    os.unlink(path)
    os.symlink(tmp_path / "elsewhere", path)
    with socket.socket(socket.AF_UNIX) as sock:
        with pytest.raises(files.UnsafeFileError):
            files.bind_unix_socket(sock, path, replace_stale=True)
        with pytest.raises(FileExistsError):
            files.bind_unix_socket(sock, path)
    assert not (tmp_path / "elsewhere").exists()


def test_a_unix_socket_path_too_long_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(OSError) as raised:
        files.bind_unix_socket(sock, deep / "control.sock")
    assert raised.value.errno == errno.ENAMETOOLONG and raised.value.filename == str(deep / "control.sock")
    assert os.listdir(deep) == []  # the private directory it tried is gone
