"""Intake: the drop directory to the catalog.

Watcher hints (deduplicated per folder), periodic rescans, settle timers, inspection and
snapshot, and the drop directory's own liveness. The intake is the only writer of the
catalog: every inspection verdict and every snapshot a record points to is set here.

Everything runs on the asyncio loop; blocking work (listing, inspection, snapshot copies) runs
in threads, one folder at a time between stop checks, so a stop is honoured within one folder.
One folder's failure (a bug, an OSError nobody expected) is logged with its name and never
keeps the other folders from being taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from lorawarm.catalog import AdapterRecord, Catalog
from lorawarm.inspection import Invalid, Reason, Result, Rules, inspect_adapter
from lorawarm.logs import get_logger
from lorawarm.metrics import Metrics
from lorawarm.settings import Settings
from lorawarm.settle import Fingerprint, Settler, fingerprint, fingerprint_of
from lorawarm.snapshot import Snapshot, SnapshotError, SnapshotReason, SnapshotStore
from lorawarm.verdicts import VerdictMemory, stat_key
from lorawarm.watcher import (
    Hint,
    Hints,
    Stamp,
    Watcher,
    changed_stamps,
    dir_stamps,
    is_org,
    resolve_hint,
    scan,
)

log = get_logger(__name__)

A = TypeVar("A")
T = TypeVar("T")

# Folders inspected and snapshotted per thread call during a rescan.
RESCAN_BATCH = 64
# While inotify watches every folder, only every FULL_RESCAN_EVERY-th periodic rescan reads
# every folder; the others compare directory stamps and look only where one changed.
FULL_RESCAN_EVERY = 5

# What `Intake._check` found: the inspection, then the snapshot (or why there is none).
Checked = tuple[Result, Snapshot | SnapshotError | None]

_WATCH_ADVICE = {
    errno.ENOSPC: "the inotify watch limit is reached: raise fs.inotify.max_user_watches",
    errno.EMFILE: "the inotify instance limit is reached: raise fs.inotify.max_user_instances",
}


class Stopped(Exception):
    """The intake was asked to stop while a thread was working through folders."""


class Intake:
    """Keeps the catalog equal to the drop directory (level-triggered: hints only say where
    to look, every look re-reads the folder)."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        store: SnapshotStore,
        metrics: Metrics,
        *,
        rules: Rules,
    ) -> None:
        if settings.cache_dir is None:
            raise ValueError("cache_dir is required to run the intake")
        self.root = Path(os.path.abspath(settings.cache_dir))
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.rules = rules
        self.verdicts = VerdictMemory(settings.state_dir, rules)
        self.settle_seconds = settings.settle_seconds
        self.resync_seconds = settings.resync_seconds
        self.lock = asyncio.Lock()  # held while folders are taken; the collector takes it too
        self.drop_dir_ok = True
        self.watch_problem: str | None = None  # why there are no inotify events
        # (folders looked at, folders found) by the running or last rescan, for progress.py
        self.scan_progress: tuple[int, int] | None = None
        self._polling = settings.polling
        self._poll_seconds = settings.poll_seconds
        self._settler = Settler(settings.settle_seconds)
        self._hints: Hints | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._watcher: Watcher | None = None
        self._root_id: tuple[int, int] | None = None
        self._drop_dir_probe: asyncio.Task[None] | None = None
        self._stopping = threading.Event()
        self._stamps: dict[str, Stamp] | None = None  # directory stamps of the last look

    @property
    def watcher(self) -> Watcher | None:
        """The running observer (None while the drop directory is missing or none starts)."""
        return self._watcher

    @property
    def hints(self) -> Hints:
        if self._hints is None:
            self._hints = Hints(asyncio.get_running_loop())
        return self._hints

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        """Take hints and rescan periodically; runs until cancelled."""
        resync = asyncio.create_task(self._resync_loop(), name="resync")
        try:
            while True:
                hints = await self.hints.get()
                async with self.lock:
                    await self.apply(hints)
        finally:
            resync.cancel()

    def stop(self) -> None:
        """Stop taking folders (threads stop after the folder at hand) and stop the watcher."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._drop_dir_probe is not None:
            self._drop_dir_probe.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def rescan_soon(self) -> None:
        """Ask for a full rescan (SIGHUP, the resync timer)."""
        self.hints.put(Hint(()))

    async def _resync_loop(self) -> None:
        """Every `resync_seconds` a rescan: a full one every `FULL_RESCAN_EVERY`-th time, and
        always when events cannot be trusted (polling, no observer, a folder left unwatched);
        otherwise a light one. An inotify queue overflow asks for a full one at once."""
        count = 0
        while True:
            await asyncio.sleep(self.resync_seconds)
            count += 1
            watcher = self._watcher
            if count % FULL_RESCAN_EVERY == 0 or watcher is None or not watcher.trusted:
                self.rescan_soon()
            else:
                await self.rescan_changed()

    async def rescan_changed(self) -> None:
        """The light rescan: hint every folder whose directory stamp changed since the last
        look (a folder or file created, removed or renamed in it, the root included). A file
        rewritten in place moves no directory stamp: the next full rescan finds it."""
        orgs = {n.split("/", 1)[0] for n in self.catalog.names() if "/" in n}
        stamps = await asyncio.to_thread(dir_stamps, self.root, orgs)
        before, self._stamps = self._stamps, stamps
        if before is None:
            return
        tracked = {k.split("/", 1)[0] for k in before if "/" in k}
        for key in changed_stamps(before, stamps):
            org, _, child = key.partition("/")
            if child and org not in tracked and before.get(org) == stamps.get(org):
                continue  # an org first stamped now (the start-up scan knew no orgs yet)
            self.hints.put(Hint(tuple(key.split("/"))))

    # -- the drop directory -----------------------------------------------------------------
    def _watch_drop_dir(self) -> bool:
        """(Re)start the observer when the drop directory is new, replaced or the observer died.

        Returns False while the drop directory is missing. A missing drop directory (deleted,
        an unmounted network filesystem) is not taken to mean "every adapter was deleted":
        the catalog and the servers are left as they are until it is back.
        """
        try:
            st = self.root.stat()
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            if self.drop_dir_ok:
                log.error("drop_dir_missing", path=str(self.root))
                self.drop_dir_ok = False
                self.catalog.touch()
                self._drop_dir_probe = asyncio.get_running_loop().create_task(
                    self._await_drop_dir(), name="drop dir probe"
                )
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            return False
        if not self.drop_dir_ok:
            log.info("drop_dir_back", path=str(self.root))
            self.drop_dir_ok = True
            self.catalog.touch()
        root_id = (st.st_dev, st.st_ino)
        if self._watcher is None or not self._watcher.alive or root_id != self._root_id:
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            self._watcher = self._start_watcher()
            self._root_id = root_id
        return True

    def _start_watcher(self) -> Watcher | None:
        """The observer, or the polling one when the kernel refuses inotify (said once, and in
        /healthz); None when neither starts: rescans still run on their timer."""
        watcher = Watcher(
            self.root, self.hints, polling=self._polling, poll_seconds=self._poll_seconds
        )
        try:
            watcher.start()
        except OSError as err:
            if watcher.polling:
                self._watch_failed(f"the polling observer cannot start: {err}")
                return None
            advice = _WATCH_ADVICE.get(err.errno or 0, "")
            self._watch_failed(
                f"inotify cannot watch {self.root}: {err.strerror or err}"
                + (f" ({advice})" if advice else "")
                + "; using the polling observer meanwhile"
            )
            fallback = Watcher(self.root, self.hints, polling=True, poll_seconds=self._poll_seconds)
            try:
                fallback.start()
            except OSError as again:
                self._watch_failed(f"the polling observer cannot start either: {again}")
                return None
            return fallback
        if self.watch_problem is not None and not self._polling and not watcher.polling:
            log.info("watch_restored", path=str(self.root))
            self.watch_problem = None
        return watcher

    def _watch_failed(self, message: str) -> None:
        if message != self.watch_problem:
            log.error("watch_failed", path=str(self.root), message=message)
            self.watch_problem = message

    async def _await_drop_dir(self) -> None:
        """While the drop directory is missing, look for it every second."""
        # Polling on purpose: nothing can notify us of a directory that does not exist yet.
        while True:
            if await asyncio.to_thread(self.root.is_dir):
                self.rescan_soon()
                return
            await asyncio.sleep(1.0)

    # -- taking folders -----------------------------------------------------------------------
    async def rescan(self, published: frozenset[str] = frozenset()) -> None:
        """Re-read the whole drop directory (level-triggered: catches any lost event)."""
        if not self._watch_drop_dir():
            return
        orgs = {n.split("/", 1)[0] for n in self.catalog.names() if "/" in n}
        self._stamps, found = await asyncio.to_thread(_stamps_and_scan, self.root, orgs)
        for name in sorted(self.catalog.names() - set(found)):
            await self._isolated(name, self.refresh(name))
        # Batched: one thread call reads every fingerprint, and the folders due for inspection
        # are inspected and snapshotted RESCAN_BATCH per thread call. One by one, the thread
        # hand-offs (four per folder) took most of the time of a scan of thousands of folders.
        names = sorted(found)
        # The start-up scan logs one summary line instead of one `adapter_valid` per folder
        # (at 10,000 folders those lines were ~12 % of a restart); later scans log each change.
        startup = not self.catalog.complete
        started = time.monotonic()
        counts = dict.fromkeys(("valid", "invalid", "snapshot_failed"), 0)
        fps = await asyncio.to_thread(_read_fingerprints, self.root, names, found)
        del found  # 10,000 listings are megabytes: not kept through the inspections
        due = [
            (record, fp)
            for name, fp in zip(names, fps, strict=True)
            if (record := self._observe(name, fp, published=name in published)) is not None
        ]
        unchanged = len(names) - len(due)
        self.scan_progress = (unchanged, len(names))
        for start in range(0, len(due), RESCAN_BATCH):
            batch = due[start : start + RESCAN_BATCH]
            try:
                checked = await _off_loop(self._check_all, [r for r, _ in batch])
            except Stopped:
                return
            for (record, fp), outcome in zip(batch, checked, strict=True):
                counts[_kind(outcome)] += 1
                await self._isolated(record.name, self._take(record, fp, outcome, quiet=startup))
            self.scan_progress = (unchanged + start + len(batch), len(names))
        if startup:
            await asyncio.to_thread(self.verdicts.prune, set(names))
            log.info(
                "startup_scan_done",
                folders=len(names),
                **counts,
                seconds=round(time.monotonic() - started, 3),
            )
        self.catalog.mark_complete()

    async def apply(self, hints: list[Hint]) -> None:
        """Take a batch of hints: the folders they name, or a full rescan."""
        published: dict[str, bool] = {}
        full = False
        for hint in hints:
            names = await asyncio.to_thread(resolve_hint, self.root, hint)
            if names is None:
                full = True
                continue
            if not (self.root / hint.parts[0]).exists():
                prefix = hint.parts[0] + "/"
                names += [n for n in self.catalog.names() if n.startswith(prefix)]
            elif hint.parts[0] in self.catalog.names() and hint.parts[0] not in names:
                names.append(hint.parts[0])  # an adapter folder that may have become an org
            for name in names:
                # A rename publishes the folder it names (or an org's adapters below it),
                # never the adapter that a renamed sub-folder sits in.
                under = tuple(name.split("/"))[: len(hint.parts)] == hint.parts
                published[name] = published.get(name, False) or (hint.published and under)
        if full:
            await self.rescan(frozenset(n for n, p in published.items() if p))
            return
        for name, was_published in published.items():
            await self._isolated(name, self.refresh(name, published=was_published))

    async def _isolated(self, name: str, step: Awaitable[None]) -> None:
        """Run one folder's step; a failure is that folder's alone."""
        try:
            await step
        except Exception:  # one folder must never starve the others: log it, go on
            log.exception("adapter_intake_failed", adapter=name)

    async def refresh(self, name: str, *, published: bool = False) -> None:
        """Bring one adapter's record up to date with its folder."""
        fp = await asyncio.to_thread(_read_fingerprint, self.root, name)
        record = self._observe(name, fp, published=published)
        if record is not None:
            try:
                checked = await _off_loop(self._check, record)
            except Stopped:
                return
            await self._take(record, fp, checked)

    def _observe(
        self, name: str, fp: Fingerprint | None, *, published: bool
    ) -> AdapterRecord | None:
        """Take the folder's fingerprint into its record; the record when it is due for
        inspection now (new or changed, and settled or published)."""
        record = self.catalog.get(name)
        if fp is None and not self.root.is_dir():
            self.rescan_soon()  # the drop directory itself is gone: see _watch_drop_dir
            return None
        if fp is None:
            self._settler.forget(name)
            self._cancel_timer(name)
            if record is not None:
                self.catalog.remove(name)
                self.verdicts.forget(name)
                log.info("adapter_removed", adapter=name)
            return None
        if record is None:
            record = AdapterRecord(name=name, source_path=self.root / name)
            self.catalog.add(record)
        elif record.fingerprint == fp and not record.settling:
            # Permissions are not in the fingerprint: an unreadable folder is inspected again
            # on every hint and rescan (without settling again: its content did not change),
            # so the chmod/chown that fixes it is taken.
            return record if record.reason == Reason.UNREADABLE else None
        if not record.settling:
            record.settling = True
            record.changed_at = time.time()
            record.changed_mono = time.monotonic()
            self.catalog.touch()
        if not self._settler.observe(
            name, fp, now=time.monotonic(), wall=time.time(), published=published
        ):
            self._recheck_at(name, self._settler.due(name))
            return None
        return record

    def _recheck_at(self, name: str, due: float | None) -> None:
        if due is None:
            return
        self._cancel_timer(name)
        delay = max(due - time.monotonic(), 0) + 0.05
        self._timers[name] = asyncio.get_running_loop().call_later(delay, self._fire, name)

    def _fire(self, name: str) -> None:
        self._timers.pop(name, None)
        self.hints.put(Hint(tuple(name.split("/"))))

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _check(self, record: AdapterRecord, *, durable: bool = True) -> Checked:
        """Inspect the folder and, when valid, snapshot it (blocking: runs in a thread)."""
        if self._stopping.is_set():
            raise Stopped
        folder, name = record.source_path, record.name
        recalled = self.verdicts.recall(folder, name)
        if recalled is not None:  # unchanged since it was inspected: no inspection, no read
            valid, digest = recalled
            found = self.store.find(valid, digest, durable=durable)
            if found is not None:
                return valid, found
        key, inspected_ns = stat_key(folder, name), time.time_ns()
        result = inspect_adapter(folder, root=self.root, rules=self.rules, name=name)
        if isinstance(result, Invalid):
            return result, None
        try:
            made = self.store.create(result, self.rules, durable=durable)
        except SnapshotError as err:
            return result, err
        self.verdicts.remember(result, made.digest, key, inspected_ns=inspected_ns)
        return result, made

    def _check_all(self, records: list[AdapterRecord]) -> list[Checked]:
        """`_check` a rescan's batch; the snapshots made are synced together, one `syncfs`
        instead of three fsyncs per snapshot (most of a cold start's copying time)."""
        checked = [self._check(record, durable=False) for record in records]
        self.store.sync(made for _, made in checked if isinstance(made, Snapshot))
        return checked

    async def _take(
        self, record: AdapterRecord, fp: object, checked: Checked, *, quiet: bool = False
    ) -> None:
        """Write what `_check` found into the record; `quiet` logs a valid adapter at debug
        level (the start-up scan, which sums them up in one line)."""
        name = record.name
        result, made = checked
        record.settling = False
        if isinstance(result, Invalid):
            self.metrics.inspections.labels("invalid").inc()
            record.fingerprint = fp
            record.validated_at = time.time()
            record.reason, record.message = result.reason, result.message
            if record.snapshot is not None:
                # The last valid version stays served until the folder is valid again or is
                # deleted (an in-place copy that stalled past the settle period, a bad edit):
                # unloading it would make every request 404 until someone fixes the folder.
                log.warning(
                    "adapter_update_invalid",
                    adapter=name,
                    reason=result.reason,
                    message=result.message,
                    serving=str(record.snapshot.path),
                )
                self.catalog.touch()
                return
            log.warning(
                "adapter_invalid", adapter=name, reason=result.reason, message=result.message
            )
            self.catalog.set_snapshot(record, None)
            return
        self.metrics.inspections.labels("valid").inc()
        if isinstance(made, SnapshotError):
            if made.reason == SnapshotReason.SOURCE_CHANGED:
                record.settling = True  # it is still being written: settle again
                self._recheck_at(name, time.monotonic() + self.settle_seconds)
                self.catalog.touch()
                return
            record.validated_at = None
            record.reason, record.message = made.reason, made.message
            log.error("snapshot_failed", adapter=name, reason=made.reason, message=made.message)
            # Fingerprint not recorded: the next rescan tries again. A snapshot that exists
            # stays served meanwhile.
            self.catalog.touch()
            return
        snap = made
        assert snap is not None  # a valid folder always comes with a snapshot or an error
        record.fingerprint = fp
        record.validated_at = time.time()
        record.reason = record.message = None
        previous = record.snapshot
        self.catalog.set_snapshot(record, snap, adapter=result, seen_at=_made_at(snap))
        if previous is None or previous.path != snap.path:
            (log.debug if quiet else log.info)(
                "adapter_valid",
                adapter=name,
                digest=snap.digest,
                rank=result.rank,
                snapshot=str(snap.path),
                replaces=str(previous.path) if previous else None,
            )


