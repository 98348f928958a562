"""Catalog: what lorawarm knows of every adapter folder, and the warm set it implies.

One `AdapterRecord` per adapter name found in the drop directory. The record holds the last
inspection verdict and the snapshot vLLM should load; each server's reconciler writes its own
`ServerAdapter` entry (loaded, failed, ...). The catalog is owned by the asyncio loop: it is
never touched from another thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from lorawarm.snapshot import Snapshot


class AdapterState(StrEnum):
    """Where an adapter stands overall (the status API's `state`)."""

    SETTLING = "settling"  # found, waiting for the copy to finish
    INVALID = "invalid"  # inspection refused it: `reason` and `message` say why
    FAILED = "failed"  # valid, but a snapshot or a server load failed: see `reason`
    PENDING = "pending"  # valid and snapshotted, not yet loaded on every server
    LOADED = "loaded"  # loaded on every configured server
    COLD = "cold"  # valid, but outside the warm limit: deliberately not loaded


class ServerState(StrEnum):
    """Where an adapter stands on one server."""

    PENDING = "pending"
    LOADED = "loaded"
    FAILED = "failed"
    COLD = "cold"


@dataclass
class ServerAdapter:
    """One adapter on one server, as that server's reconciler last saw it."""

    state: ServerState = ServerState.PENDING
    attempts: int = 0
    last_error: str | None = None
    condition: str | None = None
    loaded_path: str | None = None
    loaded_at: float | None = None


@dataclass
class AdapterRecord:
    name: str
    source_path: Path
    first_seen: float = field(default_factory=time.time)
    changed_at: float = field(default_factory=time.time)
    changed_mono: float = field(default_factory=time.monotonic)
    settling: bool = True
    reason: str | None = None
    message: str | None = None
    snapshot: Snapshot | None = None
    newest_mtime: float = 0.0
    validated_at: float | None = None
    fingerprint: object = None
    servers: dict[str, ServerAdapter] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.snapshot is not None and self.reason is None

    def server(self, url: str) -> ServerAdapter:
        return self.servers.setdefault(url, ServerAdapter())

    def state(self, urls: list[str]) -> AdapterState:
        if self.reason is not None and self.snapshot is None:
            return AdapterState.INVALID if self.validated_at else AdapterState.FAILED
        if self.snapshot is None:
            return AdapterState.SETTLING
        per = [self.servers.get(u, ServerAdapter()).state for u in urls]
        if per and all(s is ServerState.LOADED for s in per):
            return AdapterState.LOADED
        if any(s is ServerState.FAILED for s in per):
            return AdapterState.FAILED
        if per and all(s is ServerState.COLD for s in per):
            return AdapterState.COLD
        return AdapterState.PENDING


class Catalog:
    """All records, plus the warm-set policy (pinned first, then newest, up to the limit)."""

    def __init__(self, *, pinned: list[str], warm_limit: int | None) -> None:
        self.pinned = list(pinned)
        self.warm_limit = warm_limit
        self._records: dict[str, AdapterRecord] = {}

    def __iter__(self) -> Iterator[AdapterRecord]:
        return iter(sorted(self._records.values(), key=lambda r: r.name))

    def __len__(self) -> int:
        return len(self._records)

    def get(self, name: str) -> AdapterRecord | None:
        return self._records.get(name)

    def add(self, record: AdapterRecord) -> None:
        self._records[record.name] = record

    def remove(self, name: str) -> AdapterRecord | None:
        return self._records.pop(name, None)

    def names(self) -> set[str]:
        return set(self._records)

    def desired(self) -> list[tuple[str, str]]:
        """The warm set as (name, snapshot path), in load order."""
        valid = {r.name: r for r in self._records.values() if r.valid}
        order = [valid[n] for n in self.pinned if n in valid]
        pinned = {r.name for r in order}
        rest = sorted(
            (r for r in valid.values() if r.name not in pinned),
            key=lambda r: (-r.newest_mtime, r.name),
        )
        order.extend(rest)
        if self.warm_limit is not None:
            order = order[: max(self.warm_limit, len(pinned))]
        return [(r.name, str(r.snapshot.path)) for r in order if r.snapshot is not None]

    def snapshot_paths(self) -> set[Path]:
        return {r.snapshot.path for r in self._records.values() if r.snapshot is not None}
