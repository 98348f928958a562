"""Filesystem faults against the real `lorawarm run` process: the drop dir vanishing, folders
renamed or vanishing while they settle, permission denied, a full or read-only state dir, lost
events and the polling observer. Each fault is made for real (rmtree, rename, kernel permission
checks, a size-limited tmpfs mount, an observer that never reports) and the daemon is observed
only through its status API, its files and the requests the fake vLLM receives."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorawarm.snapshot import SOURCES, STAGING
from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.support.fake_vllm_http import FakeVllmHttp
from tests.unit.adapters import SAFETENSORS, write_adapter

NOBODY = 65534
# Root without the two capabilities that let it read any file: the kernel's permission checks
# then apply to it as to any other user (setpriv execs, so the pid stays the daemon's).
WITHOUT_DAC_OVERRIDE = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]
DAC_CAPS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


def effective_caps(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("CapEff:")).split()[1], 16)


def daemon(
    dirs: tuple[Path, Path], server: FakeVllmHttp, wrapper: Sequence[str] = (), **env: str
) -> LorawarmProcess:
    """`lorawarm run` on `dirs`, warming `server`; `env` keys are settings (`settle_seconds`)."""
    drop, state = dirs
    return LorawarmProcess(
        drop,
        state,
        [server.url],
        env={f"LORAWARM_{k.upper()}": v for k, v in env.items()},
        log_path=state.parent / "lorawarm.log",
        wrapper=wrapper,
    )


def publish(drop: Path, name: str, **options: Any) -> Path:
    """Write an adapter next to its place and rename it in (the recommended publish)."""
    staging = drop / f".{name}.tmp"
    write_adapter(staging, **options)
    return staging.rename(drop / name)


def inspections(proc: LorawarmProcess) -> dict[str, float]:
    """lorawarm_inspections_total by verdict, from /metrics."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(proc.get("/metrics").text):
        if family.name == "lorawarm_inspections":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["verdict"]] = sample.value
    return counts


def snapshot_names(state: Path) -> set[str]:
    root = state / "snapshots"
    hidden = {STAGING, SOURCES}  # copies in progress; remembered digests
    return {p.name for p in root.iterdir() if p.name not in hidden} if root.is_dir() else set()


def staging_leftovers(state: Path) -> list[str]:
    staging = state / "snapshots" / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def inotify_instances(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd) == "anon_inode:inotify"
    return count


def log_events(proc: LorawarmProcess) -> list[dict[str, Any]]:
    """The daemon's JSON log lines."""
    lines = proc.log_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def drop_dir_health(proc: LorawarmProcess) -> str:
    drop_dir: str = proc.get("/healthz").json()["drop_dir"]
    return drop_dir


def loaded_on(server: FakeVllmHttp, name: str) -> str | None:
    return server.registry().get(name)


# --- the drop directory ------------------------------------------------------------------------


def test_drop_dir_deleted_then_recreated(dirs: tuple[Path, Path], vllm_http: FakeVllmHttp) -> None:
    """A drop dir that vanishes as a whole is reported missing and unloads nothing; its
    re-created content is picked up (an unchanged adapter keeps its snapshot, a new one loads,
    a dropped one goes)."""
    drop, _ = dirs
    write_adapter(drop / "keep")
    write_adapter(drop / "gone", seed=1)
    with daemon(dirs, vllm_http) as proc:
        keep = proc.wait_state("keep", "loaded")
        proc.wait_state("gone", "loaded")

        # Deleted as a whole (moved to a trash, then removed; an unmounted share alike): the
        # path vanishes at once. A plain `rm -rf` of the drop dir deletes the adapters one by
        # one first, and those are (correctly) taken as deleted adapters.
        trash = drop.parent / "trash"
        drop.rename(trash)
        shutil.rmtree(trash)
        wait_for(lambda: drop_dir_health(proc) == "missing", timeout=15, what="drop_dir missing")
        assert proc.get("/readyz").status_code == 200
        time.sleep(1.5)  # every event of the deletion has arrived and been handled by now
        listed = {a["name"]: a["state"] for a in proc.get("/v1/adapters").json()["adapters"]}
        assert listed == {"keep": "loaded", "gone": "loaded"}
        assert vllm_http.fake.ops("unload") == []
        assert set(vllm_http.registry()) == {"keep", "gone"}

        # Re-created in one step (a remount, a restore): same `keep`, a new `fresh`, no `gone`.
        replacement = drop.parent / "drop.new"
        write_adapter(replacement / "keep")
        write_adapter(replacement / "fresh", seed=2)
        replacement.rename(drop)
        proc.wait_state("fresh", "loaded", timeout=30)
        wait_for(lambda: proc.adapter("gone") is None, timeout=15, what="gone to be removed")
        assert drop_dir_health(proc) == "ok"
        assert proc.wait_state("keep", "loaded")["snapshot_path"] == keep["snapshot_path"]
        assert [op[1] for op in vllm_http.fake.ops("unload")] == ["gone"]
        assert [op[1] for op in vllm_http.fake.ops("load")].count("keep") == 1
        # New content in the new directory is seen by the new observer.
        publish(drop, "after", seed=3)
        proc.wait_state("after", "loaded", timeout=15)


