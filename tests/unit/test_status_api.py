"""The status API (FastAPI app over a StatusSource), through httpx's ASGI transport."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorawarm import __version__
from lorawarm.catalog import AdapterRecord, Catalog, ServerAdapter, ServerState
from lorawarm.fit import FitPolicy
from lorawarm.inspection import Reason
from lorawarm.metrics import Metrics
from lorawarm.reconcile import ServerStatus
from lorawarm.server_facts import LearnedFrom, ServerFacts
from lorawarm.snapshot import Snapshot
from lorawarm.status import create_app
from lorawarm.vllm_client import Condition

S1 = "http://vllm-1:8000"
S2 = "http://vllm-2:8000"
TOKEN = "status-token-123"
DIGEST = "0123456789abcdef0123456789abcdef"
T0 = 1_790_000_000.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass
class Server:
    """One server as the status API reads it: a reconciler's url, status and outcomes."""

    url: str
    status: ServerStatus
    outcomes: dict[str, ServerAdapter] = field(default_factory=dict)
    facts: ServerFacts | None = None
    effective_warm_limit: int | None = None
    policy: FitPolicy = field(default_factory=FitPolicy)

    def outcome(self, record: AdapterRecord) -> ServerAdapter | None:
        """As a reconciler answers: nothing without a snapshot, pending when it has no word."""
        if record.snapshot is None:
            return None
        return self.outcomes.get(record.name, ServerAdapter())


@dataclass
class Source:
    """A StatusSource as the daemon provides it."""

    catalog: Catalog
    metrics: Metrics
    servers: list[Server]
    is_ready: bool = False
    drop_dir_ok: bool = True
    watch_problem: str | None = None
    collection_held: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.is_ready


def snap(name: str) -> Snapshot:
    return Snapshot(name, DIGEST, Path(f"/var/lib/lorawarm/snapshots/{name}/{DIGEST}"))


def record(name: str, **kwargs: Any) -> AdapterRecord:
    base: dict[str, Any] = {
        "name": name,
        "source_path": Path(f"/srv/adapters/{name}"),
        "first_seen": T0,
        "changed_at": T0 + 1,
        "settling": False,
        "validated_at": T0 + 2,
    }
    base.update(kwargs)
    return AdapterRecord(**base)


def make_source() -> Source:
    """One adapter in each state: loaded, invalid, settling, failed (on one server), pending
    (org/name), cold, incompatible (with every server); one loaded where it fits (S2) and
    incompatible elsewhere. S1 was learned from lorawarm's endpoint, S2 not at all."""
    cat = Catalog(pinned=[])
    cat.add(record("loaded", snapshot=snap("loaded")))
    cat.add(record("bad", reason=Reason.RANK_TOO_LARGE, message="rank 64 is above 16"))
    cat.add(record("copying", settling=True, validated_at=None))
    cat.add(record("broken", snapshot=snap("broken")))
    cat.add(record("org/waiting", snapshot=snap("org/waiting")))
    cat.add(record("chilly", snapshot=snap("chilly")))
    cat.add(record("alien", snapshot=snap("alien")))
    cat.add(record("picky", snapshot=snap("picky")))
    alien = ServerAdapter(
        ServerState.INCOMPATIBLE,
        last_error="lora_B of q_proj is [128, 8]; the model's q_proj takes [256, r]",
        reason=Reason.SHAPE_MISMATCH,
    )
    s1 = Server(
        S1,
        ServerStatus(
            url=S1,
            condition=Condition.OK,
            healthy=True,
            since=T0,
            last_sync=T0 + 9,
            loaded=1,
            loads=2,
        ),
        {
            "loaded": ServerAdapter(ServerState.LOADED, attempts=1, loaded_at=T0 + 3),
            "broken": ServerAdapter(
                ServerState.FAILED,
                attempts=3,
                condition=Condition.REJECTED,
                last_error="Call to add_lora method failed: ...",
            ),
            "chilly": ServerAdapter(ServerState.COLD),
            "alien": alien,
            "picky": ServerAdapter(
                ServerState.INCOMPATIBLE,
                last_error="rank 16 is above the server's --max-lora-rank 8",
                reason=Reason.RANK_TOO_LARGE,
            ),
        },
        facts=ServerFacts(
            learned_from=(LearnedFrom.PLUGIN,),
            vllm_version="0.32.0",
            model="/models/tiny",
            served_model_names=("tiny",),
            max_lora_rank=8,
            max_loras=2,
            max_cpu_loras=4,
            resolver=True,
            resident=frozenset({"loaded"}),
        ),
        effective_warm_limit=4,
    )
    s2 = Server(
        S2,
        ServerStatus(
            url=S2,
            condition=Condition.UNREACHABLE,
            message="ConnectError: [Errno 111] Connection refused",
            since=T0 + 7,
            failures=4,
        ),
        {
            "loaded": ServerAdapter(ServerState.LOADED, attempts=2, loaded_at=T0 + 4),
            "broken": ServerAdapter(ServerState.LOADED, attempts=1, loaded_at=T0 + 5),
            "chilly": ServerAdapter(ServerState.COLD),
            "alien": alien,
            "picky": ServerAdapter(
                ServerState.LOADED,
                attempts=1,
                loaded_at=T0 + 6,
                warnings=("base_model_differs",),
            ),
        },
    )
    return Source(cat, Metrics(), [s1, s2])


