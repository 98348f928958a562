"""The e2e harness itself against a real vLLM: generated adapters load, list and serve.

Uses the session fixtures ``tiny_model`` and ``vllm`` (tests/conftest.py); the adapters are made
here with :func:`tests.support.models.make_adapter` and unloaded again afterwards, so the shared
server is left as it was found.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.models import make_adapter
from tests.support.vllm_server import VllmServer, completion, greedy_logprobs

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown"


@pytest.fixture(scope="module")
def seeded_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two real PEFT adapters for the tiny model, random LoRA weights from seeds 101 and 102."""
    root = tmp_path_factory.mktemp("harness-adapters")
    return {seed: make_adapter(tiny_model, root / f"seed-{seed}", seed=seed) for seed in (101, 102)}


def _post(server: VllmServer, route: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, headers=server.headers(), timeout=60)


@pytest.fixture
def loaded(vllm: VllmServer) -> Iterator[list[str]]:
    """Names the test loads; each is unloaded from the shared server after the test."""
    names: list[str] = []
    yield names
    for name in names:
        _post(vllm, "/v1/unload_lora_adapter", {"lora_name": name})


def _load(server: VllmServer, loaded: list[str], name: str, path: Path) -> httpx.Response:
    response = _post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    if response.status_code == 200:
        loaded.append(name)
    return response


def test_loaded_adapter_is_listed_with_its_path_and_serves(
    vllm: VllmServer, seeded_adapters: dict[int, Path], loaded: list[str]
) -> None:
    """A loaded adapter is in /v1/models with root == the path sent and serves a completion."""
    name, path = "harness-listed", seeded_adapters[101]
    loads_before = vllm.count_lora_loads(name)

    response = _load(vllm, loaded, name, path)
    assert response.status_code == 200, response.text
    assert response.text == f"Success: LoRA adapter '{name}' added successfully."
    assert vllm.count_lora_loads(name) == loads_before + 1

    models = httpx.get(f"{vllm.url}/v1/models", headers=vllm.headers(), timeout=30)
    assert models.status_code == 200
    entries = {entry["id"]: entry for entry in models.json()["data"]}
    assert entries[name]["root"] == str(path)
    assert entries[name]["parent"] == vllm.model_name

    answer = completion(vllm.url, name, PROMPT, api_key=vllm.api_key)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == name
    assert len(greedy_logprobs(answer)) == 5


def test_adapters_with_different_seeds_give_different_greedy_logprobs(
    vllm: VllmServer, seeded_adapters: dict[int, Path], loaded: list[str]
) -> None:
    """Adapters made with different seeds give different greedy logprobs, each repeatable."""
    for seed, path in seeded_adapters.items():
        response = _load(vllm, loaded, f"harness-seed-{seed}", path)
        assert response.status_code == 200, response.text

    def logprobs(model: str) -> list[float]:
        return greedy_logprobs(completion(vllm.url, model, PROMPT, api_key=vllm.api_key))

    base = logprobs(vllm.model_name)
    first, second = logprobs("harness-seed-101"), logprobs("harness-seed-102")
    assert logprobs("harness-seed-101") == first  # greedy decoding is repeatable
    assert first != second
    assert base not in (first, second)