# --- folders that move or vanish while they settle --------------------------------------------


def test_folder_renamed_while_settling(dirs: tuple[Path, Path], vllm_http: FakeVllmHttp) -> None:
    """A folder renamed while it settles is forgotten under its old name and taken under the
    new one; the old name is never inspected, snapshotted or loaded."""
    drop, state = dirs
    with daemon(dirs, vllm_http, settle_seconds="3") as proc:
        write_adapter(drop / "old-name")
        proc.wait_state("old-name", "settling", timeout=10)
        (drop / "old-name").rename(drop / "new-name")
        doc = proc.wait_state("new-name", "loaded", timeout=15)
        assert proc.adapter("old-name") is None
        assert [a["name"] for a in proc.get("/v1/adapters").json()["adapters"]] == ["new-name"]
        assert snapshot_names(state) == {"new-name"}
        assert doc["snapshot_path"].startswith(str(state / "snapshots" / "new-name"))
        assert [op[1] for op in vllm_http.fake.ops()] == ["new-name"]
        assert inspections(proc) == {"valid": 1.0}


def test_folder_vanishing_within_settle_period(
    dirs: tuple[Path, Path], vllm_http: FakeVllmHttp
) -> None:
    """A folder that appears and is deleted within the settle period is never inspected and
    leaves no record, snapshot or vLLM call behind."""
    drop, state = dirs
    with daemon(dirs, vllm_http, settle_seconds="2") as proc:
        write_adapter(drop / "ghost")
        proc.wait_state("ghost", "settling", timeout=10)
        shutil.rmtree(drop / "ghost")
        wait_for(lambda: proc.adapter("ghost") is None, timeout=10, what="ghost to be forgotten")
        time.sleep(2.5)  # past the moment its settle timer was due: nothing may come back
        publish(drop, "witness")
        proc.wait_state("witness", "loaded", timeout=15)
        wait_for(lambda: inspections(proc) == {"valid": 1.0}, timeout=5, what="one inspection")
        assert proc.adapter("ghost") is None
        assert snapshot_names(state) == {"witness"}
        assert [op[1] for op in vllm_http.fake.ops()] == ["witness"]
        events = {e["event"] for e in log_events(proc) if e.get("adapter") == "ghost"}
        assert events <= {"adapter_removed"}, events


# --- permission denied -------------------------------------------------------------------------


def test_permission_denied_on_a_file(dirs: tuple[Path, Path], vllm_http: FakeVllmHttp) -> None:
    """A weights file the daemon may not read is `invalid`/`unreadable` (never loaded), and is
    taken as soon as its permissions are fixed."""
    drop, state = dirs
    folder = write_adapter(drop.parent / "staging")
    os.chown(folder / SAFETENSORS, NOBODY, NOBODY)
    (folder / SAFETENSORS).chmod(0o600)
    with daemon(dirs, vllm_http, wrapper=WITHOUT_DAC_OVERRIDE) as proc:
        assert proc.process is not None
        assert effective_caps(proc.process.pid) & DAC_CAPS == 0
        folder.rename(drop / "locked")
        doc = proc.wait_state("locked", "invalid", timeout=15)
        assert doc["reason"] == "unreadable"
        assert "Permission denied" in doc["message"]
        assert vllm_http.fake.ops() == []
        assert snapshot_names(state) == set()
        # Re-inspected at every rescan (so that a fix is taken) without settling again: its
        # content did not change, so neither does its state nor when it changed.
        for _ in range(3):
            before = sum(inspections(proc).values())
            proc.process.send_signal(signal.SIGHUP)
            wait_for(
                lambda n=before: sum(inspections(proc).values()) > n, timeout=10, what="a rescan"
            )
            again = proc.adapter("locked")
            assert again is not None
            assert (again["state"], again["changed_at"]) == ("invalid", doc["changed_at"])

        (drop / "locked" / SAFETENSORS).chmod(0o644)  # same size, mtime and inode
        doc = proc.wait_state("locked", "loaded", timeout=15)
        assert doc["reason"] is None
        assert [op[1] for op in vllm_http.fake.ops()] == ["locked"]


