"""The reconciler's pure parts: `plan()` (property tests), `backoff()` and `warm_set()` (one
server's warm set from the catalog's order), and each adapter's overall state."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from lorawarm.catalog import (
    AdapterRecord,
    AdapterState,
    Catalog,
    ServerAdapter,
    ServerState,
    adapter_state,
)
from lorawarm.inspection import Reason
from lorawarm.reconcile import Plan, backoff, plan, warm_set
from lorawarm.snapshot import Snapshot, SnapshotReason

State = tuple[list[tuple[str, str]], dict[str, str], frozenset[str], frozenset[str]]

NAMES = st.sampled_from(["a", "b", "c", "d", "e", "org/f", "org/g", "tiny"])
PATHS = st.sampled_from([f"/state/snapshots/x/{d * 32}" for d in "0123"])


@st.composite
def states(draw: st.DrawFn) -> State:
    """(desired, actual, foreign, blocked) as the reconciler builds them: unique desired names
    in load order; `actual` and `foreign` partition the server's names (vLLM lists each once)."""
    desired_names = draw(st.lists(NAMES, unique=True))
    desired = [(n, draw(PATHS)) for n in desired_names]
    server_names = draw(st.lists(NAMES, unique=True))
    foreign = (
        frozenset(draw(st.sets(st.sampled_from(server_names)))) if server_names else frozenset()
    )
    actual = {n: draw(PATHS) for n in server_names if n not in foreign}
    blocked = draw(st.frozensets(NAMES))
    return desired, actual, foreign, blocked


def apply(step: Plan, actual: dict[str, str]) -> dict[str, str]:
    """What the server holds after running the plan."""
    after = {n: p for n, p in actual.items() if n not in step.unloads}
    after.update(step.loads)
    return after


@given(states())
def test_applying_the_plan_reaches_the_desired_state(
    state: State,
) -> None:
    """After the plan, our adapters are exactly the desired ones that are not foreign-named and
    not blocked (a blocked one already loaded from the desired path stays)."""
    desired, actual, foreign, blocked = state
    after = apply(plan(desired, actual, foreign, blocked=blocked), actual)
    expected = {
        n: p for n, p in desired if n not in foreign and (n not in blocked or actual.get(n) == p)
    }
    assert after == expected


@given(states())
def test_plan_is_idempotent(
    state: State,
) -> None:
    """Planning again from the state the plan produced has nothing left to do."""
    desired, actual, foreign, blocked = state
    after = apply(plan(desired, actual, foreign, blocked=blocked), actual)
    assert plan(desired, after, foreign, blocked=blocked).empty


@given(states())
def test_foreign_names_are_never_loaded_or_unloaded(
    state: State,
) -> None:
    """A name the server serves for someone else is neither unloaded nor loaded over."""
    desired, actual, foreign, blocked = state
    step = plan(desired, actual, foreign, blocked=blocked)
    assert not foreign & set(step.unloads)
    assert not foreign & {n for n, _ in step.loads}


@given(states())
def test_conflicts_are_the_desired_foreign_names_in_order(
    state: State,
) -> None:
    """Every desired name taken by a foreign model is reported, in load order."""
    desired, actual, foreign, blocked = state
    step = plan(desired, actual, foreign, blocked=blocked)
    assert list(step.conflicts) == [n for n, _ in desired if n in foreign]


@given(states())
def test_unloads_are_only_ours_and_only_what_must_go(
    state: State,
) -> None:
    """Only adapters of ours that are not desired at their current path are unloaded, once."""
    desired, actual, foreign, blocked = state
    step = plan(desired, actual, foreign, blocked=blocked)
    want = dict(desired)
    assert set(step.unloads) <= set(actual)
    assert len(set(step.unloads)) == len(step.unloads)
    assert set(step.unloads) == {n for n, p in actual.items() if want.get(n) != p}


@given(states())
def test_loads_keep_the_desired_order_and_skip_blocked(
    state: State,
) -> None:
    """Loads are the missing desired adapters, in warm-set order, none of them blocked."""
    desired, actual, foreign, blocked = state
    step = plan(desired, actual, foreign, blocked=blocked)
    missing = [(n, p) for n, p in desired if actual.get(n) != p and n not in foreign]
    assert list(step.loads) == [(n, p) for n, p in missing if n not in blocked]


@given(st.lists(st.tuples(NAMES, PATHS), unique_by=lambda t: t[0]), st.frozensets(NAMES))
def test_equal_states_need_no_operation(
    desired: list[tuple[str, str]], blocked: frozenset[str]
) -> None:
    """When the server already holds exactly the warm set, the plan is empty."""
    step = plan(desired, dict(desired), blocked=blocked)
    assert step.empty
    assert step == Plan()


