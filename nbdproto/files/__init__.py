"""nbdproto.files: every file a server creates (pid files, cow overlays, log and stats files, a mirror's new
secondary, dirty-bitmap sidecars, control sockets), created one way, safe in a directory other users can write
to (``/tmp``, a shared sticky directory) on a machine whose ``fs.protected_symlinks`` and
``fs.protected_regular`` are off, as containers often have them.

The rules, stated once (how each is kept: nbdproto/files/_create.py):

- A new file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never through a symlink someone planted, never
  into a file someone else made first) and an explicit mode: ``DATA_MODE`` (0600) for anything a client wrote
  or a server says about its clients, ``PID_FILE_MODE`` (0644) for pid files, which other programs read.
- A file that is replaced whole (a pid file, a stats report) is written to a new file of a random name in its
  own directory, then renamed over the old one: a reader never sees it half-written, and nothing at a guessable
  temporary name is ever opened.
- An existing file the server did not create is used only if it is a regular file that the server's user owns
  and no other user can write (``refusal_of_existing`` says why not otherwise).

What it offers: ``new_file`` (exclusive), ``writable_file`` (new, or an existing one that passes the rule),
``replace_file`` (atomic), ``private_directory``, ``bind_unix_socket`` (a unix socket at a path, with its mode
set before anyone can connect), and ``refusal_of_existing``. Nothing here knows NBD; the devices and the command
line use it.
"""

from __future__ import annotations

from ._create import (
    DATA_MODE,
    PID_FILE_MODE,
    RULE,
    UnsafeFileError,
    new_file,
    private_directory,
    refusal_of_existing,
    replace_file,
    writable_file,
)
from ._socket import bind_unix_socket

__all__ = [
    "DATA_MODE",
    "PID_FILE_MODE",
    "RULE",
    "UnsafeFileError",
    "new_file",
    "writable_file",
    "replace_file",
    "private_directory",
    "refusal_of_existing",
    "bind_unix_socket",
]
