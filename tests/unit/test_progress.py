"""Start-up progress: `scanning 3000/10000 folders`, `warming 12/200 adapters` in systemd's
STATUS= and the log, from the pure reporter up to the real daemon's notify socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lorawarm.catalog import AdapterState
from lorawarm.progress import Progress, warm_counts
from tests.support.daemon_proc import LorawarmProcess
from tests.unit.adapters import write_adapter

UNREACHABLE = "http://127.0.0.1:9"
FOLDERS = 3000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_name_the_phase_and_how_far_it_is() -> None:
    """A running scan is `scanning done/total folders`, then a warm-up `warming loaded/total
    adapters`; nothing once both are complete."""
    progress = Progress(clock=Clock())
    assert progress.line((3000, 10000), None) == "scanning 3000/10000 folders"
    assert progress.line((10000, 10000), (12, 200)) == "warming 12/200 adapters"
    assert progress.line((10000, 10000), (200, 200)) is None
    assert progress.line(None, None) is None


def test_warm_counts_are_loaded_of_loaded_and_pending() -> None:
    """Loaded of the adapters still to load everywhere; invalid, failed and cold ones are not
    part of a warm-up."""
    states = [AdapterState.LOADED] * 3 + [AdapterState.PENDING] * 2
    states += [AdapterState.INVALID, AdapterState.FAILED, AdapterState.COLD]
    assert warm_counts(states) == (3, 5)


def test_log_is_throttled_and_says_when_a_phase_ends() -> None:
    """One `progress` log line per `log_every` seconds however often it is asked, and one
    `progress_done` with the phase's duration when it ends."""
    clock = Clock()
    progress = Progress(log_every=5.0, clock=clock)
    with capture_logs() as logs:
        for done in range(0, 10000, 100):  # 100 calls over 12.5 s
            progress.line((done, 10000), None)
            clock.now += 0.125
        progress.line((10000, 10000), None)
    lines = [e for e in logs if e["event"] == "progress"]
    assert [e["done"] for e in lines] == [0, 4000, 8000]
    assert all(e["phase"] == "scan" and e["total"] == 10000 for e in lines)
    done = [e for e in logs if e["event"] == "progress_done"]
    assert len(done) == 1
    assert done[0]["phase"] == "scan"
    assert done[0]["seconds"] == pytest.approx(12.5)


def test_a_stalled_phase_logs_once() -> None:
    """A warm-up that does not move (its server is down) is logged once, not every period."""
    clock = Clock()
    progress = Progress(log_every=5.0, clock=clock)
    with capture_logs() as logs:
        for _ in range(20):
            assert progress.line(None, (0, 300)) == "warming 0/300 adapters"
            clock.now += 5.0
        progress.line(None, (1, 300))
    assert [e["done"] for e in logs if e["event"] == "progress"] == [0, 1]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.1)
    yield sock
    sock.close()


def many_adapters(drop: Path, tmp_path: Path, count: int) -> None:
    """`count` valid adapter folders, quiet for a minute already (as after a restart)."""
    source = write_adapter(tmp_path / "source")
    stamp = time.time() - 60
    files = [f for f in source.iterdir() if f.is_file()]
    for i in range(count):
        folder = drop / f"p-{i:05d}"
        folder.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, folder / f.name)
            os.utime(folder / f.name, (stamp, stamp))


def statuses(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Every STATUS= line received until one starts with `until`."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        got += [line[7:] for line in message.splitlines() if line.startswith("STATUS=")]
        if got and got[-1].startswith(until):
            return got
    raise AssertionError(f"no STATUS={until}... within {timeout} s; got {got[-5:]!r}")


def test_daemon_reports_scan_and_warm_progress(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """The real daemon starting on 3,000 folders sends `STATUS=scanning k/3000 folders` while
    its first scan runs, then `warming 0/3000 adapters` while its server is down, and logs
    the same as `progress` events with a `progress_done` for the scan."""
    drop = tmp_path / "drop"
    many_adapters(drop, tmp_path, FOLDERS)
    env = {"NOTIFY_SOCKET": notify_socket.getsockname()}
    proc = LorawarmProcess(drop, tmp_path / "state", [UNREACHABLE], env=env).start()
    try:  # read the socket from the start: a full socket queue would block the daemon's sends
        seen = statuses(notify_socket, "warming", timeout=120)
    finally:
        proc.stop()
    log = [json.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]
    scanning = [s for s in seen if s.startswith("scanning ")]
    assert scanning, seen
    counts = [tuple(map(int, s.split()[1].split("/"))) for s in scanning]
    assert all(total == FOLDERS and done < FOLDERS for done, total in counts)
    assert counts == sorted(counts)
    assert seen[-1] == f"warming 0/{FOLDERS} adapters; servers ok: 0/1"
    events = [(e["event"], e.get("phase")) for e in log if e["event"].startswith("progress")]
    assert ("progress", "scan") in events
    assert ("progress_done", "scan") in events
    assert ("progress", "warm") in events
