"""Catalog: what lorawarm knows of every adapter folder, and the warm set it implies.

One `AdapterRecord` per adapter name found in the drop directory: the last inspection verdict
and the snapshot vLLM should load. Its only writer is the intake (`lorawarm.intake`), on the
asyncio loop. Every change bumps `Catalog.version` (what the status shows) and a change of a
snapshot also `warm_version` (what the servers should hold), so that readers can tell in O(1)
whether anything changed; the warm set is computed once per `warm_version`, not once per load,
and subscribed events (the reconcilers') are set when it changes.

What an adapter is on each server is not stored here: each server's reconciler owns that and
answers `outcome(record)`; `adapter_state` joins the two when the status is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from lorawarm.inspection import Reason, Valid
from lorawarm.snapshot import Snapshot, SnapshotReason
from lorawarm.vllm_client import Condition


class AdapterState(StrEnum):
    """Where an adapter stands overall (the status API's `state`)."""

    SETTLING = "settling"  # found, waiting for the copy to finish
    INVALID = "invalid"  # inspection refused it: `reason` and `message` say why
    FAILED = "failed"  # valid, but a snapshot or a server load failed: see `reason`
    PENDING = "pending"  # valid and snapshotted, not yet loaded on every server
    LOADED = "loaded"  # loaded on every configured server
    COLD = "cold"  # valid, but outside the warm set: deliberately not loaded
    INCOMPATIBLE = "incompatible"  # valid, but no configured server can take it


class ServerState(StrEnum):
    """Where an adapter stands on one server."""

    PENDING = "pending"
    LOADED = "loaded"
    FAILED = "failed"
    COLD = "cold"
    INCOMPATIBLE = "incompatible"  # this server cannot take it (`reason` says why)


@dataclass(frozen=True)
class ServerAdapter:
    """One adapter on one server, as that server's reconciler sees it now."""

    state: ServerState = ServerState.PENDING
    attempts: int = 0
    last_error: str | None = None
    condition: Condition | None = None
    loaded_path: str | None = None
    loaded_at: float | None = None
    reason: str | None = None  # why INCOMPATIBLE (a stable code)
    warnings: tuple[str, ...] = ()  # e.g. base_model_differs: served, but worth a look
    resident: bool | None = None  # in the engine's memory now; None: not known


@dataclass
class AdapterRecord:
    """One adapter folder. `snapshot` is what vLLM is given: the last content that was valid.

    `reason`/`message` say why the folder's *current* content is not served. With no snapshot
    that makes the adapter invalid (or failed, for a snapshot error); with one, the previous
    valid version stays served until the folder is valid again or deleted (an update that is
    invalid, or whose snapshot cannot be written).
    """

    name: str
    source_path: Path
    first_seen: float = field(default_factory=time.time)
    changed_at: float = field(default_factory=time.time)
    changed_mono: float = field(default_factory=time.monotonic)
    settling: bool = True
    reason: Reason | SnapshotReason | None = None
    message: str | None = None
    snapshot: Snapshot | None = None
    # The verdict of the snapshot's content (what per-server judging reads), and when that
    # content was first seen (the snapshot's making: it orders the warm set, newest first).
    adapter: Valid | None = None
    seen_at: float = 0.0
    validated_at: float | None = None
    fingerprint: object = None

    @property
    def servable(self) -> bool:
        """It has a snapshot vLLM may load (maybe an older one than the folder holds now)."""
        return self.snapshot is not None


def adapter_state(record: AdapterRecord, per_server: Sequence[ServerAdapter]) -> AdapterState:
    """The overall state: the record's verdict joined with what each server says of it."""
    if record.snapshot is None:
        if record.reason is None:
            return AdapterState.SETTLING
        if isinstance(record.reason, SnapshotReason):
            return AdapterState.FAILED
        return AdapterState.INVALID
    states = [s.state for s in per_server if s.state is not ServerState.INCOMPATIBLE]
    if per_server and not states:
        return AdapterState.INCOMPATIBLE
    if states and all(s is ServerState.LOADED for s in states):
        return AdapterState.LOADED
    if any(s is ServerState.FAILED for s in states):
        return AdapterState.FAILED
    if states and all(s is ServerState.COLD for s in states):
        return AdapterState.COLD
    return AdapterState.PENDING


class Catalog:
    """All records, and the order adapters are warmed in: pinned first, then newest first.

    Which of them each server holds is that server's reconciler's business (what fits there,
    how many its memory keeps); the catalog only keeps the order, computed once per change.
    """

    def __init__(self, *, pinned: Iterable[str], complete: bool = True) -> None:
        """`complete=False` for a catalog that a first scan is still filling (the daemon's):
        until `mark_complete()`, a name missing here may just not have been reached yet."""
        self.pinned = list(pinned)
        self.version = 0
        self.warm_version = 0
        self.complete = complete  # an adapter missing here is deleted (not just not seen yet)
        self._subscribers: list[asyncio.Event] = []
        self._records: dict[str, AdapterRecord] = {}
        self._released: dict[str, float] = {}  # snapshot path -> when no record pointed to it
        self._paths: dict[str, int] = {}  # snapshot path -> records pointing to it
        self._ordered_at = -1
        self._ordered: list[AdapterRecord] = []
        self._sorted_at = -1
        self._sorted: list[AdapterRecord] = []

    def __iter__(self) -> Iterator[AdapterRecord]:
        return iter(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def get(self, name: str) -> AdapterRecord | None:
        return self._records.get(name)

    def names(self) -> set[str]:
        return set(self._records)

    def by_name(self) -> list[AdapterRecord]:
        """Every record sorted by name (kept until the next change)."""
        if self._sorted_at != self.version:
            self._sorted = sorted(self._records.values(), key=lambda r: r.name)
            self._sorted_at = self.version
        return self._sorted

    # -- writes (the intake only) ---------------------------------------------------------
    def subscribe(self, event: asyncio.Event) -> None:
        """Set `event` whenever the warm set may have changed."""
        self._subscribers.append(event)

    def add(self, record: AdapterRecord) -> None:
        self._records[record.name] = record
        self._hold(record.snapshot)
        self._bump(warm=record.snapshot is not None)

    def remove(self, name: str) -> AdapterRecord | None:
        record = self._records.pop(name, None)
        if record is not None:
            self._release(record.snapshot)
            self._bump(warm=record.snapshot is not None)
        return record

    def set_snapshot(
        self,
        record: AdapterRecord,
        snapshot: Snapshot | None,
        *,
        adapter: Valid | None = None,
        seen_at: float = 0.0,
    ) -> None:
        """Point `record` at another snapshot (or none), made of content `adapter` first seen
        at `seen_at` (wall time: it orders the warm set); the old snapshot is released now."""
        if snapshot is None:
            adapter = None
        if record.snapshot == snapshot:
            moved = snapshot is not None and (record.seen_at, record.adapter) != (seen_at, adapter)
            if snapshot is not None:
                record.adapter, record.seen_at = adapter, seen_at
            self._bump(warm=moved)
            return
        self._release(record.snapshot)
        record.snapshot = snapshot
        record.adapter, record.seen_at = adapter, seen_at
        self._hold(snapshot)
        self._bump(warm=True)

    def mark_complete(self) -> None:
        """The first full scan is done: from now on an adapter missing here is deleted."""
        if not self.complete:
            self.complete = True
            self._bump(warm=True)

    def touch(self) -> None:
        """A record changed in a way only the status shows (verdict, settling)."""
        self._bump(warm=False)

    def _bump(self, *, warm: bool) -> None:
        self.version += 1
        if warm:
            self.warm_version += 1
            for event in self._subscribers:
                event.set()

    def _hold(self, snapshot: Snapshot | None) -> None:
        if snapshot is not None:
            path = str(snapshot.path)
            self._paths[path] = self._paths.get(path, 0) + 1
            self._released.pop(path, None)

    def _release(self, snapshot: Snapshot | None) -> None:
        if snapshot is None:
            return
        path = str(snapshot.path)
        left = self._paths.get(path, 0) - 1
        if left > 0:
            self._paths[path] = left
            return
        self._paths.pop(path, None)
        self._released[path] = time.time()

    # -- reads ------------------------------------------------------------------------------
    def ordered(self) -> Sequence[AdapterRecord]:
        """Every servable record in warm order: pinned first (in their order), then newest
        first by when their content was first seen, then by name; computed once per change."""
        if self._ordered_at != self.warm_version:
            valid = {r.name: r for r in self._records.values() if r.snapshot is not None}
            order = [valid[n] for n in self.pinned if n in valid]
            pinned = {r.name for r in order}
            order.extend(
                sorted(
                    (r for r in valid.values() if r.name not in pinned),
                    key=lambda r: (-r.seen_at, r.name),
                )
            )
            self._ordered = order
            self._ordered_at = self.warm_version
        return self._ordered

    # -- the collector's protocol -----------------------------------------------------------
    @property
    def listed(self) -> bool:
        return True

    def snapshots_in_use(self) -> set[str]:
        """Every snapshot path a record points to."""
        return set(self._paths)

    def released(self) -> Mapping[str, float]:
        """Snapshot paths no record points to any more, with the wall time that happened."""
        return self._released

    def forget_released(self, paths: Iterable[str]) -> None:
        """The collector removed these: nothing to remember of them."""
        for path in paths:
            self._released.pop(path, None)
