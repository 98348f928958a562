"""The sync stage: keeps the drop directory's synced folders equal to the sources.

Every `source_poll_seconds` (and on SIGHUP) each source is listed; a new or changed adapter
(by the ETag and size of each of its objects) is downloaded and published by rename (`fetch`),
an adapter gone from a source that listed fine is removed, but only a folder lorawarm published
(`manifest`). It writes only the drop directory (as a user would) and its manifest; the intake
takes it from there. It is the only writer of its status (`SourceStatus`), which the status API
reads.

Guards: a listing that fails removes nothing; neither does a removal of more than half of a
source's synced adapters when that is more than `MASS_REMOVAL` of them, until confirmed by
creating `<state>/sources/confirm-removal`. A name that also exists as a folder lorawarm did not
publish is a conflict: the local folder wins. Failed downloads retry with per-adapter backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from lorawarm.logs import get_logger
from lorawarm.sources.bucket import Listing, ObjectInfo, SourceError, list_source, make_client
from lorawarm.sources.fetch import fetch_adapter, tokens
from lorawarm.sources.location import SourceUrl
from lorawarm.sources.manifest import Entry, Manifest, folder_id
from lorawarm.sources.publish import clean_staging, name_lock, remove

log = get_logger(__name__)

MASS_REMOVAL = 10
CONFIRM_FILE = "confirm-removal"


class SourceMetrics:
    """The sources' Prometheus metrics, in the daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.up = Gauge(
            "lorawarm_source_up",
            "1 when the source's last listing and downloads succeeded.",
            ["source"],
            registry=r,
        )
        self.listings = Counter(
            "lorawarm_source_listings", "Listings of a source.", ["source"], registry=r
        )
        self.downloads = Counter(
            "lorawarm_source_downloads",
            "Adapters downloaded from a source.",
            ["source"],
            registry=r,
        )
        self.bytes = Counter(
            "lorawarm_source_bytes", "Bytes downloaded from a source.", ["source"], registry=r
        )
        self.removals = Counter(
            "lorawarm_source_removals",
            "Synced adapter folders removed because their source no longer has them.",
            ["source"],
            registry=r,
        )
        self.failures = Counter(
            "lorawarm_source_failures",
            "Failed listings and downloads of a source, by condition.",
            ["source", "condition"],
            registry=r,
        )


@dataclass
class SourceStatus:
    """What the status API shows of one source (written only by `SourceSync`)."""

    url: str
    condition: str = "pending"
    message: str | None = None
    since: float = field(default_factory=time.time)
    last_listing: float | None = None
    last_error: str | None = None
    listed: int = 0  # adapters the last listing found
    synced: int = 0  # of those, published and current
    waiting: int = 0  # not taken yet (incomplete, too large, bad names): see skipped
    skipped: dict[str, str] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    held_removals: int = 0
    listings: int = 0
    downloads: int = 0
    bytes: int = 0
    removals: int = 0
    failures: int = 0

    def set_condition(self, condition: str, message: str | None) -> None:
        if condition != self.condition:
            self.since = time.time()
        self.condition, self.message = condition, message


@dataclass
class _Retry:
    attempts: int
    not_before: float
    condition: str
    source: str


