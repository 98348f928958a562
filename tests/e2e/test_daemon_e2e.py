"""The daemon end to end: a real vLLM CPU server, the real `lorawarm run` process, driven only
through the filesystem and HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AdapterFactory
from tests.support.daemon_proc import LorawarmProcess, lora_models, wait_for
from tests.support.vllm_server import VllmServer, completion, greedy_logprobs

pytestmark = pytest.mark.e2e

API_KEY = "e2e-secret-key"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    drop, state = tmp_path / "drop", tmp_path / "state"
    drop.mkdir()
    return drop, state


@pytest.fixture
def daemon(dirs: tuple[Path, Path], vllm: VllmServer) -> Iterator[LorawarmProcess]:
    drop, state = dirs
    with LorawarmProcess(drop, state, [vllm.url]) as proc:
        yield proc


def _loaded(vllm: VllmServer, name: str, api_key: str | None = None) -> str | None:
    return lora_models(vllm.url, api_key).get(name)


def test_cp_r_adapter_is_loaded_and_serves(
    daemon: LorawarmProcess, vllm: VllmServer, adapters: AdapterFactory
) -> None:
    """An adapter copied in with `cp -r` appears in /v1/models and serves completions."""
    src = adapters.source(seed=1)
    subprocess.run(["cp", "-r", str(src), str(daemon.cache_dir / "cp-one")], check=True)
    doc = daemon.wait_state("cp-one", "loaded")
    root = wait_for(lambda: _loaded(vllm, "cp-one"), what="cp-one in /v1/models")
    assert root == doc["snapshot_path"]
    assert root.startswith(str(daemon.state_dir))
    assert doc["servers"][0]["state"] == "loaded"
    response = completion(vllm.url, "cp-one", "Hello world")
    assert response.status_code == 200, response.text


def test_mv_publish_loads_without_waiting_for_settle(
    dirs: tuple[Path, Path], vllm: VllmServer, adapters: AdapterFactory
) -> None:
    """A finished folder renamed into place is loaded long before the settle period ends."""
    drop, state = dirs
    staging = drop / ".mv-one.tmp"
    adapters.copy_to(staging, seed=2)
    with LorawarmProcess(drop, state, [vllm.url], env={"LORAWARM_SETTLE_SECONDS": "600"}) as d:
        started = time.monotonic()
        staging.rename(drop / "mv-one")
        d.wait_state("mv-one", "loaded", timeout=60)
        assert time.monotonic() - started < 600
        assert _loaded(vllm, "mv-one") is not None
        # The same content copied in place must wait for the (long) settle period instead.
        adapters.copy_to(drop / "cp-slow", seed=3)
        time.sleep(3)
        doc = d.adapter("cp-slow")
        assert doc is not None
        assert doc["state"] == "settling"
        assert _loaded(vllm, "cp-slow") is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("bad-bias", "bias_not_supported"),
        ("bad-peft-type", "wrong_peft_type"),
        ("bad-truncated", "weights_truncated"),
    ],
)
def test_invalid_adapter_never_reaches_vllm(
    daemon: LorawarmProcess,
    vllm: VllmServer,
    adapters: AdapterFactory,
    name: str,
    reason: str,
) -> None:
    """Invalid adapters are reported with their reason code and never sent to vLLM."""
    staging = daemon.cache_dir / f".{name}.tmp"
    adapters.copy_to(staging, seed=4)
    edits = {
        "bias_not_supported": {"bias": "all"},
        "wrong_peft_type": {"peft_type": "PREFIX_TUNING"},
    }
    if reason in edits:
        config = staging / "adapter_config.json"
        doc = json.loads(config.read_text())
        doc.update(edits[reason])
        config.write_text(json.dumps(doc))
    else:
        weights = staging / "adapter_model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    staging.rename(daemon.cache_dir / name)
    doc = daemon.wait_state(name, "invalid")
    assert doc["reason"] == reason
    assert doc["message"]
    assert doc["snapshot_path"] is None
    time.sleep(1)
    assert _loaded(vllm, name) is None
    assert vllm.count_lora_loads(name) == 0


def test_rank_override_keeps_a_too_large_adapter_from_a_server_without_the_endpoint(
    vllm: VllmServer, adapters: AdapterFactory, tmp_path: Path
) -> None:
    """This vLLM runs without lorawarm's plugin, so its --max-lora-rank cannot be learned:
    LORAWARM_MAX_LORA_RANK says it, and a rank-32 adapter is incompatible (rank_too_large)
    and never sent, while the rank-8 one loads."""
    drop, state = tmp_path / "drop", tmp_path / "state"
    drop.mkdir()
    adapters.copy_to(drop / "over-rank", seed=4, r=32)
    adapters.copy_to(drop / "in-rank", seed=5)
    env = {"LORAWARM_MAX_LORA_RANK": "16"}
    with LorawarmProcess(drop, state, [vllm.url], env=env) as d:
        d.wait_ready()
        d.wait_state("in-rank", "loaded")
        doc = d.wait_state("over-rank", "incompatible")
        assert doc["reason"] == "rank_too_large"
        assert [s["learned_from"] for s in d.servers()] == [["models", "config"]]
        assert _loaded(vllm, "over-rank") is None
        assert vllm.count_lora_loads("over-rank") == 0


def test_deleted_adapter_is_unloaded_and_vllm_stays_healthy(
    daemon: LorawarmProcess, vllm: VllmServer, adapters: AdapterFactory
) -> None:
    """Deleting a folder unloads its adapter; requests for it fail cleanly; vLLM stays up."""
    adapters.copy_to(daemon.cache_dir / "gone-soon", seed=5)
    daemon.wait_state("gone-soon", "loaded")
    assert completion(vllm.url, "gone-soon", "Hello").status_code == 200
    shutil.rmtree(daemon.cache_dir / "gone-soon")
    wait_for(lambda: daemon.adapter("gone-soon") is None, what="gone-soon to leave the status")
    wait_for(lambda: _loaded(vllm, "gone-soon") is None, what="gone-soon unloaded")
    response = completion(vllm.url, "gone-soon", "Hello")
    assert response.status_code == 404
    assert "error" in response.json()
    assert httpx.get(f"{vllm.url}/health", timeout=5).status_code == 200
    assert completion(vllm.url, vllm.model_name, "Hello").status_code == 200


def test_replaced_weights_are_served(
    daemon: LorawarmProcess, vllm: VllmServer, adapters: AdapterFactory
) -> None:
    """Replacing an adapter's weights makes vLLM serve the new weights under the same name."""
    drop = daemon.cache_dir
    adapters.copy_to(drop / "swap", seed=6)
    first = daemon.wait_state("swap", "loaded")
    old = greedy_logprobs(completion(vllm.url, "swap", "The quick brown"))

    new_weights = adapters.source(seed=7) / "adapter_model.safetensors"
    tmp = drop / "swap" / ".adapter_model.safetensors.new"
    shutil.copyfile(new_weights, tmp)
    tmp.replace(drop / "swap" / "adapter_model.safetensors")

    def swapped() -> dict[str, object] | None:
        doc = daemon.adapter("swap")
        ok = doc and doc["digest"] != first["digest"] and doc["state"] == "loaded"
        return doc if ok else None

    second = wait_for(swapped, timeout=60, what="swap to be reloaded with new weights")
    assert _loaded(vllm, "swap") == second["snapshot_path"]
    new = greedy_logprobs(completion(vllm.url, "swap", "The quick brown"))

    adapters.copy_to(drop / "swap-reference", seed=7)
    daemon.wait_state("swap-reference", "loaded")
    reference = greedy_logprobs(completion(vllm.url, "swap-reference", "The quick brown"))
    assert new == pytest.approx(reference, abs=1e-3)
    assert new != pytest.approx(old, abs=1e-3)


