"""The supervisor's duties: exit codes, the state-dir lock, stopping during the first scan,
the watcher failing to start, and an invalid update that keeps the last valid version served."""

from __future__ import annotations

import asyncio
import configparser
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from watchdog.observers import Observer

from lorawarm import watcher as watcher_module
from lorawarm.catalog import AdapterState
from lorawarm.daemon import EX_SOFTWARE
from lorawarm.settings import EX_CONFIG
from lorawarm.status import create_app
from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.unit.adapters import SAFETENSORS, write_adapter
from tests.unit.conftest import UNREACHABLE, MakeDaemon

UNIT = Path(__file__).parents[2] / "systemd" / "lorawarm.service"


async def test_a_crashed_part_exits_70(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a part of the daemon dies of a bug, run() stops everything and returns 70
    (EX_SOFTWARE), which systemd's Restart=on-failure restarts (0 would not be)."""
    daemon = make_daemon()

    async def crash() -> None:
        raise RuntimeError("a bug in the collector")

    monkeypatch.setattr(daemon.collector, "run", crash)
    assert await asyncio.wait_for(daemon.run(), timeout=30) == EX_SOFTWARE == 70


async def test_a_crash_in_the_first_scan_exits_70(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that kills the first scan is a crash too: exit 70, not a traceback and 1."""
    daemon = make_daemon()

    async def crash(published: frozenset[str] = frozenset()) -> None:
        raise RuntimeError("a bug in the intake")

    monkeypatch.setattr(daemon.intake, "rescan", crash)
    assert await asyncio.wait_for(daemon.run(), timeout=30) == EX_SOFTWARE


def test_the_unit_restarts_on_70_but_not_on_78() -> None:
    """systemd restarts lorawarm after a crash (exit 70) and not after a bad configuration."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    assert unit["Service"]["Restart"] == "on-failure"  # any non-zero exit code
    assert unit["Service"]["RestartPreventExitStatus"].split() == [str(EX_CONFIG)]


async def test_a_second_interrupt_exits_at_once(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first SIGINT asks for a graceful stop; a second one exits 130 at once, without
    waiting for the drain."""
    daemon = make_daemon()
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    daemon.interrupt()
    assert daemon.stop_requested
    assert exits == []
    daemon.interrupt()
    assert exits == [130]


async def test_watcher_that_cannot_start_falls_back_to_polling(
    make_daemon: MakeDaemon, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inotify refusing to watch (ENOSPC: the watch limit) is said once with what to raise,
    shown in /healthz, and the polling observer takes over: new folders are still taken."""

    class Refusing(Observer):  # type: ignore[misc,valid-type]  # watchdog's platform alias
        def start(self) -> None:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher_module, "Observer", Refusing)
    daemon = make_daemon(poll_seconds=0.05)
    await daemon.intake.rescan()
    await daemon.intake.rescan()
    assert daemon.intake.watcher is not None
    assert daemon.intake.watcher.polling
    assert daemon.intake.watcher.alive
    problem = daemon.watch_problem or ""
    assert "fs.inotify.max_user_watches" in problem
    transport = httpx.ASGITransport(app=create_app(daemon))
    async with httpx.AsyncClient(transport=transport, base_url="http://lorawarm") as client:
        health = (await client.get("/healthz")).json()
    assert health["watch"] == problem
    (cache / "new").mkdir()
    async with asyncio.timeout(5):
        while not any(h.parts == ("new",) for h in await daemon.intake.hints.get()):
            pass


async def test_invalid_update_keeps_the_last_valid_version_served(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """An in-place update judged invalid (weights truncated by a stalled copy) keeps the last
    valid snapshot in the warm set, with the new content's reason as pending_reason; valid
    content switches to the new snapshot; deleting the folder still removes it."""
    daemon = make_daemon()
    write_adapter(cache / "a", seed=1)
    await daemon.intake.refresh("a", published=True)
    record = daemon.catalog.get("a")
    assert record is not None
    assert record.snapshot is not None
    first = record.snapshot
    weights = cache / "a" / SAFETENSORS
    weights.write_bytes(weights.read_bytes()[:-100])
    await daemon.intake.refresh("a", published=True)
    assert record.snapshot == first
    assert record.reason == "weights_truncated"
    assert daemon.reconcilers[0].desired() == [("a", str(first.path))]
    assert daemon.states()["a"] is AdapterState.PENDING  # waiting for its server, not invalid
    transport = httpx.ASGITransport(app=create_app(daemon))
    async with httpx.AsyncClient(transport=transport, base_url="http://lorawarm") as client:
        view = (await client.get("/v1/adapters/a")).json()
    assert (view["reason"], view["pending_reason"]) == (None, "weights_truncated")
    assert view["snapshot_path"] == str(first.path)
    shutil.rmtree(cache / "a")
    write_adapter(cache / "a", seed=2)
    await daemon.intake.refresh("a", published=True)
    assert record.snapshot is not None
    assert record.snapshot != first
    assert record.reason is None
    shutil.rmtree(cache / "a")
    await daemon.intake.refresh("a")
    assert daemon.reconcilers[0].desired() == []


def test_a_second_daemon_on_the_same_state_dir_exits_78(tmp_path: Path) -> None:
    """Two daemons on one state directory would collect each other's snapshots: the second
    one exits 78 with one line naming the first one's pid."""
    drop = tmp_path / "drop"
    drop.mkdir()
    with LorawarmProcess(drop, tmp_path / "state", [UNREACHABLE]) as first:
        second = LorawarmProcess(drop, tmp_path / "state", [UNREACHABLE])
        second.start()
        assert second.process is not None
        assert second.process.wait(timeout=30) == EX_CONFIG
        assert first.process is not None
        assert f"another lorawarm (pid {first.process.pid})" in second.log_text()
        assert first.process.poll() is None  # the first one keeps running


def test_sigterm_during_the_first_scan_exits_promptly(tmp_path: Path) -> None:
    """A stop asked while the first scan of thousands of folders is still snapshotting them
    is honoured within a folder's work, not after the whole scan."""
    drop = tmp_path / "drop"
    for i in range(3000):
        write_adapter(drop / f"a{i:04d}", seed=i % 7)
    past = time.time() - 3600
    for folder in drop.iterdir():
        os.utime(folder / SAFETENSORS, (past, past))
    d = LorawarmProcess(drop, tmp_path / "state", [UNREACHABLE], env={"LORAWARM_LOG_LEVEL": "info"})
    d.start()
    assert d.process is not None
    try:
        wait_for(
            lambda: d.get("/healthz").status_code == 200 and d.get("/readyz").status_code == 503,
            timeout=30,
            what="the status API up while the first scan runs",
        )
        d.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = d.process.wait(timeout=20)
        took = time.monotonic() - signalled
    except (subprocess.TimeoutExpired, httpx.HTTPError):
        d.kill()
        raise
    assert code == 0
    assert '"ready"' not in d.log_text()  # it stopped before the scan was done
    snapshots = tmp_path / "state" / "snapshots"
    made = sum(1 for p in snapshots.iterdir() if not p.name.startswith("."))
    assert made < 3000
    print(f"stopped {took:.2f} s after SIGTERM, {made} of 3000 snapshots made", file=sys.stderr)
