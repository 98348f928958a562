"""The fault matrix: the real `lorawarm run` against two vLLM servers, one of which misbehaves.

Faults a real vLLM cannot be made to produce on demand (an answer slower than the timeout, a 5xx
burst, a connection reset mid-request, a malformed body) come from the recorded-faithful fake
served over real HTTP (tests/support/fake_vllm_http.py); a vLLM without runtime LoRA updating is
a real one. For every fault: the other server and the other adapters keep being served, the
condition is reported in `/v1/servers`, per adapter in `/v1/adapters` and in `/metrics`, the
faulty server is retried with backoff (requests counted over a window), and everything
converges once the fault ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AdapterFactory
from tests.support.daemon_proc import LorawarmProcess, lora_models, wait_for
from tests.support.fake_vllm_http import FakeVllmHttp
from tests.support.vllm_server import VllmServer
from tests.unit.adapters import write_adapter

HEALTH_SECONDS = 0.5
MAX_BACKOFF = 2.0
REQUEST_TIMEOUT = 1.0
ENV = {
    "LORAWARM_HEALTH_SECONDS": str(HEALTH_SECONDS),
    "LORAWARM_MAX_BACKOFF_SECONDS": str(MAX_BACKOFF),
    "LORAWARM_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
}
WINDOW = 6.0
"""Seconds over which the requests to a faulty server are counted."""
SYNC_ROUTES = ("models", "load", "unload")
"""Routes a reconcile pass calls (the health probe runs on its own timer)."""


def max_sync_requests(window: float, per_pass: int = 2) -> int:
    """The most reconcile requests a server in backoff may get in `window` seconds.

    From the second failure on, retries are at least MAX_BACKOFF / 2 apart (capped exponential
    backoff, jitter in the upper half); a failing pass makes `per_pass` calls (the list, then
    the load that fails: 2; a list that fails: 1). Counted from any moment, one more pass may
    fall in the window. A retry per health probe (every HEALTH_SECONDS) would exceed it.
    """
    passes = int(window / (MAX_BACKOFF / 2)) + 2
    return per_pass * passes


# --- helpers ------------------------------------------------------------------------------------


def publish(drop: Path, name: str, seed: int) -> None:
    """Write a synthetic, format-exact adapter next to its place and rename it in."""
    staging = drop / f".{name}.tmp"
    write_adapter(staging, seed=seed)
    staging.rename(drop / name)


def server(d: LorawarmProcess, url: str) -> dict[str, Any]:
    return next(s for s in d.servers() if s["url"] == url)


def on(d: LorawarmProcess, name: str, url: str) -> dict[str, Any] | None:
    """The adapter's entry for one server in `/v1/adapters`."""
    doc = next((a for a in d.get("/v1/adapters").json()["adapters"] if a["name"] == name), None)
    if doc is None:
        return None
    return next((s for s in doc["servers"] if s["url"] == url), None)