def test_replacement_is_unload_then_load() -> None:
    """A changed snapshot path gives an unload of the name and a load of the new path."""
    step = plan([("a", "/s/new")], {"a": "/s/old"})
    assert step == Plan(unloads=("a",), loads=(("a", "/s/new"),))
    assert not step.empty


def test_plan_defaults_have_no_foreign_and_no_blocked() -> None:
    """Without foreign/blocked, everything missing is loaded and everything extra unloaded."""
    step = plan([("b", "/s/b"), ("a", "/s/a")], {"c": "/s/c"})
    assert step.unloads == ("c",)
    assert step.loads == (("b", "/s/b"), ("a", "/s/a"))
    assert step.conflicts == ()


# --- backoff ----------------------------------------------------------------------------------


@given(
    attempts=st.integers(min_value=-5, max_value=10_000),
    cap=st.floats(min_value=0.001, max_value=3600),
    base=st.floats(min_value=0.001, max_value=10),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_stays_between_half_the_ceiling_and_the_cap(
    attempts: int, cap: float, base: float, seed: int
) -> None:
    """The delay is never above the cap and at least half of min(cap, base * 2^(n-1))."""
    delay = backoff(attempts, cap, base=base, rng=random.Random(seed))  # noqa: S311 - seeded test jitter
    ceiling = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 62))
    assert delay <= cap
    assert ceiling / 2 <= delay <= ceiling


