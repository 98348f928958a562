"""The Daemon's wiring without run(): refresh (settle, inspect, snapshot, catalog), rescans,
hints, snapshot collection; and `lorawarm status` against the real `lorawarm run` process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from lorawarm import status_cli
from lorawarm.catalog import AdapterState
from lorawarm.collector import Collector, SnapshotUser
from lorawarm.daemon import Daemon
from lorawarm.settings import Settings, load
from lorawarm.snapshot import Snapshot
from lorawarm.watcher import Hint
from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.support.vllm_server import free_port
from tests.unit.adapters import CONFIG, SAFETENSORS, write_adapter
from tests.unit.conftest import UNREACHABLE, MakeDaemon

TOKEN = "status-secret-42"


def snapshot_of(daemon: Daemon, name: str) -> Snapshot:
    record = daemon.catalog.get(name)
    assert record is not None
    assert record.snapshot is not None
    return record.snapshot


async def publish(daemon: Daemon, cache: Path, *, seed: int, name: str = "a") -> Snapshot:
    """Write adapter `name` (content by `seed`), hand the daemon its publish hint, and return
    the snapshot it made."""
    write_adapter(cache / name, seed=seed)
    await daemon.intake.refresh(name, published=True)
    return snapshot_of(daemon, name)


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def age(folder: Path, seconds: float = 3600) -> Path:
    """Date every file of an adapter folder `seconds` in the past (quiet long ago)."""
    past = time.time() - seconds
    for entry in folder.iterdir():
        os.utime(entry, (past, past))
    return folder


# --- refresh ----------------------------------------------------------------------------------


async def test_published_valid_adapter_gets_a_snapshot(
    make_daemon: MakeDaemon, cache: Path, state: Path
) -> None:
    """A valid adapter renamed into place is inspected at once and snapshotted under the
    state dir; the reconcilers are woken."""
    daemon = make_daemon()
    write_adapter(cache / "a")
    await daemon.intake.refresh("a", published=True)
    record = daemon.catalog.get("a")
    assert record is not None
    assert record.servable
    assert not record.settling
    assert record.reason is None
    assert record.validated_at is not None
    snap = snapshot_of(daemon, "a")
    assert snap.path.parent == state / "snapshots" / "a"
    assert sorted(p.name for p in snap.path.iterdir()) == [CONFIG, SAFETENSORS]
    assert (snap.path / SAFETENSORS).read_bytes() == (cache / "a" / SAFETENSORS).read_bytes()
    assert daemon.states()[record.name] is AdapterState.PENDING
    assert daemon.reconcilers[0].desired() == [("a", str(snap.path))]
    assert daemon.catalog.warm_version > 0  # what the reconcilers wait on moved
    assert (
        daemon.metrics.registry.get_sample_value("lorawarm_inspections_total", {"verdict": "valid"})
        == 1
    )


async def test_in_place_copy_settles_then_is_taken_by_the_timer_hint(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """A fresh, unpublished folder stays settling; when its quiet period is over the daemon's
    own timer queues a hint, and applying it makes the adapter valid."""
    daemon = make_daemon(settle_seconds=0.2)
    write_adapter(cache / "a")
    await daemon.intake.refresh("a")
    record = daemon.catalog.get("a")
    assert record is not None
    assert record.settling
    assert daemon.states()[record.name] is AdapterState.SETTLING
    assert daemon.reconcilers[0].desired() == []
    hints = await asyncio.wait_for(daemon.intake.hints.get(), timeout=3)
    assert hints == [Hint(("a",))]
    await daemon.intake.apply(hints)
    assert record.servable


async def test_old_folder_found_by_a_rescan_is_taken_at_once(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """A rescan (as at start-up) takes folders that have been quiet for long already, plain
    and org/name."""
    daemon = make_daemon(settle_seconds=60)
    age(write_adapter(cache / "a"))
    age(write_adapter(cache / "org" / "b", seed=1))
    await daemon.intake.rescan()
    assert daemon.catalog.names() == {"a", "org/b"}
    assert all(r.servable for r in daemon.catalog)


async def test_invalid_adapter_records_the_reason(make_daemon: MakeDaemon, cache: Path) -> None:
    """An adapter inspection refuses gets the reason code and message, and no snapshot."""
    daemon = make_daemon()
    write_adapter(cache / "big", config={"bias": "all"})
    await daemon.intake.refresh("big", published=True)
    record = daemon.catalog.get("big")
    assert record is not None
    assert record.reason == "bias_not_supported"
    assert record.message
    assert record.snapshot is None
    assert daemon.states()[record.name] is AdapterState.INVALID
    assert daemon.reconcilers[0].desired() == []


async def test_fixed_invalid_adapter_becomes_valid(make_daemon: MakeDaemon, cache: Path) -> None:
    """Rewriting an invalid adapter correctly clears the reason and snapshots it."""
    daemon = make_daemon()
    write_adapter(cache / "a", config={"bias": "all"})
    await daemon.intake.refresh("a", published=True)
    shutil.rmtree(cache / "a")
    write_adapter(cache / "a")
    await daemon.intake.refresh("a", published=True)
    record = daemon.catalog.get("a")
    assert record is not None
    assert (record.reason, record.message) == (None, None)
    assert record.servable


async def test_deleted_adapter_is_removed(make_daemon: MakeDaemon, cache: Path) -> None:
    """A folder that is gone removes its record and stops any settling clock."""
    daemon = make_daemon()
    write_adapter(cache / "a")
    await daemon.intake.refresh("a", published=True)
    write_adapter(cache / "b")
    await daemon.intake.refresh("b")  # settling
    shutil.rmtree(cache / "a")
    shutil.rmtree(cache / "b")
    await daemon.intake.refresh("a")
    await daemon.intake.refresh("b")
    assert daemon.catalog.names() == set()
    await asyncio.sleep(daemon.settings.settle_seconds + 0.2)
    assert daemon.intake.hints.pending() == 0  # b's settle timer went with it
    await daemon.intake.refresh("never-there")
    assert len(daemon.catalog) == 0


async def test_modified_adapter_gets_a_new_snapshot(make_daemon: MakeDaemon, cache: Path) -> None:
    """New weights give a new snapshot path; the old snapshot is left for collection."""
    daemon = make_daemon()
    old = await publish(daemon, cache, seed=1)
    new = await publish(daemon, cache, seed=2)
    assert new.path != old.path
    assert new.digest != old.digest
    assert old.path.is_dir()
    assert daemon.reconcilers[0].desired() == [("a", str(new.path))]


async def test_unchanged_adapter_is_not_inspected_again(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """A hint for an adapter whose folder did not change does no work."""
    daemon = make_daemon()
    write_adapter(cache / "a")
    await daemon.intake.refresh("a", published=True)
    await daemon.intake.refresh("a")
    await daemon.intake.refresh("a", published=True)
    assert (
        daemon.metrics.registry.get_sample_value("lorawarm_inspections_total", {"verdict": "valid"})
        == 1
    )


async def test_same_content_rewritten_keeps_the_snapshot(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """Rewriting identical bytes (new mtimes) is re-inspected but keeps the same snapshot."""
    daemon = make_daemon()
    before = await publish(daemon, cache, seed=1)
    await publish(daemon, cache, seed=1)
    assert snapshot_of(daemon, "a") == before


async def test_apply_hints_for_an_org_and_a_deleted_org(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """Hints resolve to names: an org hint refreshes its adapters; when the org folder is
    deleted, every adapter under it is removed."""
    daemon = make_daemon()
    write_adapter(cache / "org" / "x")
    write_adapter(cache / "org" / "y", seed=1)
    await daemon.intake.apply(
        [Hint(("org", "x"), published=True), Hint(("org", "y"), published=True)]
    )
    assert daemon.catalog.names() == {"org/x", "org/y"}
    shutil.rmtree(cache / "org")
    await daemon.intake.apply([Hint(("org",))])
    assert daemon.catalog.names() == set()


async def test_apply_root_hint_rescans(make_daemon: MakeDaemon, cache: Path) -> None:
    """An empty hint (the drop dir itself changed) rescans, keeping publishes it carried."""
    daemon = make_daemon(settle_seconds=60)
    write_adapter(cache / "fresh")
    await daemon.intake.apply([Hint(()), Hint(("fresh",), published=True)])
    record = daemon.catalog.get("fresh")
    assert record is not None
    assert record.servable


async def test_rename_inside_an_adapter_is_not_a_publish_of_it(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """A folder renamed *inside* a plain adapter (root/a/sub) does not end a's quiet period:
    only a rename to root/name or root/org/name publishes."""
    daemon = make_daemon(settle_seconds=60)
    write_adapter(cache / "a")
    await daemon.intake.refresh("a")  # an in-place copy, settling
    (cache / "a" / ".sub.tmp").mkdir()
    (cache / "a" / ".sub.tmp").rename(cache / "a" / "sub")
    # what the watcher's handler makes of that DirMovedEvent
    await daemon.intake.apply([Hint(("a", ".sub.tmp")), Hint(("a", "sub"), published=True)])
    record = daemon.catalog.get("a")
    assert record is not None
    assert record.settling


async def test_folder_inside_an_adapter_never_becomes_an_adapter(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """Events inside an adapter's sub-folder (e.g. the `.cache/` that `huggingface-cli download
    --local-dir` leaves) never create a record for `name/sub`, and a rescan keeps only `name`."""
    daemon = make_daemon()
    write_adapter(cache / "a")
    await daemon.intake.refresh("a", published=True)
    (cache / "a" / ".cache" / "huggingface").mkdir(parents=True)
    (cache / "a" / "checkpoint-10").mkdir()
    await daemon.intake.apply([Hint(("a", ".cache")), Hint(("a", "checkpoint-10"))])
    await daemon.intake.rescan()
    assert daemon.catalog.names() == {"a"}


async def test_rescan_starts_the_observer_on_the_drop_dir(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """The first rescan starts watching the drop directory: a new folder becomes a hint on
    the daemon's queue."""
    daemon = make_daemon()
    await daemon.intake.rescan()
    assert daemon.intake.watcher is not None
    assert daemon.intake.watcher.alive
    assert daemon.drop_dir_ok
    (cache / "new").mkdir()
    async with asyncio.timeout(5):
        while Hint(("new",)) not in (hints := await daemon.intake.hints.get()):
            pass
    assert Hint(("new",)) in hints


def watching(daemon: Daemon) -> bool:
    return daemon.intake.watcher is not None and daemon.intake.watcher.alive


def drop_dir_ok(daemon: Daemon) -> bool:
    return daemon.drop_dir_ok


def replace_dir(path: Path) -> None:
    path.rename(path.with_name(path.name + "-old"))
    path.mkdir()


async def test_missing_drop_dir_is_waited_for_not_taken_as_deletions(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """A vanished drop directory (an unmounted share) keeps every record, stops the observer
    and says drop_dir missing; when it is back, a rescan is queued and it is watched again."""
    daemon = make_daemon()
    write_adapter(cache / "a")
    await daemon.intake.rescan(frozenset({"a"}))
    assert daemon.catalog.names() == {"a"}
    shutil.rmtree(cache)
    await daemon.intake.refresh("a")
    assert daemon.catalog.names() == {"a"}
    assert Hint(()) in await daemon.intake.hints.get()  # asks for a rescan instead
    await daemon.intake.rescan()
    assert not daemon.drop_dir_ok
    assert not watching(daemon)
    assert daemon.catalog.names() == {"a"}
    write_adapter(cache / "a")
    async with asyncio.timeout(5):
        while Hint(()) not in (hints := await daemon.intake.hints.get()):
            pass
    await daemon.intake.apply(hints)
    assert drop_dir_ok(daemon)
    assert watching(daemon)
    assert daemon.catalog.names() == {"a"}


async def test_replaced_drop_dir_gets_a_new_observer(make_daemon: MakeDaemon, cache: Path) -> None:
    """A drop directory replaced by another one (new inode) is watched anew."""
    daemon = make_daemon()
    await daemon.intake.rescan()
    first = daemon.intake.watcher
    replace_dir(cache)
    await daemon.intake.rescan()
    assert daemon.intake.watcher is not first
    assert first is not None
    assert not first.alive
    assert daemon.intake.watcher is not None
    assert daemon.intake.watcher.alive


# --- snapshot collection ----------------------------------------------------------------------


@dataclass
class User:
    """A SnapshotUser as a server's reconciler is one: what it lists, what it released."""

    listed: bool = True
    using: set[str] = field(default_factory=set)
    gone: dict[str, float] = field(default_factory=dict)

    def snapshots_in_use(self) -> set[str]:
        return set(self.using)

    def released(self) -> dict[str, float]:
        return self.gone

    def forget_released(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.gone.pop(path, None)

    def release(self, path: str, at: float | None = None) -> None:
        self.using.discard(path)
        self.gone[path] = time.time() if at is None else at


def collector_for(daemon: Daemon, *servers: User, grace: float = 0.0) -> Collector:
    named: dict[str, SnapshotUser] = {f"http://vllm-{i}": u for i, u in enumerate(servers)}
    return Collector(
        daemon.store, daemon.catalog, named, daemon.metrics, grace=grace, lock=daemon.intake.lock
    )


async def test_collect_waits_for_a_server_never_listed_but_not_for_ever(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """Nothing is collected while a server was never listed (it may still read an old
    snapshot), and /v1/servers' `collection_held` says so; after the grace period counted
    from the start, collection goes on without it (a decommissioned URL cannot fill the disk)."""
    daemon = make_daemon()
    old = await publish(daemon, cache, seed=1)
    await publish(daemon, cache, seed=2)
    silent = User(listed=False)
    collector = collector_for(daemon, User(), silent, grace=0.3)
    old.path.parent.touch()
    os.utime(old.path, (time.time() - 10, time.time() - 10))
    await collector.collect()
    assert old.path.is_dir()
    assert list(collector.held) == ["http://vllm-1"]
    held = daemon.metrics.registry.get_sample_value(
        "lorawarm_collection_held", {"server": "http://vllm-1"}
    )
    assert held == 1
    await asyncio.sleep(0.35)
    await collector.collect()
    assert collector.held == {}
    assert not old.path.exists()


async def test_collect_keeps_referenced_and_recent_snapshots(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """Snapshots younger than snapshot_grace_seconds survive even when nothing refers to
    them (the plugin may be about to hand one to vLLM)."""
    daemon = make_daemon()
    old = await publish(daemon, cache, seed=1)
    await publish(daemon, cache, seed=2)
    await collector_for(daemon, User(), grace=300).collect()
    assert old.path.is_dir()
    assert snapshot_of(daemon, "a").path.is_dir()


async def test_collect_removes_old_unreferenced_snapshots(
    make_daemon: MakeDaemon, cache: Path, state: Path
) -> None:
    """Past the grace period, a snapshot neither the catalog nor any server uses is removed;
    the catalog's and the ones a server lists as loaded are kept."""
    daemon = make_daemon()
    first = await publish(daemon, cache, seed=1)
    second = await publish(daemon, cache, seed=2)
    current = await publish(daemon, cache, seed=3)
    write_adapter(cache / "org" / "b")
    await daemon.intake.refresh("org/b", published=True)
    b = snapshot_of(daemon, "org/b")
    shutil.rmtree(cache / "org")
    await daemon.intake.refresh("org/b")
    server = User(using={str(second.path)})  # the server still serves the previous one
    collector = collector_for(daemon, server)
    with capture_logs() as logs:
        removed = await collector.collect()
    collected = [e for e in logs if e["event"] == "snapshots_collected"]
    assert [e["count"] for e in collected] == [2]  # told once, with what went
    assert sorted(map(str, removed)) == sorted([str(first.path), str(b.path)])
    assert not first.path.exists()
    assert second.path.is_dir()
    assert current.path.is_dir()
    assert not b.path.exists()
    assert not (state / "snapshots" / "org").exists()  # empty name folders go too
    with capture_logs() as logs:
        assert await collector.collect() == []
    assert [e for e in logs if e["event"] == "snapshots_collected"] == []  # nothing: no line


async def test_grace_counts_from_the_release_not_from_the_creation(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """A days-old snapshot a server unloaded a moment ago is kept for the grace period:
    requests vLLM accepted before the unload may still read it (vllm#5105)."""
    daemon = make_daemon()
    old = await publish(daemon, cache, seed=1)
    server = User(using={str(old.path)})
    await publish(daemon, cache, seed=2)
    days = time.time() - 3 * 86400
    os.utime(old.path, (days, days))
    server.release(str(old.path))
    collector = collector_for(daemon, server, grace=0.3)
    await collector.collect()
    assert old.path.is_dir()
    await asyncio.sleep(0.35)
    await collector.collect()
    assert not old.path.exists()
    assert server.gone == {}


async def test_collect_keeps_a_snapshot_whose_load_is_in_flight(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """A snapshot the catalog no longer refers to but that a server may be reading (a load in
    flight) is kept: deleting files under a load can kill vLLM's engine."""
    daemon = make_daemon()
    first = await publish(daemon, cache, seed=1)
    await publish(daemon, cache, seed=2)
    server = User(using={str(first.path)})
    await collector_for(daemon, server).collect()
    assert first.path.is_dir()
    server.using.clear()
    await collector_for(daemon, server).collect()
    assert not first.path.exists()


async def test_collect_survives_a_failing_store(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError while collecting is logged, not raised into the collector's loop."""
    daemon = make_daemon()

    def broken(keep: object, **kwargs: object) -> list[Path]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(daemon.store, "collect", broken)
    with capture_logs() as logs:
        assert await collector_for(daemon, User()).collect() == []
    assert "snapshot_collect_failed" in [e["event"] for e in logs]


# --- the intake loop, the collector loop, the resync timer, signals ----------------------------


async def test_intake_takes_hints_and_one_failing_folder_does_not_stop_the_others(
    make_daemon: MakeDaemon, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The intake task takes hints in batches; a folder whose step fails unexpectedly is
    logged with its name, and the other folders of the same batch are still taken."""
    daemon = make_daemon()
    real_check = daemon.store.create

    def flaky(adapter: Any, rules: Any) -> Snapshot:
        if adapter.name == "bad":
            raise RuntimeError("boom")
        return real_check(adapter, rules)

    monkeypatch.setattr(daemon.store, "create", flaky)
    write_adapter(cache / "bad")
    write_adapter(cache / "good", seed=1)
    task = asyncio.create_task(daemon.intake.run())
    try:
        with capture_logs() as logs:
            daemon.intake.hints.put(Hint(("bad",), published=True))
            daemon.intake.hints.put(Hint(("good",), published=True))
            await until(lambda: (r := daemon.catalog.get("good")) is not None and r.servable)
        failed = [e for e in logs if e["event"] == "adapter_intake_failed"]
        assert [e["adapter"] for e in failed] == ["bad"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_hint_storm_for_one_folder_is_one_inspection(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """8,000 modify hints for one folder (a 1 GB copy in 128 KiB writes) are one entry and
    one inspection, not 8,000 thread hops."""
    daemon = make_daemon()
    write_adapter(cache / "a")
    for _ in range(8000):
        daemon.intake.hints.put(Hint(("a", "adapter_model.safetensors")))
    daemon.intake.hints.put(Hint(("a",), published=True))
    assert daemon.intake.hints.pending() == 2
    await daemon.intake.apply(await daemon.intake.hints.get())
    inspected = daemon.metrics.registry.get_sample_value(
        "lorawarm_inspections_total", {"verdict": "valid"}
    )
    assert inspected == 1


async def test_collector_runs_as_soon_as_a_release_is_past_its_grace(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """The collector task removes a released snapshot once its grace is over, without
    waiting for a hint or the next periodic run."""
    daemon = make_daemon()
    old = await publish(daemon, cache, seed=1)
    server = User(using={str(old.path)})
    await publish(daemon, cache, seed=2)
    collector = collector_for(daemon, server, grace=0.2)
    task = asyncio.create_task(collector.run())
    try:
        await asyncio.sleep(0.1)
        assert old.path.is_dir()  # the server still uses it
        server.release(str(old.path))
        await until(lambda: not old.path.exists(), within=3)
        assert snapshot_of(daemon, "a").path.is_dir()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_resync_timer_queues_full_rescans(make_daemon: MakeDaemon) -> None:
    """Every resync_seconds the daemon asks itself for a full rescan."""
    daemon = make_daemon(resync_seconds=0.05)
    task = asyncio.create_task(daemon.intake.run())
    try:
        hints = await asyncio.wait_for(daemon.intake.hints.get(), timeout=2)
        assert hints == [Hint(())]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_signal_handlers_only_set_flags(make_daemon: MakeDaemon) -> None:
    """SIGTERM/first SIGINT only ask to stop; SIGHUP only queues a rescan."""
    daemon = make_daemon()
    assert not daemon.stop_requested
    daemon.interrupt()
    assert daemon.stop_requested
    daemon.request_stop()
    assert daemon.stop_requested
    daemon.intake.rescan_soon()
    assert await daemon.intake.hints.get() == [Hint(())]


# --- the status source ------------------------------------------------------------------------


async def test_daemon_is_the_status_source(make_daemon: MakeDaemon) -> None:
    """ready is False until the first scan; server_urls and statuses follow the settings."""
    daemon = make_daemon(vllm_urls=["http://127.0.0.1:9/", "http://127.0.0.1:10"])
    assert not daemon.ready
    assert daemon.server_urls == ["http://127.0.0.1:9", "http://127.0.0.1:10"]
    assert [s.status.url for s in daemon.servers] == daemon.server_urls
    await daemon.intake.rescan()
    assert not daemon.ready  # run() sets it after the first scan


def test_daemon_needs_a_cache_dir(state: Path) -> None:
    """A daemon without a drop directory is a configuration mistake."""
    with pytest.raises(ValueError, match="cache_dir"):
        Daemon(load(state_dir=state))


# --- `lorawarm status` against the real `lorawarm run` ----------------------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LorawarmProcess]:
    """`lorawarm run` against an unreachable vLLM, with one valid and one invalid adapter."""
    base = tmp_path_factory.mktemp("daemon")
    cache = base / "drop"
    age(write_adapter(cache / "good"))
    age(write_adapter(cache / "org" / "big", config={"bias": "all"}))
    proc = LorawarmProcess(
        cache,
        base / "state",
        [UNREACHABLE],
        env={"LORAWARM_STATUS_TOKEN": TOKEN},
        log_path=base / "lorawarm.log",
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    proc.start()
    try:

        def settled() -> bool:
            assert proc.process is not None
            assert proc.process.poll() is None, proc.log_text()[-4000:]
            response = proc.get("/v1/servers", headers=headers)
            return bool(response.json()["servers"][0]["condition"] == "unreachable")

        wait_for(settled, timeout=30, interval=0.1, what="the server to be reported unreachable")
        yield proc
    finally:
        assert proc.stop() == 0


def client_settings(**overrides: Any) -> Settings:
    return load(**overrides)


def test_status_table(running: LorawarmProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """`lorawarm status` prints one row per adapter, one column per server, the server's
    condition, and the invalid adapter's message."""
    settings = client_settings(status_token=TOKEN)
    assert status_cli.show_status(settings, url=running.status_url, as_json=False) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["ADAPTER", "STATE", "REASON", "SERVER", "1"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:3]}
    assert rows["good"] == ["pending", "pending", "(unreachable)"]
    assert rows["org/big"][:2] == ["invalid", "bias_not_supported"]
    assert f"SERVER 1  {UNREACHABLE}  unreachable: ConnectError" in out
    assert "org/big: " in out


def test_status_json(running: LorawarmProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """`lorawarm status --json` prints the adapters and servers documents as one object."""
    settings = client_settings(status_token=TOKEN)
    assert status_cli.show_status(settings, url=running.status_url + "/", as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"adapters", "servers"}
    assert [a["name"] for a in doc["adapters"]] == ["good", "org/big"]
    assert doc["servers"][0]["url"] == UNREACHABLE
    assert doc["servers"][0]["condition"] == "unreachable"


def test_status_command_line(running: LorawarmProcess) -> None:
    """The real `lorawarm status --json` command, token from the environment, exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
    env["LORAWARM_STATUS_TOKEN"] = TOKEN
    env["LORAWARM_STATUS_PORT"] = str(running.port)
    done = subprocess.run(
        [sys.executable, "-m", "lorawarm.cli", "status", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert {a["state"] for a in json.loads(done.stdout)["adapters"]} == {"pending", "invalid"}


def test_status_without_the_token_is_refused(
    running: LorawarmProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the daemon's token, `lorawarm status` exits 1 and says what to set."""
    assert status_cli.show_status(client_settings(), url=running.status_url, as_json=False) == 1
    assert "LORAWARM_STATUS_TOKEN" in capsys.readouterr().err


def test_status_without_a_daemon_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """With nothing listening, `lorawarm status` exits 1 with a one-line explanation."""
    port = free_port()
    settings = client_settings(status_port=port)
    assert status_cli.show_status(settings, url=None, as_json=True) == 1
    err = capsys.readouterr().err
    assert f"cannot read the status API at http://127.0.0.1:{port}" in err


def test_status_of_something_that_is_not_lorawarm(capsys: pytest.CaptureFixture[str]) -> None:
    """An answer that is not the status API's JSON object is an error, not a traceback."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=["not", "an", "object"])

    real = httpx.Client

    class Mocked(real):  # type: ignore[misc,valid-type]  # a class chosen at run time
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(transport=httpx.MockTransport(handler), **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx, "Client", Mocked)
        assert status_cli.show_status(client_settings(), url="http://x", as_json=False) == 1
    assert "unexpected answer from /v1/adapters" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8765"),
        ("0.0.0.0", "http://127.0.0.1:8765"),
        ("::", "http://[::1]:8765"),
        ("::1", "http://[::1]:8765"),
        ("status.local", "http://status.local:8765"),
    ],
)
def test_default_status_url(host: str, url: str) -> None:
    """The status URL comes from the daemon's bind address: wildcards mean loopback."""
    assert status_cli.default_url(client_settings(status_host=host)) == url


def test_render_with_two_servers_and_no_problems() -> None:
    """The table has a column per server; an adapter without an entry shows '-'."""
    adapters = {
        "adapters": [
            {
                "name": "a",
                "state": "loaded",
                "reason": None,
                "message": None,
                "servers": [
                    {"url": "http://s1", "state": "loaded", "condition": None},
                    {"url": "http://s2", "state": "loaded", "condition": None},
                ],
            },
            {"name": "b", "state": "settling", "reason": None, "message": None, "servers": []},
        ]
    }
    servers = {
        "servers": [
            {"url": "http://s1", "condition": "ok", "message": None, "loaded": 1},
            {"url": "http://s2", "condition": "ok", "message": None, "loaded": 1},
        ]
    }
    assert status_cli.render(adapters, servers).splitlines() == [
        "ADAPTER  STATE     REASON  SERVER 1  SERVER 2",
        "a        loaded            loaded    loaded",
        "b        settling          -         -",
        "",
        "SERVER 1  http://s1  ok  loaded=1",
        "SERVER 2  http://s2  ok  loaded=1",
    ]
