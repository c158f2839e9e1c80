"""The control socket (nbdproto.control): the lines and commands without I/O, every way a request can be wrong
(an error answer, never a dropped connection or a traceback), the socket's file made without following or
replacing anything, and the server thread against clients that send huge lines, stall, or come too many."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nbdproto.control import (
    COMMANDS,
    ERROR_CODES,
    MAX_LINE,
    ControlError,
    ControlledExport,
    Controller,
    ControlServer,
    control_exchange,
    control_request,
    listen_control,
    parse_request,
)
from nbdproto.devices import MemoryDevice
from nbdproto.devices.bitmaps import DirtyBitmapFilter
from nbdproto.serving import ExportSpec, ExportTable
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)
KIB, MIB = 1 << 10, 1 << 20


def controller(*names: str) -> tuple[Controller, ExportTable, dict[str, DirtyBitmapFilter]]:
    filters = {name: DirtyBitmapFilter(MemoryDevice(4 * MIB)) for name in names or ("disk",)}
    table = ExportTable({name: ExportSpec(device, read_only=False) for name, device in filters.items()})
    exports = [ControlledExport(name, device, device.size) for name, device in filters.items()]
    return Controller(exports, table, uri_for=lambda name: f"nbd://host/{name}"), table, filters


def ask(control: Controller, **request: Any) -> dict[str, Any]:
    answer = json.loads(control.handle_line(json.dumps(request).encode()))
    assert isinstance(answer, dict)
    return answer


def error_of(answer: dict[str, Any]) -> str:
    assert answer["ok"] is False, answer
    code = answer["error"]["code"]
    assert code in ERROR_CODES and answer["error"]["message"] and "\n" not in answer["error"]["message"]
    return str(code)


# --- Lines ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json", "bad-json"),
        (b"\xff\xfe{}", "bad-json"),
        (b'{"command": NaN}', "bad-json"),
        (b"[" * 100_000, "too-long"),
        (b"[" * 50_000 + b"]" * 10, "bad-json"),
        (b"[1, 2]", "bad-request"),
        (b'"checkpoint"', "bad-request"),
        (b"{}", "bad-request"),
        (b'{"command": 7}', "bad-request"),
    ],
)
def test_lines_that_are_no_request_are_error_answers(line: bytes, code: str) -> None:
    with pytest.raises(ControlError) as raised:
        parse_request(line)
    assert raised.value.code == code
    control, _, _ = controller()
    answer = json.loads(control.handle_line(line))
    assert error_of(answer) == code


# --- Commands ---------------------------------------------------------------------------------------------------


def test_every_command_does_what_it_says_and_echoes_the_id() -> None:
    control, table, filters = controller()
    tracked = filters["disk"]
    added = ask(control, command="bitmap-add", name="a", granularity=4096, id=1)
    assert added == {"ok": True, "id": 1, "result": {"export": "disk", "name": "a", "granularity": 4096,
                     "dirty_bytes": 0, "size": 4 * MIB, "context": "qemu:dirty-bitmap:a"}}  # fmt: skip
    tracked.pwrite(b"x" * 5000, 0)
    assert [b["dirty_bytes"] for b in ask(control, command="bitmap-list")["result"]] == [8192]
    made = ask(control, command="checkpoint", name="b", since="a", id="x")
    assert made["id"] == "x"
    result = made["result"]
    assert (result["view"], result["uri"], result["since"], result["dirty_bytes"]) == (
        "disk@b", "nbd://host/disk@b", "a", 8192)  # fmt: skip
    assert result["bitmap"]["granularity"] == 4096  # that of the bitmap it follows
    view = table.get("disk@b")
    assert view is not None and view.read_only and view.device is tracked.view("b")
    assert [item.name for item in table.offer] == ["disk", "disk@b"]
    status = ask(control, command="status")["result"]
    assert status["version"] == 1
    (export,) = status["exports"]
    assert [b["name"] for b in export["bitmaps"]] == ["a", "b"]
    assert export["views"][0]["view"] == "disk@b" and export["views"][0]["state"] == "active"
    assert ask(control, command="bitmap-clear", name="a")["result"]["dirty_bytes"] == 0
    released = ask(control, command="release", name="b")["result"]
    assert released["name"] == "b" and "disk@b" not in table
    assert ask(control, command="bitmap-remove", name="a")["result"] == {"export": "disk", "name": "a"}
    assert set(ask(control, command="help")["result"]) == set(COMMANDS)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"command": "format-disk"}, "unknown-command"),
        ({"command": "bitmap-add"}, "bad-argument"),
        ({"command": "bitmap-add", "name": 7}, "bad-argument"),
        ({"command": "bitmap-add", "name": "../../etc/passwd"}, "bad-argument"),
        ({"command": "bitmap-add", "name": "x" * 5000}, "bad-argument"),
        ({"command": "bitmap-add", "name": "ok", "granularity": 1000}, "bad-argument"),
        ({"command": "bitmap-add", "name": "ok", "granularity": "64K"}, "bad-argument"),
        ({"command": "bitmap-add", "name": "ok", "granularity": True}, "bad-argument"),
        ({"command": "bitmap-add", "name": "ok", "colour": "blue"}, "bad-argument"),
        ({"command": "bitmap-add", "name": "a"}, "exists"),
        ({"command": "bitmap-remove", "name": "nope"}, "not-found"),
        ({"command": "bitmap-clear", "name": "nope"}, "not-found"),
        ({"command": "checkpoint", "name": "c", "since": "nope"}, "not-found"),
        ({"command": "checkpoint", "name": "a"}, "exists"),
        ({"command": "checkpoint", "name": "c", "limit": -1}, "bad-argument"),
        ({"command": "release", "name": "a"}, "not-found"),
        ({"command": "status", "export": "other"}, "not-found"),
        ({"command": "status", "export": ["disk"]}, "bad-argument"),
        ({"command": "help", "verbose": True}, "bad-argument"),
    ],
)
def test_bad_requests_get_error_answers_and_change_nothing(request_: dict[str, Any], code: str) -> None:
    control, table, filters = controller()
    ask(control, command="bitmap-add", name="a")
    assert error_of(ask(control, **request_)) == code
    assert [info.name for info in filters["disk"].bitmap_list()] == ["a"]
    assert list(table) == ["disk"] and filters["disk"].views() == []


def test_several_exports_need_the_export_named_and_a_read_only_one_keeps_no_bitmaps() -> None:
    control, _, filters = controller("one", "two")
    assert "needs 'export'" in ask(control, command="bitmap-add", name="a")["error"]["message"]
    assert ask(control, command="bitmap-add", name="a", export="two")["ok"]
    assert [info.name for info in filters["two"].bitmap_list()] == ["a"] and filters["one"].bitmap_list() == []
    assert len(ask(control, command="status")["result"]["exports"]) == 2
    plain = Controller([ControlledExport("ro", None, MIB)])
    assert error_of(ask(plain, command="bitmap-add", name="a")) == "refused"
    assert ask(plain, command="status")["result"]["exports"][0]["read_only"] is True


def test_an_unexpected_failure_is_an_internal_answer_with_its_traceback_logged(caplog: Any) -> None:
    class Broken(DirtyBitmapFilter):
        def bitmap_list(self) -> Any:
            raise RuntimeError("a bug")

    control = Controller([ControlledExport("disk", Broken(MemoryDevice(MIB)))])
    with caplog.at_level(logging.ERROR, logger="nbdproto.control"):
        answer = ask(control, command="bitmap-add", name="a")
    assert error_of(answer) == "internal" and "a bug" in answer["error"]["message"]
    assert any(record.exc_info for record in caplog.records)


def test_a_view_name_taken_by_an_export_is_refused() -> None:
    control, table, _ = controller()
    table.add("disk@cp", ExportSpec(MemoryDevice(MIB)))
    assert error_of(ask(control, command="checkpoint", name="cp")) == "exists"
    assert "cp" not in [info.name for info in control._exports["disk"].bitmaps.bitmap_list()]  # type: ignore[union-attr]


# --- The socket's file ---------------------------------------------------------------------------------------------


def test_the_socket_is_mode_0600_and_removed_only_while_it_is_ours(tmp_path: Any) -> None:
    path = str(tmp_path / "ctl")
    listening = listen_control(path)
    info = os.stat(path, follow_symlinks=False)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert os.listdir(tmp_path) == ["ctl"]  # the private directory it was made in is gone
    listening.close()
    assert not os.path.lexists(path)
    listening = listen_control(path)
    os.unlink(path)
    with open(path, "w") as other:  # someone else's file at the path now
        other.write("theirs")
    listening.close()
    with open(path) as theirs:
        assert theirs.read() == "theirs"


@pytest.mark.parametrize("what", ["file", "symlink", "dangling"])
def test_nothing_at_the_path_is_followed_or_replaced(tmp_path: Any, what: str) -> None:
    path, target = tmp_path / "ctl", tmp_path / "target"
    if what == "file":
        path.write_text("keep me")
    else:
        if what == "symlink":
            target.write_text("keep me")
        os.symlink(target, path)
    with pytest.raises(FileExistsError):
        listen_control(str(path))
    if what == "file":
        assert path.read_text() == "keep me"
    else:
        assert os.readlink(path) == str(target)
        assert (what == "dangling") is not target.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["ctl", *(["target"] if what == "symlink" else [])])


# --- The server ---------------------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Any) -> Iterator[tuple[ControlServer, dict[str, DirtyBitmapFilter]]]:
    control, _, filters = controller()
    server = ControlServer(
        listen_control(str(tmp_path / "ctl")), control, line_timeout=0.5, idle_timeout=1.0, max_clients=3
    )
    with server:
        yield server, filters


def connect(server: ControlServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(server.path)
    return sock


def lines(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    received = b""
    while received.count(b"\n") < count:
        data = sock.recv(65536)
        assert data, f"closed after {received!r}"
        received += data
    return [json.loads(line) for line in received.splitlines()]


def closed(sock: socket.socket) -> bytes:
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


def test_requests_in_one_send_are_answered_in_order_and_the_connection_goes_on(served: Any) -> None:
    server, _ = served
    with connect(server) as sock:
        sock.sendall(b'{"command":"bitmap-add","name":"a","id":1}\n\r\nrubbish\n{"command":"nope","id":3}\r\n')
        first, second, third = lines(sock, 3)
        assert first["ok"] and first["id"] == 1
        assert second["error"]["code"] == "bad-json" and third["error"]["code"] == "unknown-command"
        assert third["id"] == 3
        sock.sendall(b'{"command":"bitmap-list"}\n')
        assert lines(sock, 1)[0]["result"][0]["name"] == "a"
    assert control_request(server.path, {"command": "bitmap-list"})[0]["name"] == "a"
    with pytest.raises(ControlError) as raised:
        control_request(server.path, {"command": "release", "name": "a"})
    assert raised.value.code == "not-found"


def test_a_huge_line_is_refused_and_closed_and_the_server_serves_on(served: Any) -> None:
    server, _ = served
    with connect(server) as sock:
        with contextlib.suppress(OSError):  # the server may close before all of it is sent: that is the point
            sock.sendall(b"x" * (MAX_LINE * 4))
        answer = json.loads(closed(sock).splitlines()[0])
        assert answer["error"]["code"] == "too-long"
    assert control_request(server.path, {"command": "status"})["version"] == 1


def test_a_huge_line_sent_whole_gets_its_answer_before_the_close(served: Any) -> None:
    server, _ = served
    with connect(server) as sock:
        sock.sendall(b"y" * (MAX_LINE + 10))
        answer = json.loads(closed(sock).splitlines()[0])
        assert answer["error"]["code"] == "too-long"


def test_clients_that_stall_are_closed_and_others_are_served_meanwhile(served: Any, caplog: Any) -> None:
    server, _ = served
    with caplog.at_level(logging.DEBUG, logger="nbdproto.control"):
        idle, partial = connect(server), connect(server)
        partial.sendall(b'{"command": "sta')
        started = time.monotonic()
        assert control_request(server.path, {"command": "status"})["version"] == 1  # while two stall
        partly = json.loads(closed(partial).splitlines()[0])
        assert partly["error"]["code"] == "too-slow" and "did not arrive within 0.5 s" in partly["error"]["message"]
        silent = json.loads(closed(idle).splitlines()[0])
        assert silent["error"]["code"] == "too-slow" and "nothing was asked for 1 s" in silent["error"]["message"]
        assert time.monotonic() - started < 15
        idle.close()
        partial.close()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_one_client_too_many_is_told_busy(served: Any) -> None:
    server, _ = served
    held = [connect(server) for _ in range(3)]
    try:
        for sock in held:  # all three are being served
            sock.sendall(b'{"command":"help"}\n')
            assert lines(sock, 1)[0]["ok"]
        with connect(server) as extra:
            assert json.loads(closed(extra))["error"]["code"] == "busy"
    finally:
        for sock in held:
            sock.close()

    def answered() -> bool:
        try:
            return bool(control_request(server.path, {"command": "help"}))
        except ControlError:
            return False

    wait_until(answered, "room again once their threads noticed the close", timeout=10)


def test_clients_at_once_each_get_their_own_answers(served: Any) -> None:
    server, filters = served
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with connect(server) as sock:  # three connections at once, each asking in turn
                for step in range(10):
                    name = f"c{index}-{step}"
                    sock.sendall(json.dumps({"command": "bitmap-add", "name": name, "id": step}).encode() + b"\n")
                    (answer,) = lines(sock, 1)
                    assert answer["result"]["name"] == name and answer["id"] == step
                    sock.sendall(json.dumps({"command": "bitmap-remove", "name": name}).encode() + b"\n")
                    assert lines(sock, 1)[0]["ok"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and filters["disk"].bitmap_list() == []


def test_a_client_that_goes_away_mid_line_or_before_its_answer_leaves_no_trace(served: Any, caplog: Any) -> None:
    server, _ = served
    with caplog.at_level(logging.DEBUG, logger="nbdproto.control"):
        for payload in (b'{"comm', b'{"command":"status"}\n' * 50):
            sock = connect(server)
            sock.sendall(payload)
            sock.close()
        assert control_exchange(server.path, {"command": "status"})["ok"]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