Client = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    opened: list[httpx.AsyncClient] = []

    def make(source: Source, token: str | None = None) -> httpx.AsyncClient:
        app = create_app(source, token=token)
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://status")
        opened.append(c)
        return c

    yield make
    for c in opened:
        await c.aclose()


async def test_healthz_answers_with_the_version(client: Client) -> None:
    """/healthz is 200 {"status": "ok", "version"} as long as the loop answers."""
    response = await client(make_source()).get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "version": __version__,
        "drop_dir": "ok",
        "watch": "ok",
    }


async def test_healthz_says_when_the_drop_dir_is_missing(client: Client) -> None:
    """/healthz stays 200 (the daemon lives) but reports drop_dir missing."""
    source = make_source()
    source.drop_dir_ok = False
    response = await client(source).get("/healthz")
    assert response.status_code == 200
    assert response.json()["drop_dir"] == "missing"


async def test_readyz_does_not_claim_a_missing_drop_dir_is_ok(client: Client) -> None:
    """/readyz carries the same drop_dir field; it must not say ok while the dir is missing."""
    source = make_source()
    source.is_ready = True
    source.drop_dir_ok = False
    assert (await client(source).get("/readyz")).json()["drop_dir"] == "missing"


async def test_readyz_is_503_until_the_first_scan_then_200(client: Client) -> None:
    """/readyz says starting (503) before the first scan is done and ready (200) after."""
    source = make_source()
    c = client(source)
    response = await c.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "starting",
        "version": __version__,
        "drop_dir": "ok",
        "watch": "ok",
    }
    source.is_ready = True
    response = await c.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "version": __version__,
        "drop_dir": "ok",
        "watch": "ok",
    }


async def test_adapters_lists_every_record_with_counts(client: Client) -> None:
    """/v1/adapters lists all adapters by name with their state, and counts every state."""
    body = (await client(make_source()).get("/v1/adapters")).json()
    assert set(body) == {"adapters", "counts"}
    states = {a["name"]: a["state"] for a in body["adapters"]}
    assert list(states) == sorted(states)
    assert states == {
        "alien": "incompatible",
        "picky": "loaded",
        "bad": "invalid",
        "broken": "failed",
        "chilly": "cold",
        "copying": "settling",
        "loaded": "loaded",
        "org/waiting": "pending",
    }
    assert body["counts"] == {
        "settling": 1,
        "invalid": 1,
        "failed": 1,
        "pending": 1,
        "loaded": 2,
        "cold": 1,
        "incompatible": 1,
    }


