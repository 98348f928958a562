"""ServerReconciler against the fake vLLM (tests/support/fake_vllm.py): warm-set loading, unloads,
foreign adapters, per-adapter failures with backoff, server-wide conditions, recovery.

The catalog is built by hand from real snapshots (SnapshotStore over synthetic adapters), so the
paths sent to vLLM are the daemon's real ones. The first tests check the fake itself against the
answers recorded from a real vLLM 0.32 (tests/support/vllm_responses.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import pytest

from lorawarm.catalog import (
    AdapterRecord,
    AdapterState,
    Catalog,
    ServerAdapter,
    ServerState,
    adapter_state,
)
from lorawarm.inspection import Reason, Rules, Valid, inspect_adapter
from lorawarm.metrics import Metrics
from lorawarm.reconcile import ServerReconciler
from lorawarm.server_facts import LearnedFrom, ServerFacts
from lorawarm.snapshot import Snapshot, SnapshotStore
from lorawarm.vllm_client import Condition, ModelEntry, VllmClient
from tests.support import vllm_responses as recorded
from tests.support.fake_vllm import ROUTES, FakeVllm
from tests.unit.adapters import write_adapter

URL = "http://vllm.test:8000"
RULES = Rules(max_lora_rank=16)
RANK_MESSAGE = "LoRA rank 64 is greater than max_lora_rank 16."
VLLM_RANK_MESSAGE = (
    "Call to add_lora method failed: Worker failed with error 'LoRA rank 64 is greater than "
    "max_lora_rank 16.', please check the stack trace above for the root cause"
)


# --- the fake answers as the recorded vLLM does -----------------------------------------------


def _normalise(body: str) -> str:
    """/v1/models carries creation times and random permission ids: blank them."""
    body = re.sub(r'"created":\d+', '"created":0', body)
    return re.sub(r"modelperm-[0-9a-f]{16}", "modelperm-x", body)


def _recording_server(prefix: str) -> tuple[FakeVllm, list[str]]:
    """A fake set up like the real server of one recording run, and that run's entries."""
    adapters = recorded.RECORD_ADAPTER_DIR
    present = {f"{adapters}/{n}" for n in ("a", "b", "rank32", "no-weights", "truncated")}
    fake = FakeVllm(
        served_model_name=recorded.RECORD_SERVED_MODEL_NAME,
        model_path=recorded.RECORD_MODEL_PATH,
        adapter_exists=present.__contains__,
    )
    fake.reject("rank32", "LoRA rank 32 is greater than max_lora_rank 16.")
    fake.reject("noweights", f"{adapters}/no-weights doesn't contain tensors")
    fake.reject(
        "truncated",
        "Error while deserializing header: incomplete metadata, file not fully covered",
    )
    if prefix == "auth_":
        fake.api_key = recorded.RECORD_API_KEY
    if prefix == "noruntime_":
        fake.runtime_updates = False
    names = [
        n
        for n, req in recorded.REQUESTS.items()
        if req.path in ROUTES
        and (n.startswith(prefix) if prefix else not n.startswith(("auth_", "noruntime_")))
    ]
    return fake, names


def _replay(fake: FakeVllm, name: str) -> httpx.Response:
    req = recorded.REQUESTS[name]
    headers: dict[str, str] = {}
    if name.endswith("_wrong_key"):
        headers["Authorization"] = "Bearer wrong-key"
    elif name.startswith("auth_") and not name.endswith(("_missing_key", "_no_key")):
        headers["Authorization"] = f"Bearer {recorded.RECORD_API_KEY}"
    if name == "load_not_json":
        headers["Content-Type"] = "text/plain"
        request = httpx.Request(req.method, f"{URL}{req.path}", headers=headers, content=b"x=1")
    else:
        request = httpx.Request(req.method, f"{URL}{req.path}", headers=headers, json=req.json_body)
    request.read()
    return fake.handler(request)


@pytest.mark.parametrize("prefix", ["", "auth_", "noruntime_"], ids=["runtime", "key", "off"])
def test_fake_answers_exactly_as_the_recorded_vllm(prefix: str) -> None:
    """Replaying every recorded request on the lorawarm routes gives the recorded status,
    Content-Type (or none) and body, in the recorded order."""
    fake, names = _recording_server(prefix)
    assert names
    for name in names:
        want = recorded.RESPONSES[name]
        got = _replay(fake, name)
        assert got.status_code == want.status, name
        assert got.headers.get("content-type") == want.content_type, name
        assert _normalise(got.text) == _normalise(want.body), name