def _made_at(snap: Snapshot) -> float:
    """When this content was first seen: its snapshot was made then (lorawarm writes the
    snapshot directory, so unlike the folder's mtimes this is not up to whoever copied it)."""
    try:
        return os.stat(snap.path).st_mtime
    except OSError:
        return time.time()


async def _off_loop(func: Callable[[A], T], arg: A) -> T:
    """`func(arg)` in a thread of its own that does not hold up the process's exit.

    Inspections and snapshot copies run here, not in asyncio's executor, whose threads
    `asyncio.run` waits for: a stop must not wait for a copy of a multi-GB adapter. A copy
    abandoned at exit leaves only a staging folder, which collection removes (as after a
    SIGKILL).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = func(arg)
        except Exception as err:  # noqa: BLE001 - re-raised in the awaiting coroutine
            deliver = functools.partial(_fail, done, err)
        else:
            deliver = functools.partial(_succeed, done, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
            loop.call_soon_threadsafe(deliver)

    threading.Thread(target=work, name="lorawarm-intake", daemon=True).start()
    return await done


def _succeed(done: asyncio.Future[T], result: T) -> None:
    if not done.done():  # else the caller was cancelled (a stop): nobody waits for it
        done.set_result(result)


def _fail(done: asyncio.Future[T], error: Exception) -> None:
    if not done.done():
        done.set_exception(error)


def _stamps_and_scan(
    root: Path, orgs: set[str]
) -> tuple[dict[str, Stamp], dict[str, list[os.DirEntry[str]] | None]]:
    # The stamps first: a change made while the scan runs differs from them at the next look.
    stamps = dir_stamps(root, orgs)
    return stamps, scan(root)


def _kind(checked: Checked) -> str:
    """How a checked folder counts in the start-up scan's summary."""
    result, made = checked
    if isinstance(result, Invalid):
        return "invalid"
    return "snapshot_failed" if isinstance(made, SnapshotError) else "valid"


def _read_fingerprint(root: Path, name: str) -> Fingerprint | None:
    """The folder's fingerprint; None when it is gone or is no adapter (an org folder)."""
    folder = root / name
    fp = fingerprint(folder)
    if fp and "/" not in name and is_org(folder):
        fp = None  # it holds `org/name` adapters now: there is no adapter `name` any more
    return fp


def _read_fingerprints(
    root: Path, names: list[str], listings: dict[str, list[os.DirEntry[str]] | None]
) -> list[Fingerprint | None]:
    # `scan` has just told these adapters from org folders (no second `is_org` look) and
    # listed the top-level ones: at 10,000 folders a second listing of each was a third of
    # every periodic rescan. Plain strings: a Path per folder was another tenth.
    base = os.fspath(root)
    return [
        fingerprint(f"{base}/{name}")
        if (listing := listings[name]) is None
        else fingerprint_of(listing)
        for name in names
    ]
