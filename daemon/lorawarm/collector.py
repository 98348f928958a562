"""Collector: removes snapshots that nobody uses and nobody may still read.

It asks every `SnapshotUser` (the catalog, each server's reconciler) which snapshot paths it
uses now and which it released when. A snapshot is kept while any user holds it, and for
`grace` seconds after the last one released it: requests vLLM accepted before an unload still
carry the old path and re-read it if the adapter was evicted from vLLM's CPU cache
(vllm#5105). Snapshots made less than `grace` ago are kept too (the plugin may be about to
hand one to vLLM).

A server that was never listed may be reading any snapshot: collection waits for it, but only
for `grace` seconds after the collector started (a decommissioned URL left in the settings
must not stop collection for good); while it waits, `held` says so and why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from lorawarm.logs import get_logger
from lorawarm.metrics import Metrics
from lorawarm.snapshot import SnapshotStore

log = get_logger(__name__)

# How often the collector looks whether something was released (a few integer compares).
POLL_SECONDS = 1.0
# The periodic walk (snapshots past their creation grace, abandoned staging folders) runs at
# most this often: it lists every snapshot on disk, ~1 s at 10,000.
PERIODIC_SECONDS = 10.0


class SnapshotUser(Protocol):
    """Something that may make vLLM read a snapshot."""

    @property
    def listed(self) -> bool:
        """It knows what it uses (a server: it answered a listing once)."""
        ...

    def snapshots_in_use(self) -> set[str]: ...

    def released(self) -> Mapping[str, float]:
        """Paths it stopped using, with the wall time it did."""
        ...

    def forget_released(self, paths: Iterable[str]) -> None:
        """The collector is done with these (removed, or past their grace)."""
        ...


class Collector:
    """Runs `collect()` when something was released and its grace is over, and periodically."""

    def __init__(
        self,
        store: SnapshotStore,
        catalog: SnapshotUser,
        servers: Mapping[str, SnapshotUser],
        metrics: Metrics,
        *,
        grace: float,
        lock: asyncio.Lock,
    ) -> None:
        self.store = store
        self.servers = servers  # by URL
        self.users = [catalog, *servers.values()]
        self.metrics = metrics
        self.grace = grace
        self.held: dict[str, str] = {}  # server URL -> why collection waits for it
        self.last_removed: list[Path] = []
        self._lock = lock  # held by the intake while it may reuse a snapshot
        self._started = time.monotonic()
        self._next = 0.0  # monotonic time of the next periodic run
        self._first = True

    async def run(self) -> None:
        """Collect whenever due; runs until cancelled."""
        while True:
            if self._due():
                async with self._lock:
                    await self.collect()
            await asyncio.sleep(min(POLL_SECONDS, max(self.grace, 0.05)))

    def _due(self) -> bool:
        """Periodically (snapshots past their creation grace), or as soon as a released
        snapshot's grace is over."""
        if time.monotonic() >= self._next:
            return True
        expired = time.time() - self.grace
        return any(at <= expired for u in self.users for at in u.released().values())

    def _holding(self) -> dict[str, str]:
        waited = time.monotonic() - self._started
        return {
            name: f"never listed: collection waits for it up to {self.grace:g} s after start"
            for name, user in self.servers.items()
            if not user.listed and waited < self.grace
        }

    async def collect(self) -> Sequence[Path]:
        """Remove what may go now; returns what was removed."""
        self.held = self._holding()
        for name in self.servers:
            self.metrics.collection_held.labels(name).set(1 if name in self.held else 0)
        if self.held:
            self._next = time.monotonic() + POLL_SECONDS  # look again soon
            return []
        self._next = time.monotonic() + max(self.grace, PERIODIC_SECONDS)
        now = time.time()
        keep: set[str] = set()
        for user in self.users:
            keep |= user.snapshots_in_use()
            for path, at in user.released().items():
                if now - at < self.grace:
                    keep.add(path)
        started = time.monotonic()
        try:
            # In a thread: walking 10,000 snapshots took seconds, and the status API with it.
            # Nothing can start to use an unreferenced snapshot meanwhile: the intake waits for
            # the lock the caller holds, and servers load only what the catalog points to.
            removed = await asyncio.to_thread(
                self.store.collect, [Path(p) for p in keep], grace=self.grace
            )
        except OSError as err:
            log.warning("snapshot_collect_failed", error=str(err))
            return []
        for user in self.users:
            # Past its grace and not removed: still in use elsewhere, or gone already.
            user.forget_released([p for p, at in user.released().items() if now - at >= self.grace])
        self.last_removed = list(removed)
        first, self._first = self._first, False
        if removed or first:  # the start-up one is reported even when nothing went
            log.info(
                "snapshots_collected",
                removed=[str(p) for p in removed][:20],
                count=len(removed),
                seconds=round(time.monotonic() - started, 3),
            )
        return removed