def test_warm_limit_keeps_pinned_and_newest(
    dirs: tuple[Path, Path], vllm: VllmServer, adapters: AdapterFactory
) -> None:
    """With a warm limit of 2, the pinned adapter and the newest other one are loaded."""
    drop, state = dirs
    now = time.time()
    for age, (name, seed) in zip(
        (300, 200, 100), (("wl-pinned", 8), ("wl-old", 9), ("wl-new", 10)), strict=True
    ):
        folder = adapters.copy_to(drop / name, seed=seed)
        for f in folder.iterdir():
            os.utime(f, (now - age, now - age))
    env = {"LORAWARM_WARM_LIMIT": "2", "LORAWARM_PINNED": "wl-pinned"}
    with LorawarmProcess(drop, state, [vllm.url], env=env) as d:
        d.wait_state("wl-pinned", "loaded")
        d.wait_state("wl-new", "loaded")
        assert d.wait_state("wl-old", "cold")["servers"][0]["state"] == "cold"
        models = lora_models(vllm.url)
        assert "wl-old" not in models
        assert {"wl-pinned", "wl-new"} <= set(models)


def test_lorawarm_restart_loads_nothing_twice(
    dirs: tuple[Path, Path], vllm: VllmServer, adapters: AdapterFactory
) -> None:
    """After lorawarm is SIGKILLed and restarted, no adapter is loaded again or unloaded."""
    drop, state = dirs
    names = ["rs-a", "rs-b"]
    for i, name in enumerate(names):
        adapters.copy_to(drop / name, seed=11 + i)
    first = LorawarmProcess(drop, state, [vllm.url]).start()
    try:
        first.wait_ready()
        for name in names:
            first.wait_state(name, "loaded")
    finally:
        first.kill()
    before = {n: vllm.count_lora_loads(n) for n in names}
    removed_before = vllm.count_log("Removed LoRA adapter")
    assert all(v == 1 for v in before.values())
    with LorawarmProcess(drop, state, [vllm.url]) as second:
        for name in names:
            second.wait_state(name, "loaded")
        time.sleep(2)
        assert {n: vllm.count_lora_loads(n) for n in names} == before
        assert vllm.count_log("Removed LoRA adapter") == removed_before
        assert second.servers()[0]["loads"] == 0
