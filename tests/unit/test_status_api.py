"""The status API (FastAPI app over a StatusSource), through httpx's ASGI transport."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorawarm import __version__
from lorawarm.catalog import AdapterRecord, Catalog, ServerAdapter, ServerState
from lorawarm.metrics import Metrics
from lorawarm.reconcile import ServerStatus
from lorawarm.snapshot import Snapshot
from lorawarm.status import create_app

S1 = "http://vllm-1:8000"
S2 = "http://vllm-2:8000"
TOKEN = "status-token-123"
DIGEST = "0123456789abcdef0123456789abcdef"
T0 = 1_790_000_000.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass
class Source:
    """A StatusSource as the daemon provides it."""

    catalog: Catalog
    metrics: Metrics
    statuses: list[ServerStatus]
    is_ready: bool = False
    drop_dir_ok: bool = True
    urls: list[str] = field(default_factory=lambda: [S1, S2])

    @property
    def ready(self) -> bool:
        return self.is_ready

    @property
    def server_urls(self) -> list[str]:
        return self.urls

    def server_statuses(self) -> Sequence[ServerStatus]:
        return self.statuses


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
    (org/name), cold."""
    cat = Catalog(pinned=[], warm_limit=None)
    cat.add(
        record(
            "loaded",
            snapshot=snap("loaded"),
            servers={
                S1: ServerAdapter(ServerState.LOADED, attempts=1, loaded_at=T0 + 3),
                S2: ServerAdapter(ServerState.LOADED, attempts=2, loaded_at=T0 + 4),
            },
        )
    )
    cat.add(record("bad", reason="rank_too_large", message="rank 64 is above 16"))
    cat.add(record("copying", settling=True, validated_at=None))
    cat.add(
        record(
            "broken",
            snapshot=snap("broken"),
            servers={
                S1: ServerAdapter(
                    ServerState.FAILED,
                    attempts=3,
                    condition="rejected",
                    last_error="Call to add_lora method failed: ...",
                ),
                S2: ServerAdapter(ServerState.LOADED, attempts=1, loaded_at=T0 + 5),
            },
        )
    )
    cat.add(record("org/waiting", snapshot=snap("org/waiting")))
    cat.add(
        record(
            "chilly",
            snapshot=snap("chilly"),
            servers={S1: ServerAdapter(ServerState.COLD), S2: ServerAdapter(ServerState.COLD)},
        )
    )
    statuses = [
        ServerStatus(
            url=S1, condition="ok", healthy=True, since=T0, last_sync=T0 + 9, loaded=1, loads=2
        ),
        ServerStatus(
            url=S2,
            condition="unreachable",
            message="ConnectError: [Errno 111] Connection refused",
            since=T0 + 7,
            failures=4,
        ),
    ]
    return Source(cat, Metrics(), statuses)


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
    assert response.json() == {"status": "ok", "version": __version__, "drop_dir": "ok"}


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
    assert response.json() == {"status": "starting", "version": __version__, "drop_dir": "ok"}
    source.is_ready = True
    response = await c.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "version": __version__, "drop_dir": "ok"}


async def test_adapters_lists_every_record_with_counts(client: Client) -> None:
    """/v1/adapters lists all adapters by name with their state, and counts every state."""
    body = (await client(make_source()).get("/v1/adapters")).json()
    assert set(body) == {"adapters", "counts"}
    states = {a["name"]: a["state"] for a in body["adapters"]}
    assert list(states) == sorted(states)
    assert states == {
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
        "loaded": 1,
        "cold": 1,
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
        "digest",
        "source_path",
        "snapshot_path",
        "first_seen",
        "changed_at",
        "validated_at",
        "servers",
    }
    assert broken["digest"] == DIGEST
    assert broken["source_path"] == "/srv/adapters/broken"
    assert broken["snapshot_path"] == f"/var/lib/lorawarm/snapshots/broken/{DIGEST}"
    assert broken["first_seen"] == iso(T0)
    assert broken["first_seen"].endswith("+00:00")
    assert broken["servers"] == [
        {
            "url": S1,
            "state": "failed",
            "attempts": 3,
            "condition": "rejected",
            "last_error": "Call to add_lora method failed: ...",
            "loaded_at": None,
        },
        {
            "url": S2,
            "state": "loaded",
            "attempts": 1,
            "condition": None,
            "last_error": None,
            "loaded_at": iso(T0 + 5),
        },
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
        "loaded": 1,
        "cold": 1,
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
    source.statuses[1].condition = "ok"
    source.statuses[1].last_sync = time.time()
    body = (await c.get("/v1/servers")).json()
    assert body["servers"][1]["condition"] == "ok"
