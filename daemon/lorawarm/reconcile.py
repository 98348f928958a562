"""Reconcile: make one vLLM server's adapters match the warm set.

`plan()` is a pure function: desired (name -> snapshot path, in load order) against actual (what
`GET /v1/models` lists under our snapshot root) gives the unloads and loads to run. Names
loaded by anyone else (a root outside our snapshot dir) are never touched, and one of ours that
collides with such a name is reported as a conflict instead of being loaded.

`ServerReconciler` runs the plan for one server, one operation at a time (loads stall
generation), with capped exponential backoff and jitter, and re-plans after every change, on the
resync timer and whenever the server becomes healthy again (a vLLM restart loses every adapter).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from lorawarm.catalog import Catalog, ServerState
from lorawarm.logs import get_logger
from lorawarm.metrics import Metrics
from lorawarm.snapshot import SnapshotStore
from lorawarm.vllm_client import Condition, LoadResult, VllmClient, VllmError

log = get_logger(__name__)


@dataclass(frozen=True)
class Plan:
    """What to do on one server: unloads first (they free slots), then loads in warm order."""

    unloads: tuple[str, ...] = ()
    loads: tuple[tuple[str, str], ...] = ()
    conflicts: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.unloads and not self.loads


def plan(
    desired: Sequence[tuple[str, str]],
    actual: Mapping[str, str],
    foreign: frozenset[str] = frozenset(),
    *,
    blocked: frozenset[str] = frozenset(),
) -> Plan:
    """Plan the operations that turn `actual` into `desired`.

    desired: (name, path) in load order. actual: name -> path of OUR adapters on the server.
    foreign: names on the server that are not ours (base models, adapters others loaded).
    blocked: names not to load now (backing off after a failure).
    """
    want = dict(desired)
    unloads = tuple(sorted(n for n, p in actual.items() if want.get(n) != p))
    loads = []
    conflicts = []
    for name, path in desired:
        if actual.get(name) == path:
            continue
        if name in foreign:
            conflicts.append(name)
        elif name not in blocked:
            loads.append((name, path))
    return Plan(unloads=unloads, loads=tuple(loads), conflicts=tuple(conflicts))


def backoff(
    attempts: int, cap: float, *, base: float = 1.0, rng: random.Random | None = None
) -> float:
    """Delay before retry number `attempts` (1-based): exponential, capped, with full jitter
    in the upper half so retries of many adapters spread out but never come too soon."""
    ceiling = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 62))
    jitter = rng.random() if rng is not None else random.random()  # noqa: S311 - jitter, not crypto
    return ceiling * (0.5 + 0.5 * jitter)


class ServerCondition(StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"


@dataclass
class ServerStatus:
    """What the status API shows for one server."""

    url: str
    condition: str = ServerCondition.UNKNOWN
    message: str | None = None
    healthy: bool = False
    since: float = field(default_factory=time.time)
    last_sync: float | None = None
    loaded: int = 0
    loads: int = 0
    unloads: int = 0
    failures: int = 0


@dataclass
class _Retry:
    path: str
    attempts: int
    due: float


class ServerReconciler:
    """Keeps one vLLM server's adapters equal to the catalog's warm set."""

    def __init__(
        self,
        client: VllmClient,
        catalog: Catalog,
        store: SnapshotStore,
        metrics: Metrics,
        *,
        resync_seconds: float,
        health_seconds: float,
        max_backoff: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.url = client.base_url
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.status = ServerStatus(url=self.url)
        self.actual: dict[str, str] = {}
        self.foreign: frozenset[str] = frozenset()
        self.known = False  # `actual` reflects the server as it is now
        self.listed = False  # /v1/models answered at least once since lorawarm started
        self.loading: str | None = None  # a load in flight (or unanswered) until the next list
        self._resync = resync_seconds
        self._health_every = health_seconds
        self._max_backoff = max_backoff
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._retries: dict[str, _Retry] = {}
        self._server_retry_at = 0.0
        self._server_attempts = 0
        self._probe_down = True  # /health not seen answering since start or its last failure
        self._rng = random.Random()  # noqa: S311 - retry jitter, not cryptography

    def wake(self) -> None:
        """Ask for a re-plan soon (the catalog changed)."""
        if self.status.condition not in (ServerCondition.OK, ServerCondition.UNKNOWN):
            # The server is failing (in its backoff, maybe for a minute): an adapter that became
            # valid meanwhile is told why it waits now, not at the next attempt.
            self._mark_waiting(self.status.condition, self.status.message)
        self._wake.set()

    async def run(self) -> None:
        """Health probe and reconcile loop; runs until cancelled."""
        health = asyncio.create_task(self._health_loop(), name=f"health {self.url}")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._next_timeout())
                self._wake.clear()
                if time.monotonic() < self._server_retry_at:
                    continue
                await self.sync()
        finally:
            health.cancel()
            await asyncio.gather(health, return_exceptions=True)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        soonest = now + self._resync
        if self._server_retry_at > now:
            soonest = min(soonest, self._server_retry_at)
        for retry in self._retries.values():
            # A retry already due was tried by the last sync or is not wanted any more
            # (deleted, cold, name taken): waking for it again would re-sync every 10 ms.
            if retry.due > now:
                soonest = min(soonest, retry.due)
        return max(soonest - now, 0.01)

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.client.health()
            except VllmError as err:
                self._probe_down = True
                if self.status.healthy or self.status.condition != err.condition:
                    self._went_down(err)
            else:
                self.status.healthy = True
                if self._probe_down:
                    # Up, or back after the probe saw it fail (a restart?). A call failing while
                    # /health answers is no comeback: it keeps its backoff, not a retry per probe.
                    self._probe_down = False
                    log.info("server_healthy", server=self.url)
                    self._server_retry_at = 0.0
                    self._server_attempts = 0
                    self.known = False
                    self.wake()  # a (re)started server: re-list and re-warm
            await asyncio.sleep(self._health_every)

    def _set_condition(self, condition: str, message: str | None, *, healthy: bool) -> None:
        changed = self.status.condition != condition
        self.status.condition = condition
        self.status.message = message
        self.status.healthy = healthy
        if changed:
            self.status.since = time.time()
            event = log.info if condition == ServerCondition.OK else log.warning
            event("server_condition", server=self.url, condition=condition, message=message)
        self.metrics.server_up.labels(self.url).set(1 if condition == ServerCondition.OK else 0)
        if changed:
            self._on_change()

    def _server_failed(self, err: VllmError) -> None:
        self._server_attempts += 1
        delay = backoff(self._server_attempts, self._max_backoff, rng=self._rng)
        self._server_retry_at = time.monotonic() + delay
        self.known = False
        self.metrics.failures.labels(self.url, err.condition).inc()
        self.status.failures += 1
        self._went_down(err)

    def _went_down(self, err: VllmError) -> None:
        """The server cannot be worked with: say why, per server and per adapter.

        What it has loaded is unknown until it answers again (a restart loses everything), so
        loaded entries go back to pending. `actual` is kept: snapshot collection must still
        count what the server may be reading.
        """
        self.known = False
        healthy = err.condition not in (
            Condition.UNREACHABLE,
            Condition.TIMEOUT,
            Condition.ENGINE_DEAD,
        )
        self._mark_waiting(err.condition, err.message)
        self._set_condition(err.condition, err.message, healthy=healthy)

    def _mark_waiting(self, condition: str, message: str | None) -> None:
        """Every valid adapter loaded or waiting here is pending, because of `condition`."""
        for record in self.catalog:
            if record.valid:
                entry = record.server(self.url)
                if entry.state in (ServerState.LOADED, ServerState.PENDING):
                    entry.state = ServerState.PENDING
                    entry.condition = condition
                    entry.last_error = message

    async def sync(self) -> None:
        """List the server's adapters, plan, and run the plan one operation at a time."""
        started = time.monotonic()
        try:
            await self._refresh_actual()
            while True:
                step = self._plan()
                self._mark(step)
                if step.empty:
                    break
                if step.unloads:
                    await self._unload(step.unloads[0])
                else:
                    await self._load(*step.loads[0])
        except VllmError as err:
            self._server_failed(err)
        else:
            self._server_attempts = 0
            # /v1/models answers even when the engine is dead: only the probe clears engine_dead.
            if self.status.healthy or self.status.condition != Condition.ENGINE_DEAD:
                self._set_condition(ServerCondition.OK, None, healthy=True)
            self.status.last_sync = time.time()
        finally:
            self.metrics.reconcile_seconds.labels(self.url).observe(time.monotonic() - started)
            self.status.loaded = len(self.actual)
            self._on_change()

    async def _refresh_actual(self) -> None:
        models = await self.client.list_models()
        self.foreign = frozenset(m.id for m in models if not (m.root and self.store.owns(m.root)))
        self.actual = {m.id: str(m.root) for m in models if m.root and self.store.owns(m.root)}
        self.loading = None
        self.known = self.listed = True

    def _plan(self) -> Plan:
        desired = self.catalog.desired()
        now = time.monotonic()
        blocked = frozenset(
            n for n, r in self._retries.items() if r.due > now and dict(desired).get(n) == r.path
        )
        return plan(desired, self.actual, self.foreign, blocked=blocked)

    def _mark(self, step: Plan) -> None:
        """Write each record's per-server state from what is loaded and planned."""
        desired = dict(self.catalog.desired())
        conflicts = set(step.conflicts)
        for record in self.catalog:
            if not record.valid or record.snapshot is None:
                record.servers.pop(self.url, None)
                continue
            entry = record.server(self.url)
            path = str(record.snapshot.path)
            if self.actual.get(record.name) == path:
                if entry.state is not ServerState.LOADED:
                    entry.state = ServerState.LOADED
                    entry.loaded_at = entry.loaded_at or time.time()
                entry.loaded_path = path
                entry.condition = None
                entry.last_error = None
            elif record.name in conflicts:
                entry.state = ServerState.FAILED
                entry.condition = "name_taken"
                entry.last_error = (
                    f"the server already serves a model named {record.name!r} that lorawarm did "
                    "not load; rename the adapter folder"
                )
            elif record.name not in desired:
                entry.state = ServerState.COLD
                entry.loaded_path = None
            elif entry.state is not ServerState.FAILED:
                entry.state = ServerState.PENDING

    async def _unload(self, name: str) -> None:
        await self.client.unload(name)
        self.actual.pop(name, None)
        self.metrics.unloads.labels(self.url).inc()
        self.status.unloads += 1
        log.info("adapter_unloaded", server=self.url, adapter=name)

    async def _load(self, name: str, path: str) -> None:
        record = self.catalog.get(name)
        entry = record.server(self.url) if record else None
        if entry is not None:
            entry.attempts += 1
        self.loading = path  # snapshot collection must keep what vLLM may be reading right now
        try:
            result = await self.client.load(name, path)
        except VllmError as err:
            if err.condition != Condition.REJECTED:
                raise  # a server-wide problem: back off the whole server
            self._adapter_failed(name, path, err)
            return
        if result is LoadResult.ALREADY_LOADED:
            # Registered by someone (the plugin, or us before a restart): trust /v1/models.
            await self._refresh_actual()
            if self.actual.get(name) != path:
                self._adapter_failed(
                    name,
                    path,
                    VllmError(
                        Condition.REJECTED,
                        f"vLLM already has an adapter named {name!r} from another path",
                        status=400,
                        url=self.url,
                    ),
                )
            return
        first_time = entry is None or entry.loaded_path != path
        self.actual[name] = path
        self._retries.pop(name, None)
        self.metrics.loads.labels(self.url).inc()
        self.status.loads += 1
        if record is not None and entry is not None:
            entry.state = ServerState.LOADED
            entry.loaded_at = time.time()
            entry.loaded_path = path
            entry.last_error = None
            entry.condition = None
            if first_time:  # re-warms after a server restart are not drop-to-ready latency
                self.metrics.drop_to_ready.labels(self.url).observe(
                    time.monotonic() - record.changed_mono
                )
        log.info("adapter_loaded", server=self.url, adapter=name, path=path)

    def _adapter_failed(self, name: str, path: str, err: VllmError) -> None:
        previous = self._retries.get(name)
        attempts = previous.attempts + 1 if previous and previous.path == path else 1
        due = time.monotonic() + backoff(attempts, self._max_backoff, rng=self._rng)
        self._retries[name] = _Retry(path=path, attempts=attempts, due=due)
        self.metrics.failures.labels(self.url, err.condition).inc()
        self.status.failures += 1
        record = self.catalog.get(name)
        if record is not None:
            entry = record.server(self.url)
            entry.state = ServerState.FAILED
            entry.condition = err.condition
            entry.last_error = err.message
        log.warning(
            "adapter_load_failed",
            server=self.url,
            adapter=name,
            condition=str(err.condition),
            message=err.message,
            attempts=attempts,
        )
