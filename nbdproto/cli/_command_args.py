"""A server command in place of a URI on the client commands' command lines, as nbdinfo and nbdcopy take one:

    nbdproto info -- [ nbdkit memory 1G ]
    nbdproto copy -- [ qemu-nbd -f qcow2 disk.qcow2 ] disk.raw
    nbdproto copy disk.img -- [ nbdkit memory 1G ]
    nbdproto list -- [ nbdproto serve --export a=memory:1M --export b=memory:2M ]
    nbdproto fuse /mnt -- [ qemu-nbd -f qcow2 disk.qcow2 ]

"[" and "]" are arguments of their own; what is between them is the command and its arguments, run with
socket activation on a private unix socket for as long as the command lasts (nbdproto.sockets.ActivatedServer:
the server must support it, as nbdkit, qemu-nbd and ``nbdproto serve`` do). A "--" just before "[" is optional
here (nbdinfo and nbdcopy need it so that the server's options are not taken for theirs); argparse never sees
the server's arguments: ``bracketed`` makes each bracketed command one argument before parsing, and
``starting_servers`` turns it into the URI of the started server when the command runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ._errors import UsageError

__all__ = ["CLIENT_COMMANDS", "bracketed", "starting_servers", "command_of", "was_started"]

CLIENT_COMMANDS = frozenset({"info", "list", "copy", "fuse"})
"""The commands whose URIs may be server commands."""


def bracketed(argv: Sequence[str]) -> list[str]:
    """``argv`` (the arguments after the program's name) with each ``[ CMD ARGS... ]`` of a client command made
    one argument that stands for the command (and a "--" just before it dropped), for argparse. A "[" without
    its "]", or "[ ]", is a UsageError."""
    argv = list(argv)
    if not argv or argv[0] not in CLIENT_COMMANDS:
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--" and i + 1 < len(argv) and argv[i + 1] == "[":
            i += 1
            continue
        if argv[i] != "[":
            out.append(argv[i])
            i += 1
            continue
        try:
            end = argv.index("]", i + 1)
        except ValueError:
            _usage(argv[0], "'[' without a matching ']': write a server command as -- [ CMD ARGS ... ]")
        command = argv[i + 1 : end]
        if not command:
            _usage(argv[0], "'[ ]' names no server command")
        out.append("[" + json.dumps(command) + "]")
        i = end + 1
    return out


def command_of(argument: Any) -> list[str] | None:
    """The server command an argument made by ``bracketed`` stands for, else None (a URI, a file)."""
    if not (isinstance(argument, str) and argument.startswith('[["') and argument.endswith('"]]')):
        return None
    try:
        command = json.loads(argument[1:-1])
    except ValueError:
        return None
    if isinstance(command, list) and command and all(isinstance(word, str) for word in command):
        return command
    return None


def starting_servers(*fields: str) -> Callable[[Callable[[Any], int]], Callable[[Any], int]]:
    """Decorates a client command's function: each of ``args.<field>`` that stands for a server command is
    replaced by the URI of that server, started for the length of the call and stopped after it. When the call
    fails because a server command exited by itself, the error says so."""

    def decorate(function: Callable[[Any], int]) -> Callable[[Any], int]:
        @functools.wraps(function)
        def run(args: Any) -> int:
            commands = {name: command for name in fields if (command := command_of(getattr(args, name, None)))}
            args.started = set(commands)
            if not commands:
                return function(args)
            from nbdproto.sockets import ActivatedServer  # only here: the client commands start without it

            with contextlib.ExitStack() as stack:
                servers = []
                for name, command in commands.items():
                    server = stack.enter_context(ActivatedServer(command))
                    servers.append(server)
                    setattr(args, name, str(server.target()))
                try:
                    return function(args)
                except Exception as exc:
                    for server in servers:
                        failure = server.explain(exc)
                        if failure is not exc:
                            raise failure from exc
                    raise

        return run

    return decorate


def was_started(args: Any, field: str) -> bool:
    """Whether ``args.<field>`` is the URI of a server ``starting_servers`` started (for the command's length
    only: a URI nobody can use afterwards)."""
    return field in getattr(args, "started", ())


def _usage(command: str, message: str) -> NoReturn:
    raise UsageError(message, f"nbdproto {command}")