def metric(d: LorawarmProcess, sample: str, **labels: str) -> float | None:
    """One sample of `/metrics`, or None when it is not exported."""
    for family in text_string_to_metric_families(d.get("/metrics").text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def loaded_everywhere(d: LorawarmProcess, names: list[str]) -> bool:
    adapters = {a["name"]: a["state"] for a in d.get("/v1/adapters").json()["adapters"]}
    return all(adapters.get(n) == "loaded" for n in names)


@pytest.fixture
def pair() -> Iterator[tuple[FakeVllmHttp, FakeVllmHttp]]:
    """Two fake vLLM servers on real loopback ports: the one to break, and a healthy one."""
    with FakeVllmHttp() as faulty, FakeVllmHttp() as healthy:
        yield faulty, healthy


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    path = tmp_path / "drop"
    path.mkdir()
    return path


def start(
    tmp_path: Path, drop: Path, urls: list[str], env: dict[str, str] | None = None
) -> LorawarmProcess:
    return LorawarmProcess(drop, tmp_path / "state", urls, env={**ENV, **(env or {})})


def assert_reported(
    d: LorawarmProcess, faulty: str, healthy: str, name: str, condition: str
) -> None:
    """`condition` for the faulty server in /v1/servers, for `name` in /v1/adapters, in
    /metrics; the healthy server ok and up."""
    wait_for(
        lambda: server(d, faulty)["condition"] == condition,
        what=f"{faulty} reported {condition}",
    )
    wait_for(
        lambda: (
            (entry := on(d, name, faulty)) is not None
            and entry["state"] in ("pending", "failed")
            and entry["condition"] == condition
        ),
        what=f"{name} on {faulty} reported {condition}",
    )
    assert server(d, healthy)["condition"] == "ok"
    assert server(d, faulty)["failures"] >= 1
    failures = metric(d, "lorawarm_failures_total", server=faulty, condition=condition)
    assert failures is not None
    assert failures >= 1
    assert metric(d, "lorawarm_server_up", server=faulty) == 0
    assert metric(d, "lorawarm_server_up", server=healthy) == 1


def assert_backs_off(fake: FakeVllmHttp, per_pass: int) -> int:
    """Over WINDOW seconds the faulty server is retried, but boundedly; returns the count."""
    since = time.monotonic()
    time.sleep(WINDOW)  # a measurement window, not a wait for an outcome
    count = fake.count(*SYNC_ROUTES, since=since)
    print(f"{count} reconcile requests in {WINDOW} s, {fake.count('health', since=since)} probes")
    assert 1 <= count <= max_sync_requests(WINDOW, per_pass), [
        (round(s.at - since, 2), s.route, s.outcome) for s in fake.requests(since=since)
    ]
    return count


def assert_converged(d: LorawarmProcess, faulty: FakeVllmHttp, names: list[str]) -> None:
    wait_for(lambda: loaded_everywhere(d, names), what=f"{names} loaded on both servers")
    wait_for(lambda: server(d, faulty.url)["condition"] == "ok", what="the server ok again")
    assert metric(d, "lorawarm_server_up", server=faulty.url) == 1
    assert set(names) <= set(lora_models(faulty.url))
    for name in names:
        entry = on(d, name, faulty.url)
        assert entry is not None
        assert entry["condition"] is None


# --- faults that last until they are cleared -------------------------------------------------


@dataclass(frozen=True)
class Fault:
    condition: str
    inject: Callable[[FakeVllmHttp], None]
    per_pass: int = 1  # calls a failing reconcile pass makes: 2 when the list works


FAULTS = {
    # the whole server answers 3 s late (a wedged API server): past LORAWARM_REQUEST_TIMEOUT
    "slow_answers": Fault("timeout", lambda f: f.delay(seconds=3 * REQUEST_TIMEOUT)),
    # lists fine, then every load has its connection reset before an answer
    "reset_on_load": Fault("unreachable", lambda f: f.reset("load"), per_pass=2),
    # the listing's connection is reset mid-request; /health is fine
    "reset_on_models": Fault("unreachable", lambda f: f.reset("models")),
    # /v1/models answers 200 with something that is not JSON (a captive proxy's page)
    "models_not_json": Fault(
        "bad_response",
        lambda f: f.answer(
            "models", status=200, body=b"<html><body>login</body></html>", content_type="text/html"
        ),
    ),
    # /v1/models answers JSON of the wrong shape
    "models_wrong_shape": Fault(
        "bad_response",
        lambda f: f.answer(
            "models",
            status=200,
            body=b'{"object":"list","data":{"id":"tiny-llama"}}',
            content_type="application/json",
        ),
    ),
    # a load answers 200 with a body that is not vLLM's "Success: ..."
    "load_success_malformed": Fault(
        "bad_response",
        lambda f: f.answer(
            "load", status=200, body=b'{"ok":true}', content_type="application/json"
        ),
        per_pass=2,
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_fault_is_reported_backed_off_and_recovered(
    tmp_path: Path, drop: Path, pair: tuple[FakeVllmHttp, FakeVllmHttp], fault: str
) -> None:
    """A server fault that lasts is reported with its condition while the healthy server keeps
    getting new adapters, is retried with backoff, and converges once the fault ends."""
    faulty, healthy = pair
    case = FAULTS[fault]
    publish(drop, "base-a", seed=1)
    publish(drop, "base-b", seed=2)
    with start(tmp_path, drop, [faulty.url, healthy.url]) as d:
        wait_for(lambda: loaded_everywhere(d, ["base-a", "base-b"]), what="both adapters loaded")

        case.inject(faulty)
        publish(drop, "during", seed=3)
        wait_for(
            lambda: (
                (entry := on(d, "during", healthy.url)) is not None and entry["state"] == "loaded"
            ),
            what="the new adapter loaded on the healthy server",
        )
        assert_reported(d, faulty.url, healthy.url, "during", case.condition)
        assert_backs_off(faulty, case.per_pass)
        assert "during" in lora_models(healthy.url)
        assert {"base-a", "base-b"} <= faulty.registry().keys()  # nothing unloaded meanwhile

        faulty.clear()
        assert_converged(d, faulty, ["base-a", "base-b", "during"])
        assert server(d, healthy.url)["loads"] == 3
    assert d.process is not None
    assert d.process.returncode == 0


# --- 5xx bursts: N answers, then the burst ends by itself ------------------------------------

BURST = 6


@pytest.mark.parametrize(
    ("status", "condition"),
    [(500, "server_error"), (502, "server_error"), (503, "engine_dead")],
    ids=["500", "502", "503"],
)
def test_5xx_burst_is_spread_by_backoff_and_ends_converged(
    tmp_path: Path,
    drop: Path,
    pair: tuple[FakeVllmHttp, FakeVllmHttp],
    status: int,
    condition: str,
) -> None:
    """A burst of N 5xx answers on the adapter routes is reported, each failure counted once,
    the N failing passes are spread out by the backoff, and lorawarm converges on its own."""
    faulty, healthy = pair
    publish(drop, "base-a", seed=1)
    with start(tmp_path, drop, [faulty.url, healthy.url]) as d:
        wait_for(lambda: loaded_everywhere(d, ["base-a"]), what="the adapter loaded")

        faulty.burst(status, *SYNC_ROUTES, times=BURST)
        publish(drop, "during", seed=3)
        assert_reported(d, faulty.url, healthy.url, "during", condition)
        assert_converged(d, faulty, ["base-a", "during"])

        failed = [s for s in faulty.requests(*SYNC_ROUTES) if s.status == status]
        assert len(failed) == BURST
        assert metric(d, "lorawarm_failures_total", server=faulty.url, condition=condition) == BURST
        # retries 1, 2, 3... wait at least half of min(cap, 1, 2, 4...) seconds after a failure
        least = sum(0.5 * min(MAX_BACKOFF, 2.0**i) for i in range(BURST - 1))
        assert failed[-1].at - failed[0].at >= least, [
            round(s.at - failed[0].at, 2) for s in failed
        ]
        assert faulty.registry().keys() == {"base-a", "during"}


def test_5xx_burst_on_health_is_cleared_as_soon_as_health_answers(
    tmp_path: Path, drop: Path, pair: tuple[FakeVllmHttp, FakeVllmHttp]
) -> None:
    """500s from /health alone are reported for the server and its adapters, and cleared by a
    re-sync as soon as /health answers again, not at the next resync timer."""
    faulty, healthy = pair
    publish(drop, "base-a", seed=1)
    with start(tmp_path, drop, [faulty.url, healthy.url], {"LORAWARM_RESYNC_SECONDS": "600"}) as d:
        wait_for(lambda: loaded_everywhere(d, ["base-a"]), what="the adapter loaded")
        faulty.burst(500, "health", times=10)
        wait_for(
            lambda: server(d, faulty.url)["condition"] == "server_error",
            what="the server reported server_error",
        )
        entry = on(d, "base-a", faulty.url)
        assert entry is not None
        assert (entry["state"], entry["condition"]) == ("pending", "server_error")
        assert metric(d, "lorawarm_server_up", server=faulty.url) == 0
        assert server(d, healthy.url)["condition"] == "ok"
        assert_converged(d, faulty, ["base-a"])
        assert faulty.count("health") >= 10
        assert faulty.count("load") == 1  # still loaded: nothing to load again


# --- a load slower than the timeout that vLLM still carries out -------------------------------


def test_load_slower_than_timeout_is_retried_and_recognised_once_done(
    tmp_path: Path, drop: Path, pair: tuple[FakeVllmHttp, FakeVllmHttp]
) -> None:
    """A load that outlasts the request timeout while vLLM's /health answers is the adapter's
    problem, not the server's: the adapter is reported `timeout` on that server and retried
    with its own backoff, the server stays `ok`; once vLLM has finished the load, lorawarm sees
    it in /v1/models and counts it loaded."""
    faulty, healthy = pair
    with start(tmp_path, drop, [faulty.url, healthy.url]) as d:
        faulty.delay("load", seconds=8)  # every load: vLLM finishes it, 8 s late
        publish(drop, "slow", seed=4)
        wait_for(
            lambda: (
                (entry := on(d, "slow", faulty.url)) is not None
                and entry["state"] == "failed"
                and entry["condition"] == "timeout"
            ),
            what="slow reported timeout on the slow server",
        )
        assert server(d, faulty.url)["condition"] == "ok"  # /health answers: not a sick server
        failures = metric(d, "lorawarm_failures_total", server=faulty.url, condition="timeout")
        assert failures is not None
        assert failures >= 1
        assert metric(d, "lorawarm_server_up", server=faulty.url) == 1
        entry = on(d, "slow", healthy.url)
        assert entry is not None
        assert entry["state"] == "loaded"
        wait_for(lambda: loaded_everywhere(d, ["slow"]), timeout=60, what="slow loaded on both")
        assert server(d, faulty.url)["condition"] == "ok"
        doc = d.adapter("slow")
        assert doc is not None
        assert faulty.registry() == {"slow": doc["snapshot_path"]}
        loads = faulty.requests("load")
        assert loads[0].client_gone is not None  # lorawarm gave up on the first one...
        assert loads[0].outcome == "answered"  # ...and vLLM carried it out all the same
        # retried while the first one ran, with backoff: not one load per health probe
        assert 2 <= len(loads) <= max_sync_requests(8.0 + REQUEST_TIMEOUT) // 2


# --- the real vLLM without runtime LoRA updating -----------------------------------------------


LOAD_ACCESS = '"POST /v1/load_lora_adapter HTTP/1.1" 404'
"""uvicorn's access log line in vLLM's log for a load refused by the missing route."""


@pytest.mark.e2e
@pytest.mark.timeout(600)  # two real vLLM starts (45-77 s each on 2 cores) plus the fixtures
def test_real_vllm_without_runtime_updates_is_reported_then_converges(
    tmp_path: Path, drop: Path, tiny_model: Path, adapters: AdapterFactory
) -> None:
    """A real vLLM started without VLLM_ALLOW_RUNTIME_LORA_UPDATING is reported as
    `runtime_updates_disabled` (server, adapter, metrics) and retried with backoff while the
    other server is warmed; restarted with it, it is warmed without anyone acting."""
    adapters.copy_to(drop / "real-a", seed=50)
    real = VllmServer(tiny_model, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": None})
    with real, FakeVllmHttp() as healthy, start(tmp_path, drop, [real.url, healthy.url]) as d:
        wait_for(
            lambda: (
                (entry := on(d, "real-a", healthy.url)) is not None and entry["state"] == "loaded"
            ),
            what="the adapter loaded on the healthy server",
        )
        assert_reported(d, real.url, healthy.url, "real-a", "runtime_updates_disabled")
        doc = d.adapter("real-a")
        assert doc is not None
        assert doc["state"] == "pending"
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in server(d, real.url)["message"]
        assert lora_models(real.url) == {}
        # backoff, counted in vLLM's access log: each failing pass lists, then loads
        before = real.count_log(LOAD_ACCESS)
        time.sleep(WINDOW)  # a measurement window, not a wait for an outcome
        loads = real.count_log(LOAD_ACCESS) - before
        print(f"{loads} loads refused by the real vLLM in {WINDOW} s")
        assert 1 <= loads <= max_sync_requests(WINDOW, per_pass=1)

        real.env_overrides["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
        real.restart()
        wait_for(
            lambda: loaded_everywhere(d, ["real-a"]),
            timeout=60,
            what="the adapter loaded on the restarted server",
        )
        assert server(d, real.url)["condition"] == "ok"
        assert metric(d, "lorawarm_server_up", server=real.url) == 1
        assert "real-a" in lora_models(real.url)