# --- the state dir full or read-only -----------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs mounted as the state dir (a real filesystem that fills up)."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "lorawarm-faults", str(state)],
        check=True,
    )
    try:
        (state / "snapshots").mkdir()
        yield state
    finally:
        if subprocess.run(["umount", str(state)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(state)], check=True)


def fill(state: Path, leave: int) -> Path:
    """Fill the filesystem of `state`, then free about `leave` bytes again."""
    filler = state / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xa5" * 4096)
    finally:
        os.close(fd)
    size = filler.stat().st_size
    os.truncate(filler, max(size - leave, 0))
    return filler


def test_state_dir_full_then_space_returns(
    dirs: tuple[Path, Path], small_tmpfs: Path, vllm_http: FakeVllmHttp
) -> None:
    """With the state dir full the snapshot fails (`failed`/`snapshot_failed`), nothing
    half-written stays in `.staging`, and the adapter is loaded once space returns."""
    drop, state = dirs
    filler = fill(small_tmpfs, leave=12 * 1024)  # room for the config, not for the weights
    proc = daemon(dirs, vllm_http, resync_seconds="1")
    with proc:
        publish(drop, "big")
        doc = proc.wait_state("big", "failed", timeout=15)
        assert doc["reason"] == "snapshot_failed"
        assert "No space left on device" in doc["message"]
        assert doc["snapshot_path"] is None
        assert staging_leftovers(state) == []
        assert snapshot_names(state) == set()
        assert vllm_http.fake.ops() == []

        filler.unlink()
        doc = proc.wait_state("big", "loaded", timeout=15)
        assert doc["reason"] is None
        assert Path(doc["snapshot_path"]).is_dir()
        assert staging_leftovers(state) == []
        assert "snapshot_failed" in proc.log_text()


def test_state_dir_read_only_then_writable(
    dirs: tuple[Path, Path], small_tmpfs: Path, vllm_http: FakeVllmHttp
) -> None:
    """With the state dir read-only the snapshot fails (`failed`/`snapshot_failed`), and the
    adapter is loaded once the state dir is writable again."""
    drop, state = dirs
    proc = daemon(dirs, vllm_http, resync_seconds="1")
    with proc:
        subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
        try:
            publish(drop, "frozen")
            doc = proc.wait_state("frozen", "failed", timeout=15)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
        assert doc["reason"] == "snapshot_failed"
        assert "Read-only file system" in doc["message"]
        assert vllm_http.fake.ops() == []
        doc = proc.wait_state("frozen", "loaded", timeout=15)
        assert Path(doc["snapshot_path"]).is_dir()
        assert staging_leftovers(state) == []


# --- lost events and the polling observer ------------------------------------------------------


def test_lost_events_are_caught_up_by_the_rescan(
    dirs: tuple[Path, Path], vllm_http: FakeVllmHttp
) -> None:
    """With an observer that reports nothing (polling every hour, no inotify), the periodic
    rescan alone finds a new adapter, its change and its deletion."""
    drop, _ = dirs
    with daemon(dirs, vllm_http, polling="true", poll_seconds="3600", resync_seconds="1") as p:
        assert p.process is not None
        assert inotify_instances(p.process.pid) == 0
        write_adapter(drop / "unseen")
        first = p.wait_state("unseen", "loaded", timeout=15)
        shutil.rmtree(drop / "unseen")
        write_adapter(drop / "unseen", seed=5)
        wait_for(
            lambda: (
                (d := p.adapter("unseen")) is not None
                and d["state"] == "loaded"
                and d["digest"] != first["digest"]
            ),
            timeout=15,
            what="the changed adapter to be loaded",
        )
        assert loaded_on(vllm_http, "unseen") != first["snapshot_path"]
        shutil.rmtree(drop / "unseen")
        wait_for(lambda: p.adapter("unseen") is None, timeout=10, what="unseen to be removed")
        wait_for(lambda: loaded_on(vllm_http, "unseen") is None, timeout=10, what="unload")


