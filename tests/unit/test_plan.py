"""The reconciler's pure parts: `plan()` (property tests), `backoff()`, and the catalog's warm set
(`Catalog.desired()`) with each adapter's overall state."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from lorawarm.catalog import AdapterRecord, AdapterState, Catalog, ServerAdapter, ServerState
from lorawarm.reconcile import Plan, backoff, plan
from lorawarm.snapshot import Snapshot

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


def rec(name: str, mtime: float, *, valid: bool = True, reason: str | None = None) -> AdapterRecord:
    """A record with a snapshot (when valid) and files last changed at `mtime`."""
    snap = Snapshot(name, "0" * 32, Path(f"/state/snapshots/{name}/{'0' * 32}")) if valid else None
    return AdapterRecord(
        name=name,
        source_path=Path(f"/drop/{name}"),
        settling=False,
        snapshot=snap,
        reason=reason,
        newest_mtime=mtime,
        validated_at=1.0,
    )


def catalog(
    *records: AdapterRecord, pinned: tuple[str, ...] = (), limit: int | None = None
) -> Catalog:
    cat = Catalog(pinned=list(pinned), warm_limit=limit)
    for r in records:
        cat.add(r)
    return cat


def names(cat: Catalog) -> list[str]:
    return [n for n, _ in cat.desired()]


def test_desired_is_newest_first_with_paths() -> None:
    """Without pins, the warm set is newest first, ties by name, with the snapshot paths."""
    cat = catalog(rec("old", 1), rec("new", 3), rec("mid-b", 2), rec("mid-a", 2))
    assert names(cat) == ["new", "mid-a", "mid-b", "old"]
    assert cat.desired()[0] == ("new", f"/state/snapshots/new/{'0' * 32}")


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
    """Invalid, failed and settling adapters are not in the warm set, pinned or not, and do
    not take a place under the limit."""
    cat = catalog(
        rec("bad", 9, valid=False, reason="rank_too_large"),
        rec("settling", 9, valid=False),
        rec("stale", 9, reason="snapshot_failed"),  # a snapshot but a reason: not valid
        rec("ok", 1),
        rec("ok2", 0),
        pinned=("bad",),
        limit=1,
    )
    assert names(cat) == ["ok"]


def test_pins_of_unknown_names_are_ignored() -> None:
    """A pinned name with no folder does not appear or count."""
    assert names(catalog(rec("a", 1), pinned=("ghost",), limit=1)) == ["a"]


def test_empty_catalog_has_empty_warm_set() -> None:
    """No adapters, no warm set."""
    assert catalog().desired() == []


def test_catalog_bookkeeping() -> None:
    """Records iterate by name; get/remove/names/len and snapshot_paths agree."""
    cat = catalog(rec("b", 1), rec("a", 2), rec("c", 0, valid=False))
    assert [r.name for r in cat] == ["a", "b", "c"]
    assert len(cat) == 3
    assert cat.names() == {"a", "b", "c"}
    assert cat.snapshot_paths() == {Path(f"/state/snapshots/{n}/{'0' * 32}") for n in ("a", "b")}
    removed = cat.remove("b")
    assert removed is not None
    assert removed.name == "b"
    assert cat.remove("b") is None
    assert cat.get("b") is None


# --- an adapter's overall state ---------------------------------------------------------------

URLS = ["http://s1", "http://s2"]


def with_servers(*states: ServerState) -> AdapterRecord:
    r = rec("a", 1)
    r.servers = {u: ServerAdapter(state=s) for u, s in zip(URLS, states, strict=False)}
    return r


def test_state_summarises_the_servers() -> None:
    """loaded on all servers -> loaded; failed on any -> failed; cold on all -> cold; else
    pending (a server without an entry yet counts as pending)."""
    assert with_servers(ServerState.LOADED, ServerState.LOADED).state(URLS) is AdapterState.LOADED
    assert with_servers(ServerState.LOADED, ServerState.FAILED).state(URLS) is AdapterState.FAILED
    assert with_servers(ServerState.COLD, ServerState.COLD).state(URLS) is AdapterState.COLD
    assert with_servers(ServerState.LOADED, ServerState.PENDING).state(URLS) is (
        AdapterState.PENDING
    )
    assert with_servers(ServerState.LOADED).state(URLS) is AdapterState.PENDING


def test_state_before_and_without_a_snapshot() -> None:
    """No snapshot: settling until inspected, invalid when inspection refused it, failed when
    the snapshot could not be made; with no servers configured a valid one is pending."""
    settling = rec("a", 1, valid=False)
    settling.validated_at = None
    assert settling.state(URLS) is AdapterState.SETTLING
    assert rec("a", 1, valid=False, reason="rank_too_large").state(URLS) is AdapterState.INVALID
    failed = rec("a", 1, valid=False, reason="snapshot_failed")
    failed.validated_at = None
    assert failed.state(URLS) is AdapterState.FAILED
    assert rec("a", 1).state([]) is AdapterState.PENDING


def test_server_entry_is_created_on_demand() -> None:
    """record.server(url) creates a pending entry once and returns the same one after."""
    r = rec("a", 1)
    entry = r.server("http://s1")
    assert entry.state is ServerState.PENDING
    assert r.server("http://s1") is entry