async def test_adapter_json_shape(client: Client) -> None:
    """Each adapter has the documented fields, timestamps in ISO UTC, and per server its url,
    state, attempts, condition, last error and load time."""
    body = (await client(make_source()).get("/v1/adapters")).json()
    by_name = {a["name"]: a for a in body["adapters"]}
    broken = by_name["broken"]
    assert set(broken) == {
        "name",
        "state",
        "reason",
        "message",
        "pending_reason",
        "pending_message",
        "digest",
        "source_path",
        "snapshot_path",
        "first_seen",
        "changed_at",
        "validated_at",
        "servers",
        "source",
    }
    assert broken["source"] is None  # no sources configured: dropped by hand
    assert broken["digest"] == DIGEST
    assert broken["source_path"] == "/srv/adapters/broken"
    assert broken["snapshot_path"] == f"/var/lib/lorawarm/snapshots/broken/{DIGEST}"
    assert broken["first_seen"] == iso(T0)
    assert broken["first_seen"].endswith("+00:00")
    assert broken["servers"] == [
        {
            "url": S1,
            "state": "failed",
            "reason": None,
            "warnings": [],
            "resident": None,
            "attempts": 3,
            "condition": "rejected",
            "last_error": "Call to add_lora method failed: ...",
            "loaded_at": None,
        },
        {
            "url": S2,
            "state": "loaded",
            "reason": None,
            "warnings": [],
            "resident": None,
            "attempts": 1,
            "condition": None,
            "last_error": None,
            "loaded_at": iso(T0 + 5),
        },
    ]
    alien, picky = by_name["alien"], by_name["picky"]
    assert alien["state"] == "incompatible"
    assert [(s["state"], s["reason"]) for s in alien["servers"]] == [
        ("incompatible", "shape_mismatch"),
        ("incompatible", "shape_mismatch"),
    ]
    assert "q_proj" in alien["servers"][0]["last_error"]
    # Loaded where it fits: loaded, with the other server's reason and this one's warning.
    assert picky["state"] == "loaded"
    assert [(s["state"], s["reason"], s["warnings"]) for s in picky["servers"]] == [
        ("incompatible", "rank_too_large", []),
        ("loaded", None, ["base_model_differs"]),
    ]
    bad = by_name["bad"]
    assert (bad["reason"], bad["message"]) == ("rank_too_large", "rank 64 is above 16")
    assert (bad["digest"], bad["snapshot_path"], bad["servers"]) == (None, None, [])
    assert by_name["copying"]["validated_at"] is None


async def test_one_adapter_by_org_name(client: Client) -> None:
    """/v1/adapters/org/name returns that adapter; a server without an entry is pending."""
    response = await client(make_source()).get("/v1/adapters/org/waiting")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "org/waiting"
    assert body["state"] == "pending"
    assert [s["state"] for s in body["servers"]] == ["pending", "pending"]