def test_events_lost_in_a_queue_overflow_are_caught_at_once(
    dirs: tuple[Path, Path], vllm_http: FakeVllmHttp
) -> None:
    """More events than the kernel queues (the daemon stopped meanwhile) lose the publish of a
    new adapter; the overflow makes the daemon rescan at once, long before its hourly resync."""
    drop, _ = dirs
    with daemon(dirs, vllm_http, resync_seconds="3600") as p:
        assert p.process is not None
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        noise = [drop / "noise-a", drop / "noise-b"]
        for f in noise:
            f.write_text("")
        os.kill(p.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: stopped(p.process.pid), timeout=5, what="the daemon to stop")
            # Alternating files: identical consecutive events would be merged by the kernel.
            for i in range(limit + 1000):
                os.utime(noise[i % 2])
            publish(drop, "lost")
        finally:
            os.kill(p.process.pid, signal.SIGCONT)
        p.wait_state("lost", "loaded", timeout=15)
        events = [e["event"] for e in log_events(p)]
        assert "watch_queue_overflow" in events, p.log_text()[-3000:]


def stopped(pid: int) -> bool:
    """The process is stopped by a signal (every thread: nothing reads its inotify queue)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@contextlib.contextmanager
def rewritten_through_mmap(path: Path, old: bytes, new: bytes) -> Iterator[None]:
    """Replace `old` by `new` (same length) in place through a shared mapping, keeping the file
    open meanwhile: inotify reports no event for writes made through mmap (inotify(7)), and the
    IN_CLOSE_WRITE of closing it comes only when the block ends. The file's mtime moves."""
    assert len(old) == len(new)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        at = mapped.find(old)
        assert at >= 0
        mapped[at : at + len(old)] = new
        mapped.flush()
        yield


def test_an_unreported_rewrite_is_caught_within_the_full_rescan_bound(
    dirs: tuple[Path, Path], vllm_http: FakeVllmHttp
) -> None:
    """A config rewritten in place through mmap raises no inotify event and moves no directory
    stamp: the light rescans cannot see it, and the full rescan, every fifth resync, does
    (the bound the README states: 5 x LORAWARM_RESYNC_SECONDS, plus the settle period)."""
    drop, _ = dirs
    resync, settle = 0.5, 0.5
    with daemon(dirs, vllm_http, resync_seconds=str(resync), settle_seconds=str(settle)) as p:
        publish(drop, "mapped", lora_alpha=16)
        first = p.wait_state("mapped", "loaded", timeout=15)
        time.sleep(0.05)  # past the filesystem's clock tick: the new mtime differs
        config = drop / "mapped" / "adapter_config.json"
        with rewritten_through_mmap(config, b'"lora_alpha": 16', b'"lora_alpha": 32'):
            wait_for(
                lambda: (d := p.adapter("mapped")) is not None and d["digest"] != first["digest"],
                timeout=5 * resync + settle + 10,
                what="the rewritten adapter to get its new snapshot",
            )


def test_polling_observer_sees_a_new_folder(
    dirs: tuple[Path, Path], vllm_http: FakeVllmHttp
) -> None:
    """The polling observer (no inotify instance at all, rescans an hour apart) finds a new
    folder copied in place and one published by rename."""
    drop, _ = dirs
    with daemon(dirs, vllm_http, polling="true", poll_seconds="0.3", resync_seconds="3600") as p:
        assert p.process is not None
        assert inotify_instances(p.process.pid) == 0
        write_adapter(drop / "polled")
        p.wait_state("polled", "loaded", timeout=15)
        publish(drop, "renamed", seed=1)
        p.wait_state("renamed", "loaded", timeout=10)
        assert set(vllm_http.registry()) == {"polled", "renamed"}
