"""Several real vLLM servers: a second one with `--api-key` that tests stop, kill and restart,
next to the shared one, with the real `lorawarm run` warming both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AdapterFactory
from tests.support.daemon_proc import LorawarmProcess, lora_models, wait_for
from tests.support.vllm_server import VllmServer, completion

pytestmark = pytest.mark.e2e

API_KEY = "e2e-secret-key"


@pytest.fixture(scope="module")
def keyed(tiny_model: Path) -> Iterator[VllmServer]:
    """A second vLLM server that wants an API key; tests may stop and restart it."""
    server = VllmServer(
        tiny_model, api_key=API_KEY, extra_args=["--max-loras", "2", "--max-cpu-loras", "4"]
    )
    with server:
        yield server


def _server(proc: LorawarmProcess, url: str) -> dict[str, object]:
    return next(s for s in proc.servers() if s["url"] == url)


def test_two_servers_are_warmed_and_one_going_down_leaves_the_other(
    tmp_path: Path, vllm: VllmServer, keyed: VllmServer, adapters: AdapterFactory
) -> None:
    """Both servers are warmed; one stopping is reported by URL while the other keeps serving;
    when it comes back it is warmed again without anyone acting."""
    drop, state = tmp_path / "drop", tmp_path / "state"
    drop.mkdir()
    adapters.copy_to(drop / "two-a", seed=20)
    env = {"LORAWARM_VLLM_API_KEY": API_KEY}
    with LorawarmProcess(drop, state, [vllm.url, keyed.url], env=env) as d:
        doc = d.wait_state("two-a", "loaded")
        assert {s["url"]: s["state"] for s in doc["servers"]} == {
            vllm.url: "loaded",
            keyed.url: "loaded",
        }
        assert "two-a" in lora_models(keyed.url, API_KEY)

        keyed.stop()
        wait_for(
            lambda: _server(d, keyed.url)["condition"] == "unreachable",
            what="the stopped server to be reported unreachable",
        )
        assert _server(d, vllm.url)["condition"] == "ok"
        adapters.copy_to(drop / "two-b", seed=21)
        wait_for(lambda: "two-b" in lora_models(vllm.url), what="two-b on the running server")
        assert completion(vllm.url, "two-b", "Hello").status_code == 200
        doc = d.adapter("two-b")
        assert doc is not None
        per = {s["url"]: s for s in doc["servers"]}
        assert per[vllm.url]["state"] == "loaded"
        assert per[keyed.url]["state"] == "pending"
        assert per[keyed.url]["condition"] == "unreachable"

        keyed.restart()
        wait_for(
            lambda: {"two-a", "two-b"} <= set(lora_models(keyed.url, API_KEY)),
            timeout=60,
            what="the restarted server to be warmed again",
        )
        d.wait_state("two-b", "loaded")


def test_killed_vllm_is_rewarmed(
    tmp_path: Path, keyed: VllmServer, adapters: AdapterFactory
) -> None:
    """After vLLM is killed with SIGKILL and started again, every desired adapter is back."""
    drop, state = tmp_path / "drop", tmp_path / "state"
    drop.mkdir()
    for i in range(3):
        adapters.copy_to(drop / f"kill-{i}", seed=30 + i)
    env = {"LORAWARM_VLLM_API_KEY": API_KEY}
    with LorawarmProcess(drop, state, [keyed.url], env=env) as d:
        for i in range(3):
            d.wait_state(f"kill-{i}", "loaded")
        keyed.kill()
        wait_for(
            lambda: _server(d, keyed.url)["condition"] == "unreachable",
            what="the killed server to be reported",
        )
        keyed.start()
        keyed.wait_healthy()
        wait_for(
            lambda: {f"kill-{i}" for i in range(3)} <= set(lora_models(keyed.url, API_KEY)),
            timeout=60,
            what="every adapter back after the restart",
        )
        response = completion(keyed.url, "kill-1", "Hello", api_key=API_KEY)
        assert response.status_code == 200, response.text


def test_api_key_is_used_and_a_missing_one_is_reported(
    tmp_path: Path, keyed: VllmServer, adapters: AdapterFactory
) -> None:
    """With the key, adapters load on a keyed server; without it, the status says unauthorized."""
    drop = tmp_path / "drop"
    drop.mkdir()
    adapters.copy_to(drop / "key-a", seed=40)
    with LorawarmProcess(drop, tmp_path / "state-nokey", [keyed.url]) as d:
        wait_for(
            lambda: _server(d, keyed.url)["condition"] == "unauthorized",
            what="the server to be reported unauthorized",
        )
        # The adapter may settle after the server failed: it shows the condition once valid.
        doc = wait_for(
            lambda: (a := d.adapter("key-a")) is not None and a["servers"] and a,
            what="key-a to be valid and to have a per-server entry",
        )
        assert doc["servers"][0]["state"] == "pending"
        assert doc["servers"][0]["condition"] == "unauthorized"
        assert "key-a" not in lora_models(keyed.url, API_KEY)
    env = {"LORAWARM_VLLM_API_KEY": API_KEY}
    with LorawarmProcess(drop, tmp_path / "state-key", [keyed.url], env=env) as d:
        d.wait_state("key-a", "loaded")
        assert _server(d, keyed.url)["condition"] == "ok"
        assert "key-a" in lora_models(keyed.url, API_KEY)
        assert API_KEY not in d.log_text()
    assert httpx.get(f"{keyed.url}/health", timeout=5).status_code == 200