def test_fake_engine_dead_answers_follow_vllms_source() -> None:
    """With the engine dead: /health is an empty 503 without Content-Type, a load is vLLM's
    500 ErrorResponse with EngineDeadError's message, /v1/models still answers."""
    fake = FakeVllm(engine_alive=False)
    health = fake.handler(httpx.Request("GET", f"{URL}/health"))
    assert (health.status_code, health.headers.get("content-type"), health.text) == (
        503,
        None,
        "",
    )
    load = httpx.Request(
        "POST", f"{URL}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x/a"}
    )
    load.read()
    answer = fake.handler(load)
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {
        "error": {
            "message": "EngineCore encountered an issue. See stack trace (above) for the root "
            "cause.",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    models = fake.handler(httpx.Request("GET", f"{URL}/v1/models"))
    assert models.status_code == 200


# --- fixtures ---------------------------------------------------------------------------------


class Adapters:
    """Real snapshots of synthetic adapters, and catalog records pointing at them."""

    def __init__(self, drop: Path, store: SnapshotStore) -> None:
        self.drop = drop
        self.store = store

    def snapshot(self, name: str, seed: int = 0) -> Snapshot:
        return self.store.create(self.verdict(name, seed), RULES)

    def verdict(self, name: str, seed: int = 0, r: int = 8) -> Valid:
        folder = write_adapter(self.drop / name, seed=seed, r=r)
        result = inspect_adapter(folder, root=self.drop, rules=RULES, name=name)
        assert isinstance(result, Valid), result
        return result

    def record(self, name: str, *, mtime: float, seed: int = 0, r: int = 8) -> AdapterRecord:
        verdict = self.verdict(name, seed, r)
        return AdapterRecord(
            name=name,
            source_path=self.drop / name,
            settling=False,
            snapshot=self.store.create(verdict, RULES),
            adapter=verdict,
            seen_at=mtime,
            validated_at=time.time(),
        )

    def catalog(
        self,
        *names: str,
        pinned: tuple[str, ...] = (),
        complete: bool = True,
    ) -> Catalog:
        """Records for `names`, the first newest (so the warm order is `names` after pins)."""
        cat = Catalog(pinned=list(pinned), complete=complete)
        for i, name in enumerate(names):
            cat.add(self.record(name, mtime=1000.0 - i))
        return cat


@pytest.fixture
def adapters(tmp_path: Path) -> Adapters:
    drop = tmp_path / "drop"
    drop.mkdir()
    return Adapters(drop, SnapshotStore(tmp_path / "state"))


MakeReconciler = Callable[..., ServerReconciler]

# What a reconciler asks first after a (re)start: lorawarm's endpoint (absent from this vLLM).
LEARN = "/v1/lorawarm/server"


def as_list(facts: ServerFacts | list[ServerFacts]) -> list[ServerFacts]:
    return facts if isinstance(facts, list) else [facts]


def learned(
    *facts: ServerFacts,
) -> Callable[[VllmClient, Sequence[ModelEntry]], Awaitable[ServerFacts]]:
    """A learner that answers `facts` in turn (the last one from then on), as the server's
    lorawarm endpoint would."""
    answers = list(facts)

    async def learn(client: VllmClient, models: Sequence[ModelEntry]) -> ServerFacts:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return learn


@pytest.fixture
async def make(adapters: Adapters) -> AsyncIterator[MakeReconciler]:
    clients: list[VllmClient] = []

    def _make(
        fake: FakeVllm,
        catalog: Catalog,
        *,
        api_key: str | None = None,
        max_backoff: float = 0.2,
        resync: float = 30.0,
        health: float = 0.02,
        warm_limit: int | None = None,
        facts: ServerFacts | list[ServerFacts] | None = None,
    ) -> ServerReconciler:
        client = VllmClient(URL, api_key=api_key, transport=fake.transport(), timeout=1.0)
        clients.append(client)
        return ServerReconciler(
            client,
            catalog,
            adapters.store,
            Metrics(),
            resync_seconds=resync,
            health_seconds=health,
            max_backoff=max_backoff,
            warm_limit=warm_limit,
            **({} if facts is None else {"learner": learned(*as_list(facts))}),
        )

    yield _make
    for client in clients:
        await client.aclose()


def path(catalog: Catalog, name: str) -> str:
    record = catalog.get(name)
    assert record is not None
    assert record.snapshot is not None
    return str(record.snapshot.path)


def outcome(rec: ServerReconciler, catalog: Catalog, name: str) -> ServerAdapter:
    """What `rec` says of the adapter `name` (which must have a snapshot)."""
    record = catalog.get(name)
    assert record is not None
    entry = rec.outcome(record)
    assert entry is not None
    return entry


def entry_state(
    rec: ServerReconciler, catalog: Catalog, name: str
) -> tuple[ServerState, str | None]:
    entry = outcome(rec, catalog, name)
    return entry.state, entry.condition


def overall(rec: ServerReconciler, catalog: Catalog, name: str) -> AdapterState:
    """The adapter's overall state with `rec` as the only server."""
    record = catalog.get(name)
    assert record is not None
    entry = rec.outcome(record)
    return adapter_state(record, [] if entry is None else [entry])


def forget(catalog: Catalog, name: str) -> None:
    """The daemon dropping a record (its folder was deleted)."""
    catalog.remove(name)


def server_state(rec: ServerReconciler, catalog: Catalog, name: str) -> ServerState | None:
    record = catalog.get(name)
    entry = None if record is None else rec.outcome(record)
    return None if entry is None else entry.state


def sample(rec: ServerReconciler, metric: str, **labels: str) -> float:
    value = rec.metrics.registry.get_sample_value(metric, {"server": URL, **labels})
    return 0.0 if value is None else value


async def until(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --- loading the warm set ---------------------------------------------------------------------


async def test_loads_the_warm_set_in_order_one_at_a_time(adapters: Adapters) -> None:
    """The pinned adapter first, then newest first, each loaded from its absolute snapshot
    path, one call after the other, never in place."""
    cat = adapters.catalog("new", "mid", "old", pinned=("old",))
    fake = FakeVllm()
    in_flight = peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return fake.handler(request)

    client = VllmClient(URL, transport=httpx.MockTransport(slow))
    rec = ServerReconciler(
        client, cat, adapters.store, Metrics(), resync_seconds=30, health_seconds=1, max_backoff=1
    )
    await rec.sync()
    await client.aclose()
    assert fake.ops() == [
        ("load", "old", path(cat, "old")),
        ("load", "new", path(cat, "new")),
        ("load", "mid", path(cat, "mid")),
    ]
    assert peak == 1
    for request in (c for c in fake.calls if c.route == "load"):
        assert request.path is not None
        assert Path(request.path).is_absolute()
        assert Path(request.path).is_relative_to(adapters.store.root)
    assert fake.registry == {n: path(cat, n) for n in ("old", "new", "mid")}
    for name in ("old", "new", "mid"):
        assert entry_state(rec, cat, name) == (ServerState.LOADED, None)
        assert overall(rec, cat, name) is AdapterState.LOADED
        assert outcome(rec, cat, name).attempts == 1
        assert outcome(rec, cat, name).loaded_path == path(cat, name)
    assert rec.status.condition == Condition.OK
    assert rec.status.healthy
    assert (rec.status.loaded, rec.status.loads, rec.status.failures) == (3, 3, 0)
    assert rec.status.last_sync is not None
    assert rec.known
    assert rec.listed


async def test_load_requests_never_ask_for_in_place(adapters: Adapters) -> None:
    """Every load request carries load_inplace false (vllm#33791)."""
    cat = adapters.catalog("a")
    bodies: list[bytes] = []
    fake = FakeVllm()

    def spy(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/load_lora_adapter":
            bodies.append(request.content)
        return fake.handler(request)

    client = VllmClient(URL, transport=httpx.MockTransport(spy))
    rec = ServerReconciler(
        client, cat, adapters.store, Metrics(), resync_seconds=30, health_seconds=1, max_backoff=1
    )
    await rec.sync()
    await client.aclose()
    assert bodies == [
        f'{{"lora_name":"a","lora_path":"{path(cat, "a")}","load_inplace":false}}'.encode()
    ]


async def test_second_sync_changes_nothing(adapters: Adapters, make: MakeReconciler) -> None:
    """Once converged, a sync only lists the models: nothing is loaded twice."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    rec = make(fake, cat)
    await rec.sync()
    fake.calls.clear()
    await rec.sync()
    assert [c.route for c in fake.calls] == ["models"]


async def test_adapters_beyond_the_warm_limit_stay_cold(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """With warm_limit 1 only the newest is loaded; the other is cold, not pending."""
    cat = adapters.catalog("new", "old")
    fake = FakeVllm()
    rec = make(fake, cat, warm_limit=1)
    await rec.sync()
    assert fake.ops() == [("load", "new", path(cat, "new"))]
    assert entry_state(rec, cat, "old") == (ServerState.COLD, None)
    assert overall(rec, cat, "old") is AdapterState.COLD


async def test_pushed_out_of_the_warm_set_is_unloaded(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A newer adapter that pushes an old one out of the limit: the old one is unloaded first."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    rec = make(fake, cat, warm_limit=2)
    await rec.sync()
    cat.add(adapters.record("c", mtime=5000.0))
    fake.calls.clear()
    await rec.sync()
    assert fake.ops() == [("unload", "b", None), ("load", "c", path(cat, "c"))]
    assert entry_state(rec, cat, "b") == (ServerState.COLD, None)


# --- unloads ----------------------------------------------------------------------------------


async def test_deleted_adapter_is_unloaded(adapters: Adapters, make: MakeReconciler) -> None:
    """An adapter gone from the catalog is unloaded from vLLM; the others stay loaded."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    rec = make(fake, cat)
    await rec.sync()
    cat.remove("b")
    fake.calls.clear()
    await rec.sync()
    assert fake.ops() == [("unload", "b", None)]
    assert fake.registry == {"a": path(cat, "a")}
    assert rec.status.unloads == 1
    assert sample(rec, "lorawarm_unloads_total") == 1


async def test_during_the_first_scan_it_loads_and_unloads_nothing(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """While the first scan still fills the catalog, what it found is loaded at once (a cold
    start loads while it inspects), but an adapter the server holds that the scan has not
    reached yet is not taken for deleted; once the scan is done, it is."""
    stale = adapters.catalog("b")
    fake = FakeVllm()
    await make(fake, stale).sync()  # b loaded by an earlier lorawarm
    cat = adapters.catalog("a", complete=False)
    rec = make(fake, cat)
    fake.calls.clear()
    await rec.sync()
    assert fake.ops() == [("load", "a", path(cat, "a"))]
    assert set(fake.registry) == {"a", "b"}
    cat.mark_complete()
    fake.calls.clear()
    await rec.sync()
    assert fake.ops() == [("unload", "b", None)]


async def test_with_a_warm_limit_nothing_moves_before_the_first_scan_is_done(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """With a warm limit the order is not known until every folder was seen: nothing is
    loaded that the rest of the scan might push out again."""
    cat = adapters.catalog("a", "b", complete=False)
    fake = FakeVllm()
    rec = make(fake, cat, warm_limit=1)
    await rec.sync()
    assert fake.ops() == []
    cat.mark_complete()
    await rec.sync()
    assert fake.ops() == [("load", "a", path(cat, "a"))]


async def test_replaced_adapter_is_unloaded_before_the_new_path_loads(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A changed adapter (new snapshot) is unloaded, then loaded from the new path."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat)
    await rec.sync()
    old = path(cat, "a")
    record = cat.get("a")
    assert record is not None
    cat.set_snapshot(
        record, adapters.snapshot("a", seed=7), adapter=record.adapter, seen_at=record.seen_at
    )
    new = path(cat, "a")
    assert new != old
    fake.calls.clear()
    await rec.sync()
    assert fake.ops() == [("unload", "a", None), ("load", "a", new)]
    assert fake.registry == {"a": new}
    assert outcome(rec, cat, "a").loaded_path == new
    # Both loads were drop-to-ready events for a new snapshot.
    assert sample(rec, "lorawarm_drop_to_ready_seconds_count") == 2


async def test_invalid_adapter_is_unloaded_and_loses_its_server_entry(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An adapter that became invalid (no snapshot) is unloaded and shows no server state."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat)
    await rec.sync()
    record = cat.get("a")
    assert record is not None
    record.reason = Reason.RANK_TOO_LARGE
    cat.set_snapshot(record, None)
    await rec.sync()
    assert fake.registry == {}
    assert rec.outcome(record) is None


async def test_unload_of_a_name_vllm_already_forgot_is_fine(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """If the name vanished between listing and unloading (404 cannot be found), it counts as
    unloaded and the sync goes on."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    rec = make(fake, cat)
    await rec.sync()
    cat.remove("b")
    fake.fail("unload", before=lambda: fake.registry.clear())
    await rec.sync()
    assert fake.calls[-1].status == 404
    assert rec.status.condition == Condition.OK
    assert rec.actual == {"a": path(cat, "a")}


async def test_stale_snapshot_from_before_a_restart_is_unloaded(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A lorawarm restart finds one of its old snapshot paths loaded for a name it no longer
    has: it is ours, so it is unloaded; the current one is not loaded twice."""
    cat = adapters.catalog("a")
    stale = adapters.snapshot("gone", seed=3)
    fake = FakeVllm(registry={"a": path(cat, "a"), "gone": str(stale.path)})
    rec = make(fake, cat)
    await rec.sync()
    assert fake.ops() == [("unload", "gone", None)]
    assert entry_state(rec, cat, "a") == (ServerState.LOADED, None)


# --- adapters that are not ours ---------------------------------------------------------------


async def test_adapters_loaded_by_others_are_never_touched(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """Adapters whose root lies outside our snapshot root (someone else's, another state dir,
    a lookalike path) are neither unloaded nor counted as ours."""
    cat = adapters.catalog("a")
    theirs = {
        "theirs": "/opt/adapters/theirs",
        "other-state": f"/var/lib/other/snapshots/x/{'0' * 32}",
        "lookalike": f"{adapters.store.root}-old/x/{'0' * 32}",
        "staging": f"{adapters.store.root}/.staging/snap-1",
    }
    fake = FakeVllm(registry=dict(theirs))
    rec = make(fake, cat)
    await rec.sync()
    await rec.sync()
    assert fake.ops() == [("load", "a", path(cat, "a"))]
    assert fake.registry == {**theirs, "a": path(cat, "a")}
    assert rec.actual == {"a": path(cat, "a")}
    assert rec.status.loaded == 1


async def test_name_taken_by_a_foreign_adapter_is_a_conflict(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An adapter whose name vLLM already serves for someone else is failed as name_taken,
    never loaded over, and the other adapters still load."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm(registry={"a": "/opt/adapters/a"})
    rec = make(fake, cat)
    await rec.sync()
    assert fake.ops() == [("load", "b", path(cat, "b"))]
    assert fake.registry["a"] == "/opt/adapters/a"
    assert entry_state(rec, cat, "a") == (ServerState.FAILED, "name_taken")
    assert "rename the adapter folder" in (outcome(rec, cat, "a").last_error or "")


async def test_adapter_named_like_the_base_model_is_a_conflict(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An adapter folder named like the served base model (learned from /v1/models, not
    configured) is incompatible there and never sent to vLLM."""
    fake = FakeVllm()
    cat = Catalog(pinned=[])
    cat.add(adapters.record(fake.served_model_name, mtime=1.0))
    rec = make(fake, cat)
    await rec.sync()
    assert fake.ops() == []
    entry = outcome(rec, cat, fake.served_model_name)
    assert (entry.state, entry.reason) == (ServerState.INCOMPATIBLE, Reason.NAME_IS_BASE_MODEL)


# --- "already been loaded" --------------------------------------------------------------------


async def test_already_loaded_with_our_path_counts_as_loaded(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """vLLM's 400 "already been loaded" for the very path we sent (the plugin got there first)
    is a success: the adapter is loaded, nothing is retried or failed."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    fake.fail("load", before=lambda: fake.registry.update(a=path(cat, "a")))
    rec = make(fake, cat)
    await rec.sync()
    assert [(c.route, c.status) for c in fake.calls if c.route != LEARN] == [
        ("models", 200),
        ("load", 400),
        ("models", 200),
    ]
    assert entry_state(rec, cat, "a") == (ServerState.LOADED, None)
    assert rec.status.failures == 0
    assert sample(rec, "lorawarm_failures_total", condition="rejected") == 0
    fake.calls.clear()
    await rec.sync()
    assert [c.route for c in fake.calls] == ["models"]


async def test_already_loaded_from_another_path_is_failed(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A 400 "already been loaded" where vLLM holds the name from a path not ours fails the
    adapter; the other adapter is left alone."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    fake.fail("load", before=lambda: fake.registry.update(a="/opt/adapters/a"))
    rec = make(fake, cat)
    await rec.sync()
    state, condition = entry_state(rec, cat, "a")
    assert state is ServerState.FAILED
    assert condition == "name_taken"
    assert fake.registry == {"a": "/opt/adapters/a"}
    assert ("unload", "a", None) not in fake.ops()
    assert rec.status.failures == 1


# --- per-adapter failures ---------------------------------------------------------------------


async def test_rejected_adapter_fails_with_vllms_message_while_others_load(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """vLLM's 500 for one adapter fails that adapter with vLLM's own message; the adapters
    after it in the warm order still load, and the server stays OK."""
    cat = adapters.catalog("a", "b", "c")
    fake = FakeVllm()
    fake.reject("b", RANK_MESSAGE)
    rec = make(fake, cat)
    await rec.sync()
    assert [op[1] for op in fake.ops()] == ["a", "b", "c"]
    assert fake.registry.keys() == {"a", "c"}
    assert entry_state(rec, cat, "b") == (ServerState.FAILED, "rejected")
    assert outcome(rec, cat, "b").last_error == VLLM_RANK_MESSAGE
    assert overall(rec, cat, "b") is AdapterState.FAILED
    assert rec.status.condition == Condition.OK
    assert sample(rec, "lorawarm_failures_total", condition="rejected") == 1
    assert sample(rec, "lorawarm_loads_total") == 2


async def test_rejected_adapter_is_retried_only_after_its_backoff(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """Right after a rejection the adapter is not retried; once its backoff passed it is, and
    it loads when vLLM accepts it."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    fake.reject("b", RANK_MESSAGE)
    rec = make(fake, cat, max_backoff=0.2)
    await rec.sync()
    fake.calls.clear()
    await rec.sync()  # within the backoff (at least 0.1 s): b is not tried again
    assert fake.ops() == []
    assert entry_state(rec, cat, "b") == (ServerState.FAILED, "rejected")
    await asyncio.sleep(0.21)
    await rec.sync()  # due again: tried, rejected again
    assert fake.ops() == [("load", "b", path(cat, "b"))]
    fake.accept("b")
    await asyncio.sleep(0.21)
    await rec.sync()
    assert fake.registry.keys() == {"a", "b"}
    assert entry_state(rec, cat, "b") == (ServerState.LOADED, None)
    assert outcome(rec, cat, "b").attempts == 3
    assert outcome(rec, cat, "b").last_error is None
    assert sample(rec, "lorawarm_failures_total", condition="rejected") == 2


async def test_a_new_snapshot_of_a_rejected_adapter_is_tried_at_once(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """The backoff belongs to the snapshot that failed: a fixed adapter (new path) is loaded
    in the very next sync."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    fake.reject("a", RANK_MESSAGE)
    rec = make(fake, cat, max_backoff=30)
    await rec.sync()
    fake.accept("a")
    record = cat.get("a")
    assert record is not None
    cat.set_snapshot(
        record, adapters.snapshot("a", seed=9), adapter=record.adapter, seen_at=record.seen_at
    )
    await rec.sync()
    assert fake.registry == {"a": path(cat, "a")}


async def test_missing_snapshot_folder_is_a_rejection(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """vLLM's 404 "No adapter found" (the snapshot vanished) fails that adapter only."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm(adapter_exists=lambda p: not p.startswith(path(cat, "a")))
    rec = make(fake, cat)
    await rec.sync()
    assert fake.registry.keys() == {"b"}
    state, condition = entry_state(rec, cat, "a")
    assert (state, condition) == (ServerState.FAILED, "rejected")
    assert outcome(rec, cat, "a").last_error == "Loading lora a failed: No adapter found for <path>"


async def test_failed_adapter_removed_from_the_catalog_does_not_spin_the_loop(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A rejected adapter that is then deleted leaves no retry behind: once its backoff is
    over, run() does not re-sync every 10 ms (it waits for the resync timer)."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    fake.reject("b", RANK_MESSAGE)
    rec = make(fake, cat, max_backoff=0.05, resync=30.0, health=30.0)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: server_state(rec, cat, "b") is ServerState.FAILED)
        cat.remove("b")
        rec.wake()
        await asyncio.sleep(0.5)
        fake.calls.clear()
        await asyncio.sleep(0.5)
        assert [c.route for c in fake.calls if c.route == "models"] == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_conflicting_adapter_does_not_spin_the_loop(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An "already loaded from another path" failure that turns into a name conflict leaves
    run() waiting for the resync timer, not re-listing every 10 ms."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    fake.fail("load", before=lambda: fake.registry.update(a="/opt/adapters/a"))
    rec = make(fake, cat, max_backoff=0.05, resync=30.0, health=30.0)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: server_state(rec, cat, "a") is ServerState.FAILED)
        await asyncio.sleep(0.3)
        fake.calls.clear()
        await asyncio.sleep(0.5)
        assert [c.route for c in fake.calls if c.route == "models"] == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- server-wide conditions -------------------------------------------------------------------


async def test_unauthorized_marks_the_server_and_every_pending_adapter(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """vLLM's 401 (no or a wrong API key) makes the server `unauthorized` and every adapter
    waiting for it shows that condition; nothing is loaded."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm(api_key="sk-right")
    rec = make(fake, cat, api_key="sk-wrong")
    await rec.sync()
    assert fake.registry == {}
    assert rec.status.condition == "unauthorized"
    assert rec.status.message == "missing or wrong API key"
    assert rec.status.healthy  # vLLM itself is fine
    for name in ("a", "b"):
        assert entry_state(rec, cat, name) == (ServerState.PENDING, "unauthorized")
        assert overall(rec, cat, name) is AdapterState.PENDING
        assert outcome(rec, cat, name).last_error == "missing or wrong API key"
    assert sample(rec, "lorawarm_failures_total", condition="unauthorized") == 1
    assert sample(rec, "lorawarm_server_up") == 0
    assert not rec.known
    assert not rec.listed


async def test_an_adapter_valid_during_the_backoff_says_why_it_waits(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An adapter that becomes valid while its server is failing (and backing off) shows the
    server's condition at once, not only after the next attempt."""
    cat = adapters.catalog("a")
    fake = FakeVllm(api_key="sk-right")
    rec = make(fake, cat, api_key="sk-wrong")
    await rec.sync()
    calls = len(fake.calls)
    cat.add(adapters.record("late", mtime=2000.0))
    rec.wake()
    assert entry_state(rec, cat, "late") == (ServerState.PENDING, "unauthorized")
    assert len(fake.calls) == calls  # told from what is known: no request for it


async def test_right_api_key_is_accepted(adapters: Adapters, make: MakeReconciler) -> None:
    """With the server's key every call is authorised and the adapters load."""
    cat = adapters.catalog("a")
    fake = FakeVllm(api_key="sk-right")
    rec = make(fake, cat, api_key="sk-right")
    await rec.sync()
    assert fake.registry == {"a": path(cat, "a")}
    assert sample(rec, "lorawarm_server_up") == 1


async def test_route_404_means_runtime_updates_disabled(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """FastAPI's 404 on the load route: the server is `runtime_updates_disabled` and the
    adapters say so; the adapters are not failed one by one."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm(runtime_updates=False)
    rec = make(fake, cat)
    await rec.sync()
    assert rec.status.condition == "runtime_updates_disabled"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in (rec.status.message or "")
    assert [op[1] for op in fake.ops()] == ["a"]  # the first call tells: no more are made
    for name in ("a", "b"):
        assert entry_state(rec, cat, name) == (ServerState.PENDING, "runtime_updates_disabled")


async def test_engine_dead_during_a_load(adapters: Adapters, make: MakeReconciler) -> None:
    """A load answered with EngineDeadError's 500 makes the server `engine_dead`, unhealthy."""
    cat = adapters.catalog("a")
    fake = FakeVllm(engine_alive=False)
    rec = make(fake, cat)
    await rec.sync()
    assert rec.status.condition == "engine_dead"
    assert not rec.status.healthy
    assert entry_state(rec, cat, "a") == (ServerState.PENDING, "engine_dead")


async def test_health_503_is_engine_dead(adapters: Adapters, make: MakeReconciler) -> None:
    """The health probe's 503 turns a loaded server into `engine_dead`, and its adapters go
    back to pending (a dead engine has lost them)."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat, health=0.02)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: fake.registry.keys() == {"a"} and rec.status.condition == "ok")
        fake.engine_alive = False
        await until(lambda: rec.status.condition == "engine_dead")
        assert not rec.status.healthy
        assert entry_state(rec, cat, "a") == (ServerState.PENDING, "engine_dead")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_engine_dead_is_not_cleared_by_a_sync_while_health_fails(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """After /health said 503, a sync that only lists the models (the API server still
    answers) must not report the server ok and healthy again."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat, health=0.02)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: fake.registry.keys() == {"a"} and rec.status.condition == "ok")
        fake.engine_alive = False
        await until(lambda: rec.status.condition == "engine_dead")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await rec.sync()  # e.g. the catalog changed: /v1/models is 200, nothing to load
    assert fake.ops() == [("load", "a", path(cat, "a"))]
    assert (rec.status.condition, rec.status.healthy) == ("engine_dead", False)


async def test_unreachable_server(adapters: Adapters, make: MakeReconciler) -> None:
    """A refused connection makes the server `unreachable` with the reason in its message;
    only valid adapters get the condition."""
    cat = adapters.catalog("a")
    invalid = AdapterRecord(name="bad", source_path=adapters.drop / "bad", reason=Reason.BAD_FIELD)
    cat.add(invalid)
    fake = FakeVllm(reachable=False)
    rec = make(fake, cat)
    await rec.sync()
    assert rec.status.condition == "unreachable"
    assert "ConnectError" in (rec.status.message or "")
    assert not rec.status.healthy
    assert entry_state(rec, cat, "a") == (ServerState.PENDING, "unreachable")
    assert rec.outcome(invalid) is None
    assert adapter_state(invalid, []) is AdapterState.INVALID
    assert rec.status.failures == 1


@pytest.mark.parametrize(
    ("route", "exc", "condition"),
    [
        ("models", httpx.ConnectError, "unreachable"),
        ("models", httpx.ReadTimeout, "timeout"),
        ("load", httpx.RemoteProtocolError, "unreachable"),
        ("unload", httpx.ConnectError, "unreachable"),
    ],
)
async def test_converges_once_the_fault_ends(
    adapters: Adapters,
    make: MakeReconciler,
    route: str,
    exc: type[httpx.TransportError],
    condition: str,
) -> None:
    """A transport fault on any call gives the server its condition; the next sync after it
    ends unloads and loads what is left, and nothing already loaded is loaded twice."""
    cat = adapters.catalog("a", "b", "c")
    fake = FakeVllm(registry={"gone": str(adapters.snapshot("gone", seed=5).path)})
    if route == "load":
        fake.fail("load")  # a loads normally, then b's load fails
    fake.fail(route, raises=exc)
    rec = make(fake, cat)
    await rec.sync()
    assert rec.status.condition == condition
    await rec.sync()
    assert rec.status.condition == Condition.OK
    assert fake.registry == {n: path(cat, n) for n in ("a", "b", "c")}
    loads = [str(op[1]) for op in fake.ops("load")]
    assert sorted(set(loads)) == ["a", "b", "c"]
    assert loads.count("a") == 1
    for name in ("a", "b", "c"):
        assert entry_state(rec, cat, name) == (ServerState.LOADED, None)


async def test_load_timeout_while_health_answers_fails_only_that_adapter(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A load that times out while /health still answers fails that adapter (condition
    timeout, its own backoff); the server stays ok and the adapters after it still load."""
    cat = adapters.catalog("a", "b", "c")
    fake = FakeVllm()
    fake.fail("load")  # a loads normally, then b's load times out
    fake.fail("load", raises=httpx.ReadTimeout)
    rec = make(fake, cat, max_backoff=0.2)
    await rec.sync()
    calls = [c.route for c in fake.calls if c.route != LEARN]
    assert calls == ["models", "load", "load", "health", "models", "load"]
    assert fake.registry.keys() == {"a", "c"}
    assert entry_state(rec, cat, "b") == (ServerState.FAILED, "timeout")
    assert overall(rec, cat, "b") is AdapterState.FAILED
    assert (rec.status.condition, rec.status.healthy) == (Condition.OK, True)
    assert sample(rec, "lorawarm_failures_total", condition="timeout") == 1
    assert rec.status.failures == 1
    fake.calls.clear()
    await rec.sync()  # within b's backoff: not tried again, nothing else is held up
    assert fake.ops() == []
    await asyncio.sleep(0.21)
    await rec.sync()
    assert fake.ops() == [("load", "b", path(cat, "b"))]
    assert entry_state(rec, cat, "b") == (ServerState.LOADED, None)
    assert outcome(rec, cat, "b").attempts == 2


async def test_timed_out_load_that_vllm_finished_is_adopted(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A load whose answer timed out but which vLLM completed is found by the re-listing
    right after it: the adapter is loaded, not failed, and not loaded a second time."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    fake.fail(
        "load",
        before=lambda: fake.registry.update(a=path(cat, "a")),
        raises=httpx.ReadTimeout,
    )
    rec = make(fake, cat)
    await rec.sync()
    assert entry_state(rec, cat, "a") == (ServerState.LOADED, None)
    assert rec.actual == {"a": path(cat, "a")}
    assert rec.status.condition == Condition.OK
    fake.calls.clear()
    await rec.sync()
    assert [c.route for c in fake.calls] == ["models"]


async def test_load_timeout_while_health_fails_too_is_server_wide(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A load timeout when /health does not answer either is the server's problem: it goes
    `timeout` and unhealthy, its adapters wait with that condition, and the next sync
    converges."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    fake.fail("load", raises=httpx.ReadTimeout)
    fake.fail("health", raises=httpx.ReadTimeout)
    rec = make(fake, cat)
    await rec.sync()
    assert (rec.status.condition, rec.status.healthy) == (Condition.TIMEOUT, False)
    assert [op[1] for op in fake.ops()] == ["a"]  # b is not tried against a server that is down
    for name in ("a", "b"):
        assert entry_state(rec, cat, name) == (ServerState.PENDING, "timeout")
    assert sample(rec, "lorawarm_failures_total", condition="timeout") == 1
    await rec.sync()
    assert rec.status.condition == Condition.OK
    assert fake.registry == {n: path(cat, n) for n in ("a", "b")}


async def test_failed_health_probes_are_counted_once_per_outage(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """run(): a /health probe that starts failing counts one failure under its condition,
    however many probes fail after it; the next outage counts again."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat, resync=30.0, health=0.01)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        for outage in (1, 2):
            await until(lambda: fake.registry.keys() == {"a"} and rec.status.condition == "ok")
            fake.engine_alive = False
            await until(lambda: rec.status.condition == "engine_dead")
            await asyncio.sleep(0.1)  # ~10 more failing probes
            assert sample(rec, "lorawarm_failures_total", condition="engine_dead") == outage
            fake.restart()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_snapshots_in_use_and_released_for_the_collector(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A replaced snapshot leaves `snapshots_in_use()` for `released()` with the wall time it
    left the server; `forget_released` drops it; the new one is in use."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat)
    await rec.sync()
    old = path(cat, "a")
    assert rec.snapshots_in_use() == {old}
    assert rec.released() == {}
    record = cat.get("a")
    assert record is not None
    cat.set_snapshot(
        record, adapters.snapshot("a", seed=4), adapter=record.adapter, seen_at=record.seen_at
    )
    before = time.time()
    await rec.sync()
    new = path(cat, "a")
    assert rec.snapshots_in_use() == {new}
    assert set(rec.released()) == {old}
    assert before <= rec.released()[old] <= time.time()
    rec.forget_released([old])
    assert rec.released() == {}


async def test_a_snapshot_replaced_during_its_own_load_is_released_at_the_unload(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An adapter replaced while vLLM loads it is unloaded right after, and its old snapshot
    is in `released()` from that unload (the collector's grace counts from there)."""
    cat = adapters.catalog("a")
    record = cat.get("a")
    assert record is not None
    old = path(cat, "a")
    newer = adapters.snapshot("a", seed=4)
    fake = FakeVllm()
    fake.fail("load", before=lambda: cat.set_snapshot(record, newer, seen_at=1.0))
    rec = make(fake, cat)
    await rec.sync()
    assert fake.ops() == [("load", "a", old), ("unload", "a", None), ("load", "a", str(newer.path))]
    assert old not in rec.snapshots_in_use()
    assert old in rec.released()


async def test_restarted_server_is_rewarmed_on_the_next_sync(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """After a vLLM restart (registry emptied) the next sync loads the warm set again; the
    re-warm is not counted as drop-to-ready latency."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    rec = make(fake, cat)
    await rec.sync()
    fake.restart()
    await rec.sync()
    assert fake.registry == {n: path(cat, n) for n in ("a", "b")}
    assert [op[1] for op in fake.ops()] == ["a", "b", "a", "b"]
    assert sample(rec, "lorawarm_loads_total") == 4
    assert sample(rec, "lorawarm_drop_to_ready_seconds_count") == 2


async def test_run_rewarms_a_server_that_died_and_came_back(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """run(): the health probe sees the engine die and the restarted server come back, and
    the warm set is loaded again without any resync timer firing."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    rec = make(fake, cat, resync=30.0, health=0.02)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: len(fake.registry) == 2 and rec.status.condition == "ok")
        fake.engine_alive = False
        await until(lambda: rec.status.condition == "engine_dead")
        fake.restart()
        await until(lambda: len(fake.registry) == 2 and rec.status.condition == "ok")
        assert [op[1] for op in fake.ops()] == ["a", "b", "a", "b"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_run_retries_an_unreachable_server_with_backoff(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """run(): a server refusing connections is retried after the backoff and warmed once it
    answers; the retries are spaced, not a busy loop."""
    cat = adapters.catalog("a")
    fake = FakeVllm(reachable=False)
    rec = make(fake, cat, max_backoff=0.1, resync=30.0, health=30.0)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: rec.status.condition == "unreachable")
        await asyncio.sleep(0.3)
        attempts = len([c for c in fake.calls if c.route == "models"])
        assert 2 <= attempts <= 10
        fake.reachable = True
        await until(lambda: fake.registry.keys() == {"a"})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_run_resyncs_on_its_timer(adapters: Adapters, make: MakeReconciler) -> None:
    """run(): without any wake-up, the resync timer re-lists the server and repairs it."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat, resync=0.1, health=30.0)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: fake.registry.keys() == {"a"})
        fake.registry.clear()  # lost behind our back, health never noticed
        await until(lambda: fake.registry.keys() == {"a"})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_run_ignores_wake_ups_during_the_server_backoff(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """run(): catalog changes while the server is backing off do not make it call the server
    again before the backoff is over; a failing health probe repeats no condition change."""
    cat = adapters.catalog("a")
    fake = FakeVllm(reachable=False)
    rec = make(fake, cat, max_backoff=5.0, resync=30.0, health=0.02)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: any(c.route == "models" for c in fake.calls))
        await until(lambda: rec.status.condition == "unreachable")
        since = rec.status.since
        for _ in range(5):
            rec.wake()
            await asyncio.sleep(0.03)
        assert [c.route for c in fake.calls].count("models") == 1
        assert rec.status.since == since
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_steady_state_run_only_probes_health(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """run(): once converged and healthy, the loop only probes /health."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat, resync=30.0, health=0.01)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: rec.status.condition == "ok")
        fake.calls.clear()
        await asyncio.sleep(0.1)
        assert {c.route for c in fake.calls} == {"health"}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_adapter_deleted_while_its_load_runs_is_unloaded(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An adapter removed from the catalog while vLLM loads it is unloaded right after."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    fake.fail("load", before=lambda: forget(cat, "a"))
    rec = make(fake, cat)
    await rec.sync()
    assert [op[0] for op in fake.ops()] == ["load", "unload"]
    assert fake.registry == {}


async def test_adapter_deleted_while_its_load_is_rejected(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """A rejection for an adapter deleted meanwhile is counted, and nothing else happens."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    fake.reject("a", RANK_MESSAGE)
    fake.fail("load", before=lambda: forget(cat, "a"))
    rec = make(fake, cat)
    await rec.sync()
    assert fake.registry == {}
    assert rec.status.failures == 1
    assert rec.status.condition == Condition.OK


async def test_version_moves_with_every_status_change(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """`version` is bumped by every sync and condition change (what the daemon watches to
    know the status changed), and stays put while nothing happens."""
    cat = adapters.catalog("a")
    fake = FakeVllm(reachable=False)
    rec = make(fake, cat)
    before = rec.version
    await rec.sync()
    assert rec.version >= before + 2  # condition changed + sync finished
    settled = rec.version
    assert rec.version == settled
    fake.reachable = True
    await rec.sync()
    assert rec.version > settled


async def test_a_catalog_change_wakes_the_reconciler(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """run(): a change of the warm set wakes the reconciler through its catalog subscription
    (no wake() call, no resync timer); a status-only change (touch) does not."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat, resync=30.0, health=30.0)
    task = asyncio.create_task(rec.run())
    rec.wake()  # as the daemon does once its first scan is done
    try:
        await until(lambda: fake.registry.keys() == {"a"} and rec.status.condition == "ok")
        fake.calls.clear()
        cat.touch()
        await asyncio.sleep(0.1)
        assert [c.route for c in fake.calls if c.route != "health"] == []
        cat.add(adapters.record("b", mtime=5000.0))
        await until(lambda: fake.registry.keys() == {"a", "b"})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_metrics_move_with_the_work(adapters: Adapters, make: MakeReconciler) -> None:
    """loads, unloads, failures by condition, reconcile duration and server_up are exported."""
    cat = adapters.catalog("a", "b")
    fake = FakeVllm()
    fake.reject("b", RANK_MESSAGE)
    rec = make(fake, cat)
    await rec.sync()
    cat.remove("a")
    await rec.sync()
    fake.reachable = False
    await rec.sync()
    assert sample(rec, "lorawarm_loads_total") == 1
    assert sample(rec, "lorawarm_unloads_total") == 1
    assert sample(rec, "lorawarm_failures_total", condition="rejected") == 1
    assert sample(rec, "lorawarm_failures_total", condition="unreachable") == 1
    assert sample(rec, "lorawarm_reconcile_seconds_count") == 3
    assert sample(rec, "lorawarm_drop_to_ready_seconds_count") == 1
    assert sample(rec, "lorawarm_server_up") == 0
    assert (rec.status.loads, rec.status.unloads, rec.status.failures) == (1, 1, 2)


async def test_a_load_is_in_flight_until_the_next_listing(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """`loading` names the snapshot of the last load asked for, answered or not, until vLLM is
    listed again: snapshot collection keeps it meanwhile."""
    cat = adapters.catalog("a")
    fake = FakeVllm()
    rec = make(fake, cat)
    seen: list[str | None] = []
    fake.fail("load", before=lambda: seen.append(rec.loading))
    await rec.sync()
    assert path(cat, "a") in seen  # set while vLLM was answering the load
    assert server_state(rec, cat, "a") is ServerState.LOADED
    await rec.sync()
    assert rec.loading is None


# --- what fits this server, and what its memory keeps -----------------------------------------

TINY = ServerFacts(
    learned_from=(LearnedFrom.PLUGIN,),
    model="/models/tiny-llama",
    served_model_names=("tiny-llama",),
    max_lora_rank=8,
    max_loras=2,
    max_cpu_loras=2,
    resolver=True,
    resident=frozenset(),
)


async def test_an_adapter_the_server_cannot_take_is_never_sent(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """Judged against what the server serves (its --max-lora-rank here), a rank-16 adapter is
    incompatible there and never sent; the rank-8 one loads."""
    cat = Catalog(pinned=[])
    cat.add(adapters.record("big", mtime=2.0, r=16))
    cat.add(adapters.record("small", mtime=1.0))
    fake = FakeVllm()
    rec = make(fake, cat, facts=dataclasses.replace(TINY, resolver=False))
    await rec.sync()
    assert fake.ops() == [("load", "small", path(cat, "small"))]
    big = outcome(rec, cat, "big")
    assert (big.state, big.reason) == (ServerState.INCOMPATIBLE, Reason.RANK_TOO_LARGE)
    assert overall(rec, cat, "big") is AdapterState.INCOMPATIBLE


async def test_with_the_resolver_on_only_what_the_engine_keeps_is_loaded(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """Where lorawarm's resolver serves the rest, the warm set is the engine's CPU cache
    (max_cpu_loras): the newest two are loaded, the others cold; without the resolver every
    adapter stays loaded (it could not be requested otherwise)."""
    cat = adapters.catalog("d", "c", "b", "a")
    fake = FakeVllm()
    rec = make(fake, cat, facts=TINY)
    await rec.sync()
    assert fake.ops() == [("load", "d", path(cat, "d")), ("load", "c", path(cat, "c"))]
    assert rec.effective_warm_limit == 2
    assert entry_state(rec, cat, "a") == (ServerState.COLD, None)
    other = make(FakeVllm(), cat, facts=dataclasses.replace(TINY, resolver=False))
    await other.sync()
    assert set(other.actual) == {"a", "b", "c", "d"}
    assert other.effective_warm_limit is None
    assert make(FakeVllm(), cat, facts=TINY, warm_limit=3).effective_warm_limit == 3


async def test_a_requested_adapter_joins_the_warm_set_without_churn(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An adapter the resolver loaded on request (listed, not loaded by lorawarm) is kept, and
    the least wanted one makes room; later syncs change nothing, so repeated requests to it
    cost no load and no unload."""
    cat = adapters.catalog("d", "c", "b", "a")
    fake = FakeVllm()
    rec = make(fake, cat, facts=TINY)
    await rec.sync()
    fake.registry["a"] = path(cat, "a")  # a request made the resolver load it
    fake.calls.clear()
    await rec.sync()
    assert fake.ops() == [("unload", "c", None)]
    assert set(fake.registry) == {"a", "d"}
    assert entry_state(rec, cat, "a") == (ServerState.LOADED, None)
    fake.calls.clear()
    for _ in range(3):
        await rec.sync()
    assert fake.ops() == []


async def test_resident_says_what_the_engine_holds(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """Each adapter's entry says whether the engine holds it in memory, as the server's
    endpoint reports; unknown (None) before anything was learned."""
    cat = adapters.catalog("b", "a")
    fake = FakeVllm()
    rec = make(fake, cat, facts=dataclasses.replace(TINY, resident=frozenset({"b"})))
    assert outcome(rec, cat, "a").resident is None
    await rec.sync()
    assert (outcome(rec, cat, "a").resident, outcome(rec, cat, "b").resident) == (False, True)


async def test_what_the_resolver_loaded_stays_while_its_folder_is_judged(
    adapters: Adapters, make: MakeReconciler
) -> None:
    """An adapter the resolver loaded whose folder the daemon is still settling is not
    unloaded (it would be loaded again a moment later); once the folder is judged invalid, it
    is."""
    cat = Catalog(pinned=[])
    snap = adapters.snapshot("a")
    record = AdapterRecord(name="a", source_path=adapters.drop / "a", settling=True)
    cat.add(record)
    fake = FakeVllm()
    fake.registry["a"] = str(snap.path)
    rec = make(fake, cat)
    await rec.sync()
    assert fake.ops() == []
    assert fake.registry == {"a": str(snap.path)}
    record.settling, record.reason, record.message = False, Reason.BAD_FIELD, "r is 0"
    cat.touch()
    cat.mark_complete()
    await rec.sync()
    assert fake.ops() == [("unload", "a", None)]


async def test_what_the_engine_holds_moving_judges_nothing_again(
    adapters: Adapters, make: MakeReconciler, capsys: pytest.CaptureFixture[str]
) -> None:
    """The engine's memory changes with every request: learning it again re-reads `resident`
    but judges no adapter again (an incompatible one is reported once, not at every look)."""
    cat = Catalog(pinned=[])
    cat.add(adapters.record("big", mtime=2.0, r=16))
    moving = [dataclasses.replace(TINY, resident=frozenset({f"x{i}"})) for i in range(4)]
    rec = make(FakeVllm(), cat, resync=0.0001, facts=moving)
    for _ in range(4):
        await rec.sync()
        assert outcome(rec, cat, "big").state is ServerState.INCOMPATIBLE
    assert rec.facts is not None
    assert rec.facts.resident == frozenset({"x3"})
    assert capsys.readouterr().out.count("adapter_incompatible") == 1