@given(
    attempts=st.integers(min_value=1, max_value=200),
    cap=st.floats(min_value=0.001, max_value=3600),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_grows_with_attempts(attempts: int, cap: float, seed: int) -> None:
    """With the same jitter, one more attempt never waits less."""
    first = backoff(attempts, cap, rng=random.Random(seed))  # noqa: S311 - seeded test jitter
    second = backoff(attempts + 1, cap, rng=random.Random(seed))  # noqa: S311 - seeded test jitter
    assert second >= first


def test_backoff_doubles_until_the_cap() -> None:
    """Ceilings go 1, 2, 4, 8 ... seconds and then stay at the cap."""
    top = _Max()
    assert [backoff(n, 10, rng=top) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    bottom = _Min()
    assert [backoff(n, 10, rng=bottom) for n in range(1, 7)] == [0.5, 1, 2, 4, 5, 5]


def test_backoff_without_rng_uses_the_global_one() -> None:
    """Without an rng the delay is still within bounds."""
    for _ in range(50):
        assert 2.0 <= backoff(3, 60) <= 4.0


class _Max(random.Random):
    def random(self) -> float:
        return 1.0


class _Min(random.Random):
    def random(self) -> float:
        return 0.0


# --- the warm set -----------------------------------------------------------------------------


def rec(
    name: str,
    mtime: float,
    *,
    valid: bool = True,
    reason: Reason | SnapshotReason | None = None,
) -> AdapterRecord:
    """A record with a snapshot (when valid) and files last changed at `mtime`."""
    return AdapterRecord(
        name=name,
        source_path=Path(f"/drop/{name}"),
        settling=False,
        snapshot=snap(name) if valid else None,
        reason=reason,
        seen_at=mtime,
        validated_at=1.0,
    )


def snap(name: str, digest: str = "0" * 32) -> Snapshot:
    return Snapshot(name, digest, Path(f"/state/snapshots/{name}/{digest}"))


def catalog(
    *records: AdapterRecord, pinned: tuple[str, ...] = (), limit: int | None = None
) -> Catalog:
    cat = OneServer(pinned, limit)
    for r in records:
        cat.add(r)
    return cat


class OneServer(Catalog):
    """A catalog and the warm limit of the one server these tests imagine."""

    def __init__(self, pinned: tuple[str, ...], limit: int | None) -> None:
        super().__init__(pinned=list(pinned))
        self.limit = limit


def names(cat: OneServer, requested: Mapping[str, float] | None = None) -> list[str]:
    """The warm set one server with the catalog's limit keeps, by name."""
    chosen = warm_set(
        cat.ordered(),
        pinned=cat.pinned,
        limit=cat.limit,
        requested=requested or {},
    )
    return [r.name for r in chosen]


def test_desired_is_newest_first_with_paths() -> None:
    """Without pins, the warm set is newest first, ties by name, with the snapshot paths."""
    cat = catalog(rec("old", 1), rec("new", 3), rec("mid-b", 2), rec("mid-a", 2))
    assert names(cat) == ["new", "mid-a", "mid-b", "old"]
    assert str(cat.ordered()[0].snapshot.path) == f"/state/snapshots/new/{'0' * 32}"


def test_pinned_come_first_even_when_old() -> None:
    """Pinned adapters lead the warm set in pin order, however old they are."""
    cat = catalog(rec("p1", 1), rec("p2", 0), rec("x", 9), pinned=("p2", "p1"))
    assert names(cat) == ["p2", "p1", "x"]


def test_warm_limit_keeps_the_pinned_and_the_newest() -> None:
    """With a limit, the pinned and then the newest fill it; the rest stay cold."""
    cat = catalog(rec("p", 1), rec("x", 5), rec("y", 9), rec("z", 2), pinned=("p",), limit=2)
    assert names(cat) == ["p", "y"]


def test_pinned_beyond_the_limit_are_all_kept() -> None:
    """More pins than the limit: every pinned adapter is kept, nothing else."""
    cat = catalog(rec("p1", 1), rec("p2", 1), rec("x", 9), pinned=("p1", "p2"), limit=1)
    assert names(cat) == ["p1", "p2"]


def test_invalid_and_unsnapshotted_are_excluded() -> None:
    """Invalid, failed and settling adapters (no snapshot) are not in the warm set, pinned or
    not, and do not take a place under the limit."""
    cat = catalog(
        rec("bad", 9, valid=False, reason=Reason.RANK_TOO_LARGE),
        rec("settling", 9, valid=False),
        rec("nosnap", 9, valid=False, reason=SnapshotReason.SNAPSHOT_FAILED),
        rec("ok", 1),
        rec("ok2", 0),
        pinned=("bad",),
        limit=1,
    )
    assert names(cat) == ["ok"]


def test_a_snapshot_stays_warm_while_newer_content_is_invalid() -> None:
    """A record with a snapshot and a reason (its folder's newer content is refused) keeps
    its last valid snapshot in the warm set, and it is servable."""
    stale = rec("stale", 9, reason=SnapshotReason.SNAPSHOT_FAILED)
    cat = catalog(stale, rec("ok", 1), limit=1)
    assert stale.servable
    assert names(cat) == ["stale"]


def test_pins_of_unknown_names_are_ignored() -> None:
    """A pinned name with no folder does not appear or count."""
    assert names(catalog(rec("a", 1), pinned=("ghost",), limit=1)) == ["a"]


def test_empty_catalog_has_empty_warm_set() -> None:
    """No adapters, no warm set."""
    assert names(catalog()) == []


def test_catalog_bookkeeping() -> None:
    """Records iterate in insertion order and by_name() sorted; get/remove/names/len and the
    snapshots in use agree."""
    cat = catalog(rec("b", 1), rec("a", 2), rec("c", 0, valid=False))
    assert [r.name for r in cat] == ["b", "a", "c"]
    assert [r.name for r in cat.by_name()] == ["a", "b", "c"]
    assert len(cat) == 3
    assert cat.names() == {"a", "b", "c"}
    assert cat.snapshots_in_use() == {f"/state/snapshots/{n}/{'0' * 32}" for n in ("a", "b")}
    removed = cat.remove("b")
    assert removed is not None
    assert removed.name == "b"
    assert cat.remove("b") is None
    assert cat.get("b") is None
    assert [r.name for r in cat.by_name()] == ["a", "c"]
    assert cat.snapshots_in_use() == {f"/state/snapshots/a/{'0' * 32}"}


# --- the catalog's versions, cache and subscribers ------------------------------------------


def test_writes_move_the_versions() -> None:
    """add/remove/set_snapshot move `version` and `warm_version`; touch() and setting the same
    snapshot again move only `version`; adding or removing an unservable record leaves the warm
    set's version alone."""
    cat = catalog()
    a = rec("a", 1)
    steps: list[tuple[Callable[[], object], bool]] = [
        (lambda: cat.add(a), True),
        (cat.touch, False),
        (lambda: cat.set_snapshot(a, a.snapshot, seen_at=1), False),
        (lambda: cat.set_snapshot(a, snap("a", "1" * 32), seen_at=2), True),
        (lambda: cat.add(rec("bad", 1, valid=False, reason=Reason.BAD_FIELD)), False),
        (lambda: cat.remove("bad"), False),
        (lambda: cat.set_snapshot(a, None), True),
        (lambda: cat.remove("a"), False),
    ]
    for write, warm in steps:
        before = (cat.version, cat.warm_version)
        write()
        assert cat.version == before[0] + 1
        assert cat.warm_version == before[1] + (1 if warm else 0)


def test_order_is_cached_per_warm_version() -> None:
    """ordered() is computed once per warm_version (the same object until the warm set
    changes); set_snapshot re-orders it by when the new content was first seen."""
    a, b = rec("a", 2), rec("b", 1)
    cat = catalog(a, b)
    first = cat.ordered()
    cat.touch()
    assert cat.ordered() is first
    cat.set_snapshot(b, snap("b", "1" * 32), seen_at=3)
    assert names(cat) == ["b", "a"]
    assert str(cat.ordered()[0].snapshot.path) == f"/state/snapshots/b/{'1' * 32}"


def test_recently_requested_come_before_the_newest() -> None:
    """With a limit, adapters requested on the server (most recent first) come after the
    pinned and before the merely newest; without a limit the order is the catalog's."""
    cat = catalog(rec("p", 0), rec("new", 9), rec("mid", 5), rec("old", 1), pinned=("p",))
    asked = {"old": 100.0, "mid": 50.0}
    assert names(cat, asked) == ["p", "new", "mid", "old"]
    cat.limit = 3
    assert names(cat, asked) == ["p", "old", "mid"]
    cat.limit = 1
    assert names(cat, {"p": 200.0, **asked}) == ["p"]


async def test_subscribers_are_set_when_the_warm_set_changes() -> None:
    """A subscribed event is set by a change of the warm set, not by a status-only change."""
    cat = catalog()
    event = asyncio.Event()
    cat.subscribe(event)
    a = rec("a", 1)
    cat.add(a)
    assert event.is_set()
    event.clear()
    cat.touch()
    cat.set_snapshot(a, a.snapshot, seen_at=1)
    assert not event.is_set()
    cat.set_snapshot(a, snap("a", "1" * 32), seen_at=2)
    assert event.is_set()


def test_released_snapshots_are_counted_per_record() -> None:
    """A snapshot path is released (with the wall time) only when no record points to it any
    more; pointing a record at it again takes it back; forget_released drops it."""
    shared = snap("x")
    one = rec("one", 1)
    two = rec("two", 1)
    cat = catalog(one, two)
    cat.set_snapshot(one, shared, seen_at=1)
    cat.set_snapshot(two, shared, seen_at=1)
    old_one, old_two = f"/state/snapshots/one/{'0' * 32}", f"/state/snapshots/two/{'0' * 32}"
    assert set(cat.released()) == {old_one, old_two}
    cat.remove("one")
    assert str(shared.path) in cat.snapshots_in_use()
    assert str(shared.path) not in cat.released()
    before = time.time()
    cat.set_snapshot(two, None)
    assert str(shared.path) not in cat.snapshots_in_use()
    assert before <= cat.released()[str(shared.path)] <= time.time()
    cat.set_snapshot(two, shared, seen_at=1)
    assert str(shared.path) not in cat.released()
    cat.forget_released([old_one, old_two])
    assert cat.released() == {}


# --- an adapter's overall state ---------------------------------------------------------------


def state_of(*states: ServerState) -> AdapterState:
    """The overall state of a valid record whose servers say `states`."""
    return adapter_state(rec("a", 1), [ServerAdapter(state=s) for s in states])


def test_state_summarises_the_servers() -> None:
    """loaded on all servers -> loaded; failed on any -> failed; cold on all -> cold; else
    pending."""
    assert state_of(ServerState.LOADED, ServerState.LOADED) is AdapterState.LOADED
    assert state_of(ServerState.LOADED, ServerState.FAILED) is AdapterState.FAILED
    assert state_of(ServerState.COLD, ServerState.COLD) is AdapterState.COLD
    assert state_of(ServerState.LOADED, ServerState.PENDING) is AdapterState.PENDING
    assert state_of(ServerState.LOADED, ServerState.COLD) is AdapterState.PENDING


def test_state_before_and_without_a_snapshot() -> None:
    """No snapshot: settling until inspected, invalid when inspection refused it, failed when
    the snapshot could not be made; with no servers configured a valid one is pending."""
    settling = rec("a", 1, valid=False)
    settling.validated_at = None
    assert adapter_state(settling, []) is AdapterState.SETTLING
    invalid = rec("a", 1, valid=False, reason=Reason.RANK_TOO_LARGE)
    assert adapter_state(invalid, []) is AdapterState.INVALID
    failed = rec("a", 1, valid=False, reason=SnapshotReason.SNAPSHOT_FAILED)
    assert adapter_state(failed, []) is AdapterState.FAILED
    assert adapter_state(rec("a", 1), []) is AdapterState.PENDING


def test_servable_means_it_has_a_snapshot() -> None:
    """`servable` is True exactly when the record has a snapshot, whatever its reason."""
    assert rec("a", 1).servable
    assert rec("a", 1, reason=Reason.RANK_TOO_LARGE).servable
    assert not rec("a", 1, valid=False).servable
    assert not rec("a", 1, valid=False, reason=Reason.RANK_TOO_LARGE).servable
