"""lorawarm as a systemd service: sd_notify over a real unix datagram socket, signals, exits."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorawarm.notify import Notifier
from tests.support.daemon_proc import LorawarmProcess, wait_for

UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.1)
    yield sock
    sock.close()


def _drain(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            continue
    return got


def _drain_until(sock: socket.socket, prefix: str, timeout: float) -> list[tuple[float, str]]:
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got.extend(_drain(sock, 0.2))
        for i, (_, message) in enumerate(got):
            if message.startswith(prefix):
                return got[: i + 1]
    raise AssertionError(f"no {prefix} within {timeout} s; got {got!r}")


def test_notifier_sends_datagrams(notify_socket: socket.socket) -> None:
    """READY, STATUS, WATCHDOG and STOPPING reach the socket named in NOTIFY_SOCKET."""
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.getsockname()})
    assert notifier.ready("2 adapters")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2 adapters"
    assert notifier.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_notifier_abstract_socket() -> None:
    """A NOTIFY_SOCKET starting with @ is an abstract socket."""
    name = f"lorawarm-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("line\nbreak")
        assert sock.recv(4096) == b"STATUS=line break"


def test_notifier_without_systemd_does_nothing(tmp_path: Path) -> None:
    """Without NOTIFY_SOCKET nothing is sent; a dead socket is logged, not raised."""
    assert Notifier({}).ready("x") is False
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")}).ready("x") is False


def test_watchdog_interval_from_environment() -> None:
    """WATCHDOG_USEC sets the interval, unless WATCHDOG_PID names another process."""
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_seconds == 30.0
    own = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(own).watchdog_seconds == 2.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
    assert Notifier(other).watchdog_seconds is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_seconds is None


def test_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """The real daemon sends READY after its first scan, watchdog pings at half the interval
    from its event loop, STOPPING on SIGTERM, and exits 0."""
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "1000000"}
    proc = LorawarmProcess(tmp_path / "drop", tmp_path / "state", [UNREACHABLE], env=env)
    proc.start()
    try:
        messages = _drain_until(notify_socket, "READY=1", timeout=60.0)
        assert messages[-1][1].startswith("READY=1\nSTATUS=adapters:")
        assert not any("READY=1" in m for _, m in messages[:-1])
        assert httpx.get(f"{proc.status_url}/readyz", timeout=2).status_code == 200
        messages = _drain(notify_socket, 4.0)
        assert not any("READY=1" in m for _, m in messages)
        pings = [t for t, m in messages if m == "WATCHDOG=1"]
        # 1 s watchdog: a ping every 0.5 s, about 7 in 4 s; systemd needs one per second.
        assert len(pings) >= 4
        assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0
        assert proc.process is not None
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(timeout=15) == 0
        tail = [m for _, m in _drain(notify_socket, 0.5)]
        assert any(m.startswith("STOPPING=1") for m in tail)
    finally:
        proc.kill()


def test_bad_configuration_exits_78_with_one_line(tmp_path: Path) -> None:
    """A bad setting stops `lorawarm run` with exit code 78 and one line naming it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAWARM_")}
    env.update({"LORAWARM_CACHE_DIR": str(tmp_path), "LORAWARM_WARM_LIMIT": "zero"})
    result = subprocess.run(
        [sys.executable, "-m", "lorawarm.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        "lorawarm: configuration error: LORAWARM_WARM_LIMIT (warm_limit): Input should be a "
        "valid integer, unable to parse string as an integer (got 'zero')"
    ]


def test_missing_cache_dir_exits_78(tmp_path: Path) -> None:
    """A drop directory that does not exist is a configuration error (78), not a crash."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
    env["LORAWARM_CACHE_DIR"] = str(tmp_path / "nope")
    env["LORAWARM_STATE_DIR"] = str(tmp_path / "state")
    result = subprocess.run(
        [sys.executable, "-m", "lorawarm.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    assert "LORAWARM_CACHE_DIR" in result.stderr
    assert "not a directory" in result.stderr


def test_sighup_rescans_the_drop_directory(tmp_path: Path) -> None:
    """SIGHUP makes the daemon re-read the drop directory (here: with inotify events lost,
    by using the polling observer at a very long interval)."""
    drop = tmp_path / "drop"
    env = {"LORAWARM_POLLING": "true", "LORAWARM_POLL_SECONDS": "3600"}
    with LorawarmProcess(drop, tmp_path / "state", [UNREACHABLE], env=env) as proc:
        (drop / "late").mkdir()
        time.sleep(1)
        assert proc.adapter("late") is None
        assert proc.process is not None
        proc.process.send_signal(signal.SIGHUP)
        wait_for(lambda: proc.adapter("late"), timeout=10, what="the rescan to find 'late'")
