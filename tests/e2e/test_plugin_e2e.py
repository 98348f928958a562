"""The resolver plugin inside a real vLLM CPU server (VLLM_PLUGINS=lorawarm), with no daemon
running except where a test starts the real `lorawarm run` next to it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import AdapterFactory
from tests.support.daemon_proc import LorawarmProcess, lora_models
from tests.support.vllm_server import LORA_RESOLVED_LOG, VllmServer, completion

pytestmark = pytest.mark.e2e

ALIAS = "example-org/tiny-llama"


@dataclass
class PluginServer:
    server: VllmServer
    drop: Path
    state: Path

    @property
    def url(self) -> str:
        return self.server.url

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def plugin(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginServer]:
    """One vLLM server with only the lorawarm plugin, one GPU slot and one CPU slot for
    adapters (so a second adapter evicts the first), and an enforced base model with an
    alias."""
    root = tmp_path_factory.mktemp("plugin")
    drop, state = root / "drop", root / "state"
    drop.mkdir()
    server = VllmServer(
        tiny_model,
        plugins=["lorawarm"],
        extra_args=["--max-loras", "1", "--max-cpu-loras", "1"],
        env={
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
            "LORAWARM_CACHE_DIR": str(drop),
            "LORAWARM_STATE_DIR": str(state),
            "LORAWARM_MAX_LORA_RANK": "16",
            # Enforced: without it the base model's name decides nothing (a warning only).
            "LORAWARM_BASE_MODEL": str(tiny_model),
            "LORAWARM_BASE_MODEL_ALIASES": ALIAS,
            "VLLM_LORA_RESOLVER_CACHE_DIR": None,
        },
    )
    with server:
        yield PluginServer(server, drop, state)


def test_adapter_only_on_disk_serves(plugin: PluginServer, adapters: AdapterFactory) -> None:
    """A completion naming an adapter that is only in the drop dir returns 200, loaded from a
    snapshot under the state dir, not from the drop folder."""
    adapters.copy_to(plugin.drop / "on-disk", seed=1)
    response = completion(plugin.url, "on-disk", "Hello world")
    assert response.status_code == 200, response.text
    root = lora_models(plugin.url)["on-disk"]
    assert root.startswith(str(plugin.state / "snapshots" / "on-disk") + "/")
    assert plugin.server.count_log(f"{LORA_RESOLVED_LOG}on-disk'") == 1


def test_org_name_adapter_serves(plugin: PluginServer, adapters: AdapterFactory) -> None:
    """A hub-style `org/name` resolves to the nested folder in the drop dir."""
    adapters.copy_to(plugin.drop / "team" / "nested", seed=2)
    response = completion(plugin.url, "team/nested", "Hello world")
    assert response.status_code == 200, response.text


def test_half_copied_adapter_is_404_then_serves(
    plugin: PluginServer, adapters: AdapterFactory
) -> None:
    """A half-copied adapter gets vLLM's 404 and the server stays healthy; once the copy is
    complete the same name serves."""
    folder = adapters.copy_to(plugin.drop / "half", seed=3)
    weights = folder / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    response = completion(plugin.url, "half", "Hello world")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["message"].startswith("The model `half` does not exist")
    assert plugin.healthy()
    weights.write_bytes(whole)
    assert completion(plugin.url, "half", "Hello world").status_code == 200


def test_adapter_for_another_base_model_is_refused(
    plugin: PluginServer, adapters: AdapterFactory
) -> None:
    """An adapter trained for another base model is not loaded: 404, and /health stays 200."""
    adapters.copy_to(plugin.drop / "foreign", seed=4, base_model_name_or_path="other/model")
    response = completion(plugin.url, "foreign", "Hello world")
    assert response.status_code == 404, response.text
    assert "foreign" not in lora_models(plugin.url)
    assert plugin.healthy()
    assert "lorawarm: adapter 'foreign' is not served (base_model_mismatch)" in (
        plugin.server.log_text()
    )


def test_adapter_naming_an_alias_serves(plugin: PluginServer, adapters: AdapterFactory) -> None:
    """An adapter whose base_model_name_or_path is a configured alias of --model loads (vLLM's
    built-in resolver would 404 it, vllm#18630)."""
    adapters.copy_to(plugin.drop / "aliased", seed=5, base_model_name_or_path=ALIAS)
    response = completion(plugin.url, "aliased", "Hello world")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("name", ["../etc", "../../etc/passwd", "/etc/passwd", "%2e%2e/x"])
def test_traversal_names_get_404(plugin: PluginServer, adapters: AdapterFactory, name: str) -> None:
    """Names that try to leave the drop dir get 404, even where the naive join holds a valid
    adapter, and the server stays healthy."""
    outside = plugin.drop.parent / "etc"
    if not outside.exists():
        adapters.copy_to(outside, seed=6)
    response = completion(plugin.url, name, "Hello world")
    assert response.status_code == 404, response.text
    assert plugin.healthy()


def test_deleted_drop_folder_of_evicted_adapter_does_not_kill_the_engine(
    plugin: PluginServer, adapters: AdapterFactory
) -> None:
    """Deleting the drop folder of a resolved adapter, evicting it (--max-cpu-loras 1) and
    requesting it again still answers 200: vLLM re-reads the snapshot, not the deleted folder
    (vllm#5105 killed the engine here with the built-in resolver)."""
    adapters.copy_to(plugin.drop / "evict-a", seed=7)
    adapters.copy_to(plugin.drop / "evict-b", seed=8)
    assert completion(plugin.url, "evict-a", "Hello world").status_code == 200
    shutil.rmtree(plugin.drop / "evict-a")
    assert completion(plugin.url, "evict-b", "Hello world").status_code == 200  # evicts evict-a
    response = completion(plugin.url, "evict-a", "Hello world")
    assert response.status_code == 200, response.text
    assert plugin.healthy()


def test_daemon_adopts_what_the_plugin_loaded(
    plugin: PluginServer, adapters: AdapterFactory
) -> None:
    """With the daemon started after the plugin resolved an adapter, the daemon reports it
    loaded from the plugin's snapshot and never loads it a second time; both refuse the same
    adapters."""
    adapters.copy_to(plugin.drop / "adopt-me", seed=9)
    assert completion(plugin.url, "adopt-me", "Hello world").status_code == 200
    root = lora_models(plugin.url)["adopt-me"]
    # The daemon gets the plugin's checks: --model and the alias as accepted base models. This
    # engine keeps one adapter in memory, which would be the daemon's warm set: the override
    # makes it warm every adapter, as before it learned that.
    env = {
        "LORAWARM_BASE_MODEL": plugin.server.model,
        "LORAWARM_BASE_MODEL_ALIASES": ALIAS,
        "LORAWARM_WARM_LIMIT": "8",
    }
    with LorawarmProcess(plugin.drop, plugin.state, [plugin.url], env=env) as daemon:
        doc = daemon.wait_state("adopt-me", "loaded")
        assert doc["snapshot_path"] == root
        assert doc["servers"][0]["state"] == "loaded"
        # A new adapter is warmed by the daemon; the plugin is not involved.
        adapters.copy_to(plugin.drop / "daemon-first", seed=10)
        daemon.wait_state("daemon-first", "loaded")
        foreign = daemon.wait_state("foreign", "incompatible")
        assert foreign["reason"] == "base_model_mismatch"
    assert lora_models(plugin.url)["adopt-me"] == root
    assert plugin.server.count_lora_loads("adopt-me") == 0
    assert plugin.server.count_log(f"{LORA_RESOLVED_LOG}adopt-me'") == 1
    assert plugin.server.count_lora_loads("daemon-first") == 1
    assert plugin.server.count_log(f"{LORA_RESOLVED_LOG}daemon-first'") == 0
    assert "foreign" not in lora_models(plugin.url)  # refused by the daemon as by the plugin
    assert plugin.healthy()