async def test_unknown_adapter_is_404(client: Client) -> None:
    """An unknown name is a 404 naming it (cut to a sane length)."""
    c = client(make_source())
    response = await c.get("/v1/adapters/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "no adapter named 'nope'"}
    long = await c.get("/v1/adapters/" + "x" * 1000)
    assert long.status_code == 404
    assert len(long.json()["detail"]) < 300


async def test_servers_lists_conditions(client: Client) -> None:
    """/v1/servers shows every server's condition, message, health and counters."""
    body = (await client(make_source()).get("/v1/servers")).json()
    assert body == {
        "servers": [
            {
                "url": S1,
                "condition": "ok",
                "message": None,
                "healthy": True,
                "since": iso(T0),
                "last_sync": iso(T0 + 9),
                "loaded": 1,
                "loads": 2,
                "unloads": 0,
                "failures": 0,
                "collection_held": None,
                "learned_from": ["plugin"],
                "model": "/models/tiny",
                "served_model_names": ["tiny"],
                "vllm_version": "0.32.0",
                "max_lora_rank": 8,
                "max_loras": 2,
                "max_cpu_loras": 4,
                "resolver": True,
                "warm_limit": 4,
                "resident": ["loaded"],
            },
            {
                "url": S2,
                "condition": "unreachable",
                "message": "ConnectError: [Errno 111] Connection refused",
                "healthy": False,
                "since": iso(T0 + 7),
                "last_sync": None,
                "loaded": 0,
                "loads": 0,
                "unloads": 0,
                "failures": 4,
                "collection_held": None,
                "learned_from": [],
                "model": None,
                "served_model_names": [],
                "vllm_version": None,
                "max_lora_rank": None,
                "max_loras": None,
                "max_cpu_loras": None,
                "resolver": None,
                "warm_limit": None,
                "resident": None,
            },
        ]
    }


async def test_metrics_are_prometheus_text_with_adapter_states(client: Client) -> None:
    """/metrics is Prometheus text exposition with lorawarm_ metrics, adapters by state
    computed at scrape time."""
    source = make_source()
    source.metrics.loads.labels(S1).inc(2)
    source.metrics.reconcile_seconds.labels(S1).observe(0.01)
    response = await client(source).get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert {
        "lorawarm_adapters",
        "lorawarm_loads",
        "lorawarm_reconcile_seconds",
    } <= set(families)
    adapters = {s.labels["state"]: s.value for s in families["lorawarm_adapters"].samples}
    assert adapters == {
        "settling": 1,
        "invalid": 1,
        "failed": 1,
        "pending": 1,
        "loaded": 2,
        "cold": 1,
        "incompatible": 1,
    }
    loads = [s for s in families["lorawarm_loads"].samples if s.name == "lorawarm_loads_total"]
    assert [(s.labels, s.value) for s in loads] == [({"server": S1}, 2.0)]
    assert all(name.startswith("lorawarm_") for name in families)


async def test_metrics_follow_the_catalog(client: Client) -> None:
    """A scrape after an adapter left the catalog no longer counts it."""
    source = make_source()
    c = client(source)
    await c.get("/metrics")
    source.catalog.remove("loaded")
    source.catalog.remove("picky")
    text = (await c.get("/metrics")).text
    assert 'lorawarm_adapters{state="loaded"} 0.0' in text


PROTECTED = ["/readyz", "/v1/adapters", "/v1/adapters/loaded", "/v1/servers", "/metrics"]


@pytest.mark.parametrize("route", PROTECTED)
@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"bearer{TOKEN}", TOKEN, f"Basic {TOKEN}"],
    ids=["none", "wrong", "longer", "no-space", "bare", "basic"],
)
async def test_token_refuses_missing_or_wrong(
    client: Client, route: str, header: str | None
) -> None:
    """With a token set every route but /healthz answers 401 without the exact bearer token."""
    c = client(make_source(), token=TOKEN)
    headers = {} if header is None else {"Authorization": header}
    response = await c.get(route, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in response.text


@pytest.mark.parametrize("route", PROTECTED)
async def test_token_accepts_the_right_one(client: Client, route: str) -> None:
    """With the right bearer token every route answers normally."""
    source = make_source()
    source.is_ready = True
    c = client(source, token=TOKEN)
    response = await c.get(route, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200


async def test_healthz_needs_no_token(client: Client) -> None:
    """/healthz stays open for liveness probes even with a token set."""
    response = await client(make_source(), token=TOKEN).get("/healthz")
    assert response.status_code == 200


async def test_without_token_everything_is_open(client: Client) -> None:
    """With no token configured, no route asks for one."""
    source = make_source()
    source.is_ready = True
    c = client(source)
    for route in PROTECTED:
        assert (await c.get(route)).status_code == 200


async def test_api_is_read_only_and_has_no_docs(client: Client) -> None:
    """Writes are refused (405) and there is no Swagger UI; the OpenAPI schema documents the
    JSON."""
    c = client(make_source())
    assert (await c.post("/v1/adapters")).status_code == 405
    assert (await c.delete("/v1/adapters/loaded")).status_code == 405
    assert (await c.get("/docs")).status_code == 404
    schema = (await c.get("/openapi.json")).json()
    assert {"/healthz", "/readyz", "/v1/adapters", "/v1/servers", "/metrics"} <= set(
        schema["paths"]
    )
    assert "AdapterView" in schema["components"]["schemas"]


async def test_status_reads_live_state(client: Client) -> None:
    """The API reads the source on every request: a change shows at once."""
    source = make_source()
    c = client(source)
    source.servers[1].status.condition = Condition.OK
    source.servers[1].status.last_sync = time.time()
    body = (await c.get("/v1/servers")).json()
    assert body["servers"][1]["condition"] == "ok"


async def test_healthz_reports_a_watch_problem(client: Client) -> None:
    """/healthz stays 200 and carries the watcher's problem in `watch` (ok without one)."""
    source = make_source()
    c = client(source)
    assert (await c.get("/healthz")).json()["watch"] == "ok"
    source.watch_problem = "inotify watch limit reached (fs.inotify.max_user_watches)"
    response = await c.get("/healthz")
    assert response.status_code == 200
    assert response.json()["watch"] == source.watch_problem


async def test_readyz_does_not_claim_a_failed_watch_is_ok(client: Client) -> None:
    """/readyz carries the same watch field; it must not say ok while events are not watched."""
    source = make_source()
    source.is_ready = True
    source.watch_problem = "inotify watch limit reached"
    assert (await client(source).get("/readyz")).json()["watch"] == "inotify watch limit reached"


async def test_servers_say_why_collection_is_held(client: Client) -> None:
    """/v1/servers shows, per server, why snapshot collection waits for it (null otherwise)."""
    source = make_source()
    source.collection_held = {S2: "never listed since lorawarm started"}
    body = (await client(source).get("/v1/servers")).json()
    held = {s["url"]: s["collection_held"] for s in body["servers"]}
    assert held == {S1: None, S2: "never listed since lorawarm started"}


async def test_newer_invalid_content_is_pending_beside_the_served_snapshot(
    client: Client,
) -> None:
    """A record with a snapshot and a reason keeps its state from the servers (loaded): its
    reason/message are null and pending_reason/pending_message say why the newer content is
    not served."""
    source = make_source()
    served = source.catalog.get("loaded")
    assert served is not None
    served.reason = Reason.RANK_TOO_LARGE
    served.message = "rank 64 is above 16"
    source.catalog.touch()
    body = (await client(source).get("/v1/adapters/loaded")).json()
    assert body["state"] == "loaded"
    assert (body["reason"], body["message"]) == (None, None)
    assert (body["pending_reason"], body["pending_message"]) == (
        "rank_too_large",
        "rank 64 is above 16",
    )
    assert body["snapshot_path"] == f"/var/lib/lorawarm/snapshots/loaded/{DIGEST}"
    bad = (await client(source).get("/v1/adapters/bad")).json()
    assert (bad["reason"], bad["pending_reason"], bad["pending_message"]) == (
        "rank_too_large",
        None,
        None,
    )


async def test_reading_the_status_writes_nothing(client: Client) -> None:
    """GETs of every route leave the catalog (records and versions) and the servers as they
    were."""
    source = make_source()
    records = copy.deepcopy(list(source.catalog))
    servers = copy.deepcopy(source.servers)
    versions = (source.catalog.version, source.catalog.warm_version)
    c = client(source)
    for route in ["/healthz", "/readyz", *PROTECTED, "/v1/adapters/org/waiting"]:
        await c.get(route)
    assert list(source.catalog) == records
    assert source.servers == servers
    assert (source.catalog.version, source.catalog.warm_version) == versions