class SourceSync:
    """One stage for all sources; runs on the daemon's loop, blocking calls in threads."""

    def __init__(
        self,
        sources: Sequence[str],
        drop: Path,
        state_dir: Path,
        registry: CollectorRegistry,
        *,
        poll_seconds: float,
        concurrency: int,
        timeout: float,
        max_bytes: int,
        max_backoff: float,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        from lorawarm.sources.location import parse_source

        self.sources: list[SourceUrl] = [parse_source(s) for s in sources]
        self.drop = Path(os.path.abspath(drop))
        self.state_dir = Path(os.path.abspath(state_dir))
        self.manifest = Manifest(self.state_dir)
        self.metrics = SourceMetrics(registry)
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        self.max_bytes = max_bytes
        self.max_backoff = max_backoff
        self._factory = client_factory or (
            lambda: make_client(timeout=timeout, connections=concurrency)
        )
        self.status: dict[str, SourceStatus] = {s.url: SourceStatus(s.url) for s in self.sources}
        self._entries: dict[str, Entry] = {}
        self._retries: dict[str, _Retry] = {}
        self._wake: asyncio.Event | None = None
        self._client: Any = None
        self._stopping = threading.Event()

    # -- what the status API reads ----------------------------------------------------------
    def source_of(self, name: str) -> str | None:
        """The source URL adapter `name` was synced from; None for a hand-dropped folder."""
        entry = self._entries.get(name)
        return entry.source if entry is not None else None

    def statuses(self) -> list[SourceStatus]:
        return [self.status[s.url] for s in self.sources]

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        """Abandon downloads in flight (their threads stop after the chunk at hand)."""
        self._stopping.set()

    def sync_soon(self) -> None:
        """What SIGHUP does: list every source now."""
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """List and sync until cancelled."""
        self._wake = asyncio.Event()
        slots = asyncio.Semaphore(self.concurrency)
        while True:
            await self.sync_once(slots)
            delay = self.poll_seconds
            if self._retries:
                soonest = min(r.not_before for r in self._retries.values()) - time.monotonic()
                delay = max(0.05, min(delay, soonest))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()

    def _start(self) -> None:
        """The first pass's blocking preparation: the client, the manifest, old staging."""
        self._client = self._factory()
        clean_staging(self.drop)
        self._entries = self.manifest.entries()

    async def sync_once(self, slots: asyncio.Semaphore | None = None) -> None:
        """One pass: list every source, download what changed, remove what is gone."""
        slots = slots or asyncio.Semaphore(self.concurrency)
        if self._client is None:
            await asyncio.to_thread(self._start)
        listings: dict[str, Listing] = {}
        for source in self.sources:
            listing = await self._list(source)
            if listing is not None:
                listings[source.url] = listing
        wanted: dict[str, tuple[SourceUrl, dict[str, ObjectInfo]]] = {}
        conflicts: dict[str, list[str]] = {s.url: [] for s in self.sources}
        for source in self.sources:
            listing = listings.get(source.url)
            if listing is None:
                continue
            for name, objects in listing.adapters.items():
                if name in wanted:
                    conflicts[source.url].append(name)  # an earlier source has it
                else:
                    wanted[name] = (source, objects)
        jobs = []
        synced: dict[str, int] = {s.url: 0 for s in self.sources}
        now = time.monotonic()
        for name, (source, objects) in wanted.items():
            state = self._local(name)
            if state == "foreign":
                conflicts[source.url].append(name)
                continue
            entry = self._entries.get(name)
            if state == "ours" and entry is not None and entry.same_objects(tokens(objects)):
                synced[source.url] += 1
                self._retries.pop(name, None)
                continue
            retry = self._retries.get(name)
            if retry is not None and retry.not_before > now:
                continue
            jobs.append(self._download(slots, source, name, objects))
        results = await asyncio.gather(*jobs)
        for url in synced:
            synced[url] += sum(1 for r in results if r == url)
        for source in self.sources:
            listing = listings.get(source.url)
            status = self.status[source.url]
            if listing is None:
                continue
            status.conflicts = sorted(conflicts[source.url])[:100]
            await self._remove_gone(source, listing, status)
            status.synced = synced[source.url]
            failing = [r for r in self._retries.values() if r.source == source.url]
            if failing:
                worst = failing[0]
                self._set(source, worst.condition, status.last_error)
            elif status.held_removals:
                self._set(source, "removal_held", status.message)
            else:
                self._set(source, "ok", None)
        for name in [n for n in self._retries if n not in wanted]:
            del self._retries[name]

    # -- steps ------------------------------------------------------------------------------
    def _set(self, source: SourceUrl, condition: str, message: str | None) -> None:
        self.status[source.url].set_condition(condition, message)
        up = condition in ("ok", "removal_held")
        self.metrics.up.labels(source.url).set(1 if up else 0)

    async def _list(self, source: SourceUrl) -> Listing | None:
        status = self.status[source.url]
        self.metrics.listings.labels(source.url).inc()
        status.listings += 1
        started = time.monotonic()
        try:
            listing = await asyncio.to_thread(
                list_source, self._client, source, max_bytes=self.max_bytes
            )
        except SourceError as err:
            self._fail(source, err, what="listing")
            return None
        status.last_listing = time.time()
        status.listed = len(listing.adapters)
        status.waiting = len(listing.skipped)
        status.skipped = {n: f"{r}: {m}" for n, (r, m) in sorted(listing.skipped.items())[:100]}
        log.debug(
            "source_listed",
            source=source.url,
            adapters=len(listing.adapters),
            keys=listing.keys,
            requests=listing.requests,
            seconds=round(time.monotonic() - started, 3),
        )
        return listing

    def _fail(self, source: SourceUrl, err: SourceError, *, what: str, name: str = "") -> None:
        status = self.status[source.url]
        status.failures += 1
        status.last_error = f"{what}{' of ' + name if name else ''}: {err.condition}: {err.message}"
        self.metrics.failures.labels(source.url, err.condition).inc()
        if what == "listing":
            self._set(source, err.condition, err.message)
        log.warning(
            "source_failed",
            source=source.url,
            what=what,
            adapter=name or None,
            condition=err.condition,
            error=err.message,
        )

    def _local(self, name: str) -> str:
        """`absent`, `ours` (a folder lorawarm published) or `foreign` (a user's)."""
        current = folder_id(self.drop / name)
        if current is None:
            return "absent"
        entry = self._entries.get(name)
        if entry is None or not entry.owns(current):
            # The plugin (another process) may have published it since: read its entry.
            fresh = self.manifest.get(name)
            if fresh is None or not fresh.owns(current):
                return "foreign"
            self._entries[name] = entry = fresh
        return "ours"

    async def _download(
        self,
        slots: asyncio.Semaphore,
        source: SourceUrl,
        name: str,
        objects: dict[str, ObjectInfo],
    ) -> str | None:
        async with slots:
            started = time.monotonic()
            try:
                size, entry = await asyncio.to_thread(
                    fetch_adapter,
                    self._client,
                    source,
                    name,
                    objects,
                    drop=self.drop,
                    state_dir=self.state_dir,
                    manifest=self.manifest,
                    stopping=self._stopping.is_set,
                )
            except SourceError as err:
                if err.condition in ("conflict", "stopped"):
                    return None
                retry = self._retries.get(name)
                attempts = 1 + (retry.attempts if retry else 0)
                delay = min(self.max_backoff, 0.5 * 2**attempts) * random.uniform(0.8, 1.2)  # noqa: S311
                self._retries[name] = _Retry(
                    attempts, time.monotonic() + delay, err.condition, source.url
                )
                self._fail(source, err, what="download", name=name)
                return None
            except OSError as err:
                retry = self._retries.get(name)
                attempts = 1 + (retry.attempts if retry else 0)
                delay = min(self.max_backoff, 0.5 * 2**attempts)
                self._retries[name] = _Retry(
                    attempts, time.monotonic() + delay, "local_error", source.url
                )
                self._fail(source, SourceError("local_error", str(err)), what="download", name=name)
                return None
        self._retries.pop(name, None)
        if entry is not None:
            self._entries[name] = entry
        status = self.status[source.url]
        if size:
            status.downloads += 1
            status.bytes += size
            self.metrics.downloads.labels(source.url).inc()
            self.metrics.bytes.labels(source.url).inc(size)
            log.info(
                "adapter_synced",
                adapter=name,
                source=source.url,
                bytes=size,
                seconds=round(time.monotonic() - started, 3),
            )
        return source.url

    async def _remove_gone(self, source: SourceUrl, listing: Listing, status: SourceStatus) -> None:
        ours = [n for n, e in self._entries.items() if e.source == source.url]
        gone = [n for n in ours if n not in listing.adapters and n not in listing.skipped]
        confirm = self.state_dir / "sources" / CONFIRM_FILE
        if len(gone) > MASS_REMOVAL and len(gone) * 2 > len(ours):
            if not confirm.exists():
                if status.held_removals != len(gone):
                    log.warning(
                        "source_removal_held",
                        source=source.url,
                        removals=len(gone),
                        synced=len(ours),
                        confirm=str(confirm),
                    )
                status.held_removals = len(gone)
                status.message = (
                    f"{len(gone)} of {len(ours)} synced adapters are gone from the source; "
                    f"nothing removed. If that is intended, create {confirm}"
                )
                return
            log.warning("source_removal_confirmed", source=source.url, removals=len(gone))
        status.held_removals = 0
        with contextlib.suppress(OSError):
            confirm.unlink()
        for name in gone:
            try:
                removed = await asyncio.to_thread(self._remove, name)
            except OSError as err:
                self._fail(source, SourceError("local_error", str(err)), what="removal", name=name)
                continue
            self._entries.pop(name, None)
            if removed:
                status.removals += 1
                self.metrics.removals.labels(source.url).inc()
                log.info("adapter_unsynced", adapter=name, source=source.url)

    def _remove(self, name: str) -> bool:
        with name_lock(self.state_dir, name):
            entry = self.manifest.get(name) or self._entries.get(name)
            removed = False
            if entry is not None and entry.owns(folder_id(self.drop / name)):
                remove(self.drop, name)
                removed = True
            self.manifest.delete(name)
            return removed
