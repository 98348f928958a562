"""Reconcile: make one vLLM server's adapters match the warm set.

`plan()` is a pure function: desired (name -> snapshot path, in load order) against actual (what
`GET /v1/models` lists under our snapshot root) gives the unloads and loads to run. Names
loaded by anyone else (a root outside our snapshot dir) are never touched, and one of ours that
collides with such a name is reported as a conflict instead of being loaded.

`ServerReconciler` owns everything lorawarm knows of one server: its condition and backoff,
what it lists, each adapter's retries and outcome there. It reads the catalog and writes
nothing outside itself; the status API asks it `outcome(record)` when it is read, and the
collector asks which snapshots it uses. It runs the plan one operation at a time (loads stall
generation), with capped exponential backoff and jitter, and re-plans only when the catalog
changed (its version), on the resync timer and whenever the server comes back healthy (a vLLM
restart loses every adapter): one load costs O(1) of loop time, not a walk of the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lorawarm.catalog import AdapterRecord, Catalog, ServerAdapter, ServerState
from lorawarm.fit import Fit, FitPolicy, judge
from lorawarm.learn import learn
from lorawarm.logs import get_logger
from lorawarm.metrics import Metrics
from lorawarm.server_facts import ServerFacts
from lorawarm.snapshot import SnapshotStore
from lorawarm.vllm_client import Condition, LoadResult, ModelEntry, VllmClient, VllmError

log = get_logger(__name__)

# While the catalog keeps changing (a first scan), a running plan is made again this often.
REPLAN_SECONDS = 0.5

# Facts of a server that was not asked yet: only the server-independent checks apply.
_UNKNOWN = ServerFacts()
_FITS = Fit(ok=True)  # a record with nothing to judge (no verdict kept): nothing against it

# A server that cannot be reached, or that answers nothing in time, is down (not just busy).
_DOWN = frozenset({Condition.UNREACHABLE, Condition.TIMEOUT, Condition.ENGINE_DEAD})


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
    want: Mapping[str, str] | None = None,
    keep: frozenset[str] = frozenset(),
) -> Plan:
    """Plan the operations that turn `actual` into `desired`.

    desired: (name, path) in load order (`want` is the same as a mapping, when the caller has
    it). actual: name -> path of OUR adapters on the server. foreign: names on the server that
    are not ours (base models, adapters others loaded). blocked: names not to load now
    (backing off after a failure). keep: names not to unload now (their folder is still being
    judged: what the resolver loaded for it stays until there is a verdict).
    """
    want = dict(desired) if want is None else want
    unloads = tuple(sorted(n for n, p in actual.items() if want.get(n) != p and n not in keep))
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


def warm_set(
    ordered: Sequence[AdapterRecord],
    *,
    pinned: Sequence[str],
    limit: int | None,
    requested: Mapping[str, float],
) -> list[AdapterRecord]:
    """The adapters to keep loaded on one server, in load order, from those it can take in
    the catalog's order (pinned, then newest first): with no limit all of them; with one, the
    pinned (all of them, even past the limit), then those requested there most recently
    (`requested`: name -> when), then the newest, up to `limit`."""
    if limit is None:
        return list(ordered)
    pins = set(pinned)
    first = [r for r in ordered if r.name in pins]
    asked = sorted(
        (r for r in ordered if r.name in requested and r.name not in pins),
        key=lambda r: -requested[r.name],
    )
    rest = [r for r in ordered if r.name not in pins and r.name not in requested]
    return (first + asked + rest)[: max(limit, len(first))]


def backoff(
    attempts: int, cap: float, *, base: float = 1.0, rng: random.Random | None = None
) -> float:
    """Delay before retry number `attempts` (1-based): exponential, capped, with full jitter
    in the upper half so retries of many adapters spread out but never come too soon."""
    ceiling = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 62))
    jitter = rng.random() if rng is not None else random.random()  # noqa: S311 - jitter, not crypto
    return ceiling * (0.5 + 0.5 * jitter)


@dataclass
class ServerStatus:
    """What the status API shows for one server."""

    url: str
    condition: Condition = Condition.UNKNOWN
    message: str | None = None
    healthy: bool = False
    since: float = field(default_factory=time.time)
    last_sync: float | None = None
    loaded: int = 0
    loads: int = 0
    unloads: int = 0
    failures: int = 0


@dataclass
class _Failure:
    """The last failed load of one adapter on this server, and when to try it again."""

    path: str
    attempts: int
    due: float
    condition: Condition
    message: str


@dataclass
class _Loaded:
    path: str
    at: float


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
        policy: FitPolicy | None = None,
        warm_limit: int | None = None,
        learner: Callable[[VllmClient, Sequence[ModelEntry]], Awaitable[ServerFacts]] = learn,
    ) -> None:
        """`policy` holds the operator's overrides for this server (an enforced base model, a
        rank limit); `warm_limit` how many adapters to keep loaded here (None: as many as the
        server's memory keeps where lorawarm's resolver serves the rest, else all)."""
        self.client = client
        self.url = client.base_url
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.status = ServerStatus(url=self.url)
        self.version = 0  # bumped on every change the status shows
        self.known = False  # what it lists is what it holds now
        self.listed = False  # /v1/models answered at least once since lorawarm started
        self.loading: str | None = None  # a load in flight (or unanswered) until the next list
        self._actual: dict[str, _Loaded] = {}
        self._foreign: frozenset[str] = frozenset()
        self._conflicts: frozenset[str] = frozenset()
        self._attempts: dict[str, tuple[str, int]] = {}  # name -> (path, load attempts)
        self._failures: dict[str, _Failure] = {}
        self._released: dict[str, float] = {}  # snapshot path -> when it left the server
        self._warmed: dict[str, str] = {}  # name -> the path lorawarm last loaded for it here
        self._stale = False  # a step learned that the server differs from the plan: re-plan
        self._resync = resync_seconds
        self._health_every = health_seconds
        self._max_backoff = max_backoff
        self._wake = asyncio.Event()
        catalog.subscribe(self._wake)
        self._server_retry_at = 0.0
        self._server_attempts = 0
        self._probe_down = True  # /health not seen answering since start or its last failure
        self._rng = random.Random()  # noqa: S311 - retry jitter, not cryptography
        self.policy = policy or FitPolicy()
        self.warm_limit = warm_limit
        self.facts: ServerFacts | None = None  # what the server serves; None: not learned yet
        self._learner = learner
        self._learned_at = -1.0  # monotonic; -1: learn before the next plan (a (re)start)
        self._facts_version = 0
        self._fits: dict[str, tuple[str, int, Fit]] = {}  # name -> (snapshot, facts version, fit)
        self._requested: dict[str, float] = {}  # name -> when a request made vLLM load it here
        self._desired_key: tuple[int, int, int] = (-1, -1, -1)
        self._desired: list[tuple[str, str]] = []
        self._desired_map: dict[str, str] = {}
        self._requested_moved = False

    # -- what others read ---------------------------------------------------------------------
    @property
    def actual(self) -> Mapping[str, str]:
        """Our adapters on the server as last listed or loaded: name -> snapshot path."""
        return {name: loaded.path for name, loaded in self._actual.items()}

    def outcome(self, record: AdapterRecord) -> ServerAdapter | None:
        """What `record` is on this server now; None when it has nothing to load."""
        if record.snapshot is None:
            return None
        name, path = record.name, str(record.snapshot.path)
        tried = self._attempts.get(name)
        attempts = tried[1] if tried is not None and tried[0] == path else 0
        fit = self.fit(record)
        if not fit.ok:
            return ServerAdapter(ServerState.INCOMPATIBLE, attempts, fit.message, reason=fit.reason)
        entry = self._outcome(record, name, path, attempts)
        resident = (
            None
            if self.facts is None or self.facts.resident is None
            else (name in self.facts.resident)
        )
        warnings = tuple(str(w.code) for w in fit.warnings)
        return dataclasses.replace(entry, warnings=warnings, resident=resident)

    def _outcome(self, record: AdapterRecord, name: str, path: str, attempts: int) -> ServerAdapter:
        loaded = self._actual.get(name)
        failing = self.status.condition not in (Condition.OK, Condition.UNKNOWN)
        if loaded is not None and loaded.path == path and not failing:
            return ServerAdapter(
                ServerState.LOADED, attempts, loaded_path=path, loaded_at=loaded.at
            )
        if name in self._conflicts:
            return ServerAdapter(
                ServerState.FAILED,
                attempts,
                f"the server already serves a model named {name!r} that lorawarm did not "
                "load; rename the adapter folder",
                Condition.NAME_TAKEN,
            )
        failure = self._failures.get(name)
        if failure is not None and failure.path == path:
            return ServerAdapter(ServerState.FAILED, attempts, failure.message, failure.condition)
        if name not in self.desired_paths():
            return ServerAdapter(ServerState.COLD, attempts)
        if failing:  # in its backoff: say why it waits, not only at the next attempt
            return ServerAdapter(
                ServerState.PENDING, attempts, self.status.message, self.status.condition
            )
        return ServerAdapter(ServerState.PENDING, attempts)

    def snapshots_in_use(self) -> set[str]:
        """Snapshot paths this server lists or may be reading (a load in flight)."""
        used = {loaded.path for loaded in self._actual.values()}
        if self.loading is not None:
            used.add(self.loading)
        return used

    def released(self) -> Mapping[str, float]:
        """Snapshot paths that left this server, with the wall time they did (requests it
        accepted before may still read them: the collector counts its grace from here)."""
        return self._released

    def forget_released(self, paths: Iterable[str]) -> None:
        for path in paths:
            self._released.pop(path, None)

    # -- what fits here, and what to keep warm ---------------------------------------------
    def fit(self, record: AdapterRecord) -> Fit:
        """Whether this server can take `record`'s snapshot, judged by what it serves (cached
        until the snapshot or the server's facts change)."""
        if record.snapshot is None or record.adapter is None:
            return _FITS
        path = str(record.snapshot.path)
        cached = self._fits.get(record.name)
        if cached is not None and cached[0] == path and cached[1] == self._facts_version:
            return cached[2]
        fit = judge(record.adapter, self.facts or _UNKNOWN, self.policy)
        self._fits[record.name] = (path, self._facts_version, fit)
        if self.facts is not None:
            if not fit.ok:
                log.warning(
                    "adapter_incompatible",
                    server=self.url,
                    adapter=record.name,
                    reason=fit.reason,
                    message=fit.message,
                )
            for warning in fit.warnings:
                log.warning(
                    str(warning.code), server=self.url, adapter=record.name, message=warning.message
                )
        return fit

    @property
    def effective_warm_limit(self) -> int | None:
        """How many adapters to keep loaded here: the setting, else what the engine's CPU cache
        holds when lorawarm's resolver serves the rest on demand, else no limit (an adapter
        that is not loaded could not be requested at all)."""
        if self.warm_limit is not None:
            return self.warm_limit
        facts = self.facts
        if facts is not None and facts.resolver and facts.max_cpu_loras is not None:
            return facts.max_cpu_loras
        return None

    def desired(self) -> Sequence[tuple[str, str]]:
        """This server's warm set as (name, snapshot path), in load order: of the adapters it
        can take, the pinned, then the ones requested here most recently, then the newest, up
        to the warm limit. Computed once per change of the catalog, facts or requests."""
        self._refresh_desired()
        return self._desired

    def desired_paths(self) -> Mapping[str, str]:
        self._refresh_desired()
        return self._desired_map

    def _refresh_desired(self) -> None:
        key = (self.catalog.warm_version, self._facts_version, len(self._requested))
        if key == self._desired_key and not self._requested_moved:
            return
        fitting = warm_set(
            [r for r in self.catalog.ordered() if self.fit(r).ok],
            pinned=self.catalog.pinned,
            limit=self.effective_warm_limit,
            requested=self._requested,
        )
        self._desired = [(r.name, str(r.snapshot.path)) for r in fitting if r.snapshot]
        self._desired_map = dict(self._desired)
        self._desired_key = key
        self._requested_moved = False

    def _learned(self, facts: ServerFacts) -> None:
        """Take what was learned. Only a change of what adapters are judged by (not of what
        the engine holds right now, which moves with every request) judges them again."""
        previous = self.facts
        judged = dataclasses.replace(facts, resident=None)
        if previous is None or judged != dataclasses.replace(previous, resident=None):
            self._facts_version += 1
            log.info(
                "server_learned",
                server=self.url,
                learned_from=[str(f) for f in facts.learned_from],
                model=facts.model,
                served_model_names=list(facts.served_model_names),
                max_lora_rank=facts.max_lora_rank,
                max_cpu_loras=facts.max_cpu_loras,
                resolver=facts.resolver,
            )
        if facts != previous:
            self.facts = facts
            self._changed()
        self._learned_at = time.monotonic()

    # -- running ------------------------------------------------------------------------------
    def wake(self) -> None:
        """Ask for a re-plan soon (the catalog changed)."""
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
        for failure in self._failures.values():
            # A retry already due was tried by the last sync or is not wanted any more
            # (deleted, cold, name taken): waking for it again would re-sync every 10 ms.
            if failure.due > now:
                soonest = min(soonest, failure.due)
        return max(soonest - now, 0.01)

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.client.health()
            except VllmError as err:
                if not self._probe_down:
                    self.metrics.failures.labels(self.url, err.condition).inc()
                    self.status.failures += 1
                self._probe_down = True
                if self.status.healthy or self.status.condition != err.condition:
                    self._went_down(err)
            else:
                if not self.status.healthy:
                    self.status.healthy = True
                    self._changed()
                if self._probe_down:
                    # Up, or back after the probe saw it fail (a restart?). A call failing while
                    # /health answers is no comeback: it keeps its backoff, not a retry per probe.
                    self._probe_down = False
                    log.info("server_healthy", server=self.url)
                    self._server_retry_at = 0.0
                    self._server_attempts = 0
                    self.known = False
                    self._learned_at = -1.0
                    self.wake()  # a (re)started server: re-learn, re-list and re-warm
                elif self.effective_warm_limit is not None and self.warm_limit is None:
                    # The warm set follows requests: look at what they made vLLM load.
                    self.wake()
            await asyncio.sleep(self._health_every)

    def _changed(self) -> None:
        self.version += 1

    def _set_condition(self, condition: Condition, message: str | None, *, healthy: bool) -> None:
        changed = self.status.condition != condition
        self.status.condition = condition
        self.status.message = message
        self.status.healthy = healthy
        if changed:
            self.status.since = time.time()
            event = log.info if condition == Condition.OK else log.warning
            event("server_condition", server=self.url, condition=condition, message=message)
        self.metrics.server_up.labels(self.url).set(1 if condition == Condition.OK else 0)
        self._changed()

    def _server_failed(self, err: VllmError) -> None:
        self._server_attempts += 1
        delay = backoff(self._server_attempts, self._max_backoff, rng=self._rng)
        self._server_retry_at = time.monotonic() + delay
        self.metrics.failures.labels(self.url, err.condition).inc()
        self.status.failures += 1
        self._went_down(err)

    def _went_down(self, err: VllmError) -> None:
        """The server cannot be worked with: say why. What it has loaded is unknown until it
        answers again (a restart loses everything); what it listed is kept, because snapshot
        collection must still count what the server may be reading."""
        self.known = False
        self._set_condition(err.condition, err.message, healthy=err.condition not in _DOWN)

    async def sync(self) -> None:
        """List the server's adapters, plan, and run the plan one operation at a time.

        The plan is made again when a step found the server other than planned, when it is
        done and the catalog changed meanwhile, and otherwise at most every REPLAN_SECONDS
        while the catalog keeps changing (a first scan changes it 10,000 times: planning
        after each load cost a sort of the catalog per load). A load whose record points
        elsewhere by now is skipped.
        """
        started = time.monotonic()
        try:
            await self._refresh_actual()
            unloads, loads, planned_at, planned_t = self._steps()
            while True:
                changed = self.catalog.warm_version != planned_at
                if self._stale or (
                    changed
                    and (not (unloads or loads) or time.monotonic() - planned_t >= REPLAN_SECONDS)
                ):
                    self._stale = False
                    if not self.known:
                        await self._refresh_actual()
                    unloads, loads, planned_at, planned_t = self._steps()
                if unloads:
                    await self._unload(unloads.popleft())
                elif loads:
                    name, path = loads.popleft()
                    record = self.catalog.get(name)
                    snap = None if record is None else record.snapshot
                    if snap is not None and str(snap.path) == path:
                        await self._load(name, path)
                else:
                    break
        except VllmError as err:
            self._server_failed(err)
        else:
            self._server_attempts = 0
            # /v1/models answers even when the engine is dead: only the probe clears engine_dead.
            if self.status.healthy or self.status.condition != Condition.ENGINE_DEAD:
                self._set_condition(Condition.OK, None, healthy=True)
            self.status.last_sync = time.time()
        finally:
            self.metrics.reconcile_seconds.labels(self.url).observe(time.monotonic() - started)
            self.status.loaded = len(self._actual)
            self._changed()

    def _learn_due(self) -> bool:
        """Learn again after a (re)start, once per resync, and at every look while the warm
        set follows requests (the engine's memory is part of what is learned)."""
        if self._learned_at < 0 or time.monotonic() - self._learned_at >= self._resync:
            return True
        return self.warm_limit is None and self.effective_warm_limit is not None

    async def _refresh_actual(self) -> None:
        models = await self.client.list_models()
        if self._learn_due():
            self._learned(await self._learner(self.client, models))
        self._foreign = frozenset(m.id for m in models if not (m.root and self.store.owns(m.root)))
        listed = {m.id: str(m.root) for m in models if m.root and self.store.owns(m.root)}
        now = time.time()
        for name, loaded in list(self._actual.items()):
            if listed.get(name) != loaded.path:
                self._release(name)
        for name, path in listed.items():
            if name not in self._actual:
                self._hold(name, path, now)
                self._failures.pop(name, None)  # e.g. a timed-out load vLLM finished later
                if self._warmed.get(name) != path and self.loading != path:
                    # Not loaded by lorawarm: a request made the resolver load it. It joins
                    # this server's warm set ahead of the merely newest.
                    self._requested_moved |= name in self._requested
                    self._requested[name] = now
        self.loading = None
        self.known = self.listed = True

    def _hold(self, name: str, path: str, at: float) -> None:
        self._actual[name] = _Loaded(path, at)
        self._released.pop(path, None)
        self._changed()

    def _release(self, name: str) -> None:
        loaded = self._actual.pop(name, None)
        if loaded is not None and all(o.path != loaded.path for o in self._actual.values()):
            self._released[loaded.path] = time.time()
        self._changed()

    def _steps(self) -> tuple[deque[str], deque[tuple[str, str]], int, float]:
        step = self._plan()
        return deque(step.unloads), deque(step.loads), self.catalog.warm_version, time.monotonic()

    def _plan(self) -> Plan:
        for book in (self._attempts, self._warmed, self._failures):
            for gone in [n for n in book if self.catalog.get(n) is None]:
                del book[gone]  # deleted adapters: nothing to remember
        for gone in [n for n in self._requested if self.catalog.get(n) is None]:
            del self._requested[gone]
        want = self.desired_paths()
        now = time.monotonic()
        blocked = frozenset(
            n for n, f in self._failures.items() if f.due > now and want.get(n) == f.path
        )
        undecided = frozenset(
            n
            for n in self._actual
            if (r := self.catalog.get(n)) is not None and r.snapshot is None and r.reason is None
        )
        step = plan(
            self.desired(), self.actual, self._foreign, blocked=blocked, want=want, keep=undecided
        )
        if not self.catalog.complete:
            # The first scan is still running: what it has not reached yet is not deleted, and
            # with a warm limit the order is not known yet. Load what is known, unload nothing.
            if self.effective_warm_limit is not None:
                return Plan()
            step = Plan((), step.loads, step.conflicts)
        if frozenset(step.conflicts) != self._conflicts:
            self._conflicts = frozenset(step.conflicts)
        return step

    async def _unload(self, name: str) -> None:
        await self.client.unload(name)
        self._release(name)
        self.metrics.unloads.labels(self.url).inc()
        self.status.unloads += 1
        log.info("adapter_unloaded", server=self.url, adapter=name)

    async def _load(self, name: str, path: str) -> None:
        tried = self._attempts.get(name)
        self._attempts[name] = (path, (tried[1] if tried and tried[0] == path else 0) + 1)
        self.loading = path  # snapshot collection must keep what vLLM may be reading right now
        try:
            result = await self.client.load(name, path)
        except VllmError as err:
            if err.condition == Condition.TIMEOUT and await self._answers():
                # vLLM answers, this load did not in time: the adapter's problem (a big one, a
                # slow disk), not the server's. It may still finish: re-list before going on.
                self.known, self._stale = False, True
                self._adapter_failed(name, path, err)
                return
            if err.condition != Condition.REJECTED:
                raise  # a server-wide problem: back off the whole server
            self._adapter_failed(name, path, err)
            return
        if result is LoadResult.ALREADY_LOADED:
            # Registered by someone (the plugin, or us before a restart): trust /v1/models.
            await self._refresh_actual()
            self._stale = True  # the plan was made without it
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
        record = self.catalog.get(name)
        first_time = self._warmed.get(name) != path
        self._warmed[name] = path
        self._hold(name, path, time.time())
        self._failures.pop(name, None)
        self.metrics.loads.labels(self.url).inc()
        self.status.loads += 1
        if record is not None and first_time:  # re-warms after a restart are not drop-to-ready
            self.metrics.drop_to_ready.labels(self.url).observe(
                time.monotonic() - record.changed_mono
            )
        log.info("adapter_loaded", server=self.url, adapter=name, path=path)

    async def _answers(self) -> bool:
        try:
            await self.client.health()
        except VllmError:
            return False
        return True

    def _adapter_failed(self, name: str, path: str, err: VllmError) -> None:
        previous = self._failures.get(name)
        attempts = previous.attempts + 1 if previous and previous.path == path else 1
        due = time.monotonic() + backoff(attempts, self._max_backoff, rng=self._rng)
        self._failures[name] = _Failure(path, attempts, due, err.condition, err.message)
        self.metrics.failures.labels(self.url, err.condition).inc()
        self.status.failures += 1
        log.warning(
            "adapter_load_failed",
            server=self.url,
            adapter=name,
            condition=str(err.condition),
            message=err.message,
            attempts=attempts,
        )
