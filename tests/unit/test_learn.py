"""Learning a server where a real vLLM cannot show it: a broken endpoint answer, a hub-cache
`--model`, config.json files of other shapes (scripted vLLM answers, vLLM 0.32's own bytes
from tests/support/vllm_responses.py where they exist)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from lorawarm.learn import config_facts, learn, llama_shapes
from lorawarm.server_facts import LearnedFrom, ModuleShape, ServerFacts
from lorawarm.vllm_client import Condition, VllmClient, VllmError
from tests.support import vllm_responses as recorded

URL = "http://vllm.test:8000"
ROUTE = "/v1/lorawarm/server"


def models_answer(root: str, names: tuple[str, ...] = ("tiny",)) -> httpx.Response:
    """`/v1/models` as vLLM 0.32 writes it: one base entry per served name, and a LoRA entry."""
    body = json.loads(recorded.RESPONSES["models_one_lora"].body)
    base, lora = body["data"]
    body["data"] = [{**base, "id": name, "root": root} for name in names]
    body["data"].append({**lora, "parent": names[0]})
    return httpx.Response(200, json=body)


def route_404() -> httpx.Response:
    """FastAPI's 404 for a path without a route, as recorded from vLLM."""
    return recorded.mock_response("noruntime_load")


async def learn_with(handler: Callable[[httpx.Request], httpx.Response]) -> ServerFacts:
    async with VllmClient(URL, transport=httpx.MockTransport(handler)) as client:
        return await learn(client)


def serve(endpoint: httpx.Response, models: httpx.Response) -> Callable[..., httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        return endpoint if request.url.path == ROUTE else models

    return handler


async def test_malformed_endpoint_answer_is_bad_response() -> None:
    """An endpoint answer that is not a ServerFacts document is `bad_response`, naming why."""
    broken = httpx.Response(200, json={"schema": 1, "max_loras": "two"})
    transport = httpx.MockTransport(lambda request: broken)
    async with VllmClient(URL, transport=transport) as client:
        with pytest.raises(VllmError) as caught:
            await client.server_facts()
    assert caught.value.condition is Condition.BAD_RESPONSE
    assert "max_loras" in caught.value.message


async def test_malformed_endpoint_answer_falls_back_to_models(tmp_path: Path) -> None:
    """A broken endpoint does not leave the server unknown: /v1/models still tells its names,
    and the fallback is logged once with the reason."""
    handler = serve(httpx.Response(200, content=b"<html>proxy</html>"), models_answer("/x/m"))
    with capture_logs() as logs:
        facts = await learn_with(handler)
    assert facts.learned_from == (LearnedFrom.MODELS,)
    assert facts.served_model_names == ("tiny",)
    assert facts.model == "/x/m"
    [line] = [entry for entry in logs if entry["event"] == "server_facts_endpoint_failed"]
    assert line["reason"] == "bad_response"


async def test_absent_endpoint_learns_models_and_hub_id() -> None:
    """Without the endpoint, base entries give served names and --model; the LoRA entry is no
    base model; a Hugging Face cache path is also known by its hub id."""
    root = "/hf/hub/models--acme--tiny-llama/snapshots/0123abc"
    facts = await learn_with(serve(route_404(), models_answer(root, ("tiny", "tiny-2"))))
    assert facts.learned_from == (LearnedFrom.MODELS,)
    assert facts.served_model_names == ("tiny", "tiny-2")
    assert facts.model == root
    assert facts.model_aliases == ("acme/tiny-llama",)
    assert facts.lora_modules is None


async def test_unauthorized_endpoint_raises() -> None:
    """A wrong API key is no reason to fall back: the server cannot be asked at all."""
    handler = serve(recorded.mock_response("auth_models_wrong_key"), models_answer("/x"))
    with pytest.raises(VllmError) as caught:
        await learn_with(handler)
    assert caught.value.condition is Condition.UNAUTHORIZED


async def test_plugin_answer_is_taken_as_is() -> None:
    """When the endpoint answers, its facts are the result; /v1/models is not needed."""
    facts = ServerFacts(learned_from=(LearnedFrom.PLUGIN,), model="/m", max_lora_rank=8)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == ROUTE
        return httpx.Response(200, json=facts.to_json())

    assert await learn_with(handler) == facts


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b"\xff\xfe", b" " * (2 << 20)],
    ids=["not-json", "not-object", "not-utf8", "too-large"],
)
async def test_unusable_config_json_leaves_shapes_unknown(tmp_path: Path, content: bytes) -> None:
    """A local --model whose config.json cannot be used is no error: learned from models only."""
    (tmp_path / "config.json").write_bytes(content)
    facts = await learn_with(serve(route_404(), models_answer(str(tmp_path))))
    assert facts.learned_from == (LearnedFrom.MODELS,)
    assert facts.module_shapes == {}
    assert facts.architecture is None


def test_other_architectures_get_no_shapes() -> None:
    """A model outside the Llama family (other module names, MoE sizes) gets its architecture
    and layer count from config.json, but no shapes: a guessed shape could refuse a fit."""
    config = {
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
    }
    assert config_facts(config) == ("MixtralForCausalLM", 3, {})


def test_multimodal_config_reads_its_text_config() -> None:
    """A config that keeps the language model in `text_config` is read from there."""
    text = {"hidden_size": 64, "num_hidden_layers": 5}
    architecture, layers, _ = config_facts({"architectures": ["X"], "text_config": text})
    assert (architecture, layers) == ("X", 5)


@pytest.mark.parametrize(
    ("architecture", "extra"),
    [
        ("llama", {}),
        ("llama", {"num_key_value_heads": 2}),
        ("llama", {"num_key_value_heads": 1, "head_dim": 32}),
        ("mistral", {"num_key_value_heads": 2}),
        ("qwen2", {"num_key_value_heads": 2}),
    ],
)
def test_llama_shapes_match_transformers(architecture: str, extra: dict[str, Any]) -> None:
    """Shapes computed from a config.json equal the nn.Linear / nn.Embedding sizes of the model
    transformers builds from it (defaults for head_dim and num_key_value_heads included)."""
    transformers = importlib.import_module("transformers")
    config_cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
    config = getattr(transformers, config_cls[architecture])(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=50,
        tie_word_embeddings=False,
        **extra,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    actual: dict[str, ModuleShape] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if hasattr(module, "in_features"):
            actual[leaf] = ModuleShape(module.in_features, module.out_features)
        elif hasattr(module, "num_embeddings"):
            actual[leaf] = ModuleShape(module.num_embeddings, module.embedding_dim)
    assert llama_shapes(json.loads(config.to_json_string())) == actual
