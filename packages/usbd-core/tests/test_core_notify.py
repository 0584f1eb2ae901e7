"""sd_notify over a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from usbd.core._notify import notify, ready, stopping


def _receiver(address: str) -> socket.socket:
    """A bound datagram socket; non-blocking, since a sent datagram is queued before
    ``sendto`` returns and so is there to read at once (or was never sent)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def _nothing_queued(sock: socket.socket) -> bool:
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    return False


@pytest.fixture
def systemd(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A filesystem notification socket, named in NOTIFY_SOCKET."""
    path = str(sockdir / "notify")
    with _receiver(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_ready_sends_one_datagram(systemd: socket.socket) -> None:
    assert ready("serving /dev/nbd0") is True
    data, _ = systemd.recvfrom(4096)
    assert data == f"READY=1\nSTATUS=serving /dev/nbd0\nMAINPID={os.getpid()}".encode()
    assert _nothing_queued(systemd)


def test_stopping(systemd: socket.socket) -> None:
    assert stopping() is True
    assert systemd.recv(4096) == b"STOPPING=1"
    assert stopping("detaching /dev/nbd0") is True
    assert systemd.recv(4096) == b"STOPPING=1\nSTATUS=detaching /dev/nbd0"


def test_notify_joins_fields(systemd: socket.socket) -> None:
    assert notify("STATUS=flushing", "EXTEND_TIMEOUT_USEC=60000000") is True
    assert systemd.recv(4096) == b"STATUS=flushing\nEXTEND_TIMEOUT_USEC=60000000"


def test_status_stays_on_one_line(systemd: socket.socket) -> None:
    assert ready("two\nlines") is True
    assert systemd.recv(4096).split(b"\n")[:2] == [b"READY=1", b"STATUS=two lines"]


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"usbd-test-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert stopping() is True
        data, _ = sock.recvfrom(4096)
    assert data == b"STOPPING=1"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_sends_nothing(
    systemd: socket.socket, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET")
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert ready("serving") is False
    assert stopping() is False
    assert _nothing_queued(systemd)


def test_vsock_is_not_supported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with caplog.at_level(logging.DEBUG, logger="usbd"):
        assert ready("serving") is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_no_listener_warns_once(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(sockdir / "missing")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with caplog.at_level(logging.DEBUG, logger="usbd"):
        assert ready("serving") is False  # ENOENT
        assert stopping() is False
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert path in warnings[0]
    assert all(r.name == "usbd" for r in caplog.records)


def test_closed_listener_warns(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(sockdir / "closed")
    _receiver(path).close()  # the file stays, nobody reads: ECONNREFUSED
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with caplog.at_level(logging.WARNING, logger="usbd"):
        assert stopping() is False
    assert len(_warnings(caplog)) == 1


def test_relative_path_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", f"relative-{uuid.uuid4().hex}")
    with caplog.at_level(logging.WARNING, logger="usbd"):
        assert notify("READY=1") is False
    assert len(_warnings(caplog)) == 1
