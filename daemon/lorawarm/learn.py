"""Learn what one vLLM server serves and takes, from the server itself.

In the order trusted (`ServerFacts.learned_from` lists each source used):
1. lorawarm's endpoint inside vLLM (`GET /v1/lorawarm/server`, `VLLM_PLUGINS=lorawarm` on
   vLLM 0.26+): vLLM's parsed flags, its model class's LoRA modules and their shapes, what the
   engine holds in memory. When it answers, that is all: it knows more than anything below.
2. Otherwise `GET /v1/models`, on every vLLM: the base entries (`parent` null) give the served
   names (`id`) and `--model` (`root`); a Hugging Face cache path
   (`.../models--org--name/snapshots/<rev>`) also gives the hub id `org/name`.
3. Then, when `--model` is a local directory readable here (vLLM on the same host or volume),
   its `config.json`: the architecture, the layer count and, for the Llama family whose module
   names and dimensions follow one pattern, each module's shape, with transformers' defaults
   (`head_dim` = hidden / heads, `num_key_value_heads` = heads). Which modules the vLLM class
   takes LoRA on cannot be read from a config, so `lora_modules` stays None (not known).

`learn()` never raises for what it could not learn (that stays None); only a server that cannot
be asked at all (unreachable, timing out, refusing the API key, `/v1/models` failing) raises
`VllmError`. A broken endpoint answer is logged and learning falls back to `/v1/models`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from lorawarm.logs import get_logger
from lorawarm.server_facts import LearnedFrom, ModuleShape, ServerFacts, model_aliases
from lorawarm.vllm_client import Condition, ModelEntry, VllmClient, VllmError

log = get_logger(__name__)

MAX_CONFIG_BYTES = 1 << 20
"""A model's config.json is a few KiB; a bigger file is not read."""

# Transformers classes whose attention and MLP are Llama's: q/k/v/o_proj, gate/up/down_proj,
# one intermediate size, head_dim = hidden / heads unless the config says otherwise (checked
# against the modules transformers builds, tests/unit/test_learn.py). Others get no shapes from
# their config: MoE models and fused qkv name other modules, and Gemma or Qwen3 default an
# absent head_dim to a constant, not hidden / heads; a wrong shape would refuse adapters that fit.
LLAMA_FAMILY = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})

# Raised by the endpoint call for a server that cannot be asked anything: no fallback helps.
_FATAL = frozenset({Condition.UNREACHABLE, Condition.TIMEOUT, Condition.UNAUTHORIZED})


async def learn(client: VllmClient, models: Sequence[ModelEntry] | None = None) -> ServerFacts:
    """Everything the server at `client` tells about itself (see the module docstring).
    `models`: its `/v1/models` answer when the caller has just listed it (not asked again)."""
    try:
        facts = await client.server_facts()
    except VllmError as err:
        if err.condition in _FATAL:
            raise
        log.warning(
            "server_facts_endpoint_failed",
            url=client.base_url,
            reason=str(err.condition),
            message=err.message,
            fallback="/v1/models",
        )
        facts = None
    if facts is not None:
        return facts
    return await _from_models(await client.list_models() if models is None else models)


async def _from_models(models: Sequence[ModelEntry]) -> ServerFacts:
    """Facts from `/v1/models`, plus a local `--model` directory's config.json."""
    base = [entry for entry in models if entry.parent is None]
    served = tuple(dict.fromkeys(entry.id for entry in base))
    roots = list(dict.fromkeys(entry.root for entry in base if entry.root))
    model = roots[0] if roots else None
    # vLLM 0.32 serves one model, so every base entry has the same root; any other root is
    # another name of it all the same.
    aliases = [*roots[1:], *(alias for root in roots for alias in model_aliases(root))]
    facts = ServerFacts(
        learned_from=(LearnedFrom.MODELS,),
        model=model,
        model_aliases=tuple(dict.fromkeys(a for a in aliases if a != model)),
        served_model_names=served,
    )
    if model is None:
        return facts
    config = await asyncio.to_thread(read_model_config, model)
    if config is None:
        return facts
    architecture, num_layers, shapes = config_facts(config)
    return replace(
        facts,
        learned_from=(LearnedFrom.MODELS, LearnedFrom.CONFIG),
        architecture=architecture,
        num_layers=num_layers,
        module_shapes=shapes,
    )


def read_model_config(model: str) -> Mapping[str, Any] | None:
    """`<model>/config.json` as a JSON object, when `model` is an absolute local directory that
    holds a readable one; None otherwise (a hub id, a path on another host, no permission)."""
    if not os.path.isabs(model) or not os.path.isdir(model):
        return None
    path = os.path.join(model, "config.json")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        log.info("model_config_unreadable", path=path, error=err.strerror or str(err))
        return None
    if len(data) > MAX_CONFIG_BYTES:
        log.warning("model_config_too_large", path=path, limit=MAX_CONFIG_BYTES)
        return None
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        log.warning("model_config_not_json", path=path)
        return None
    if not isinstance(parsed, dict):
        log.warning("model_config_not_object", path=path)
        return None
    return parsed


def config_facts(
    config: Mapping[str, Any],
) -> tuple[str | None, int | None, dict[str, ModuleShape]]:
    """(architecture, layer count, module shapes) from a transformers config.json.

    A multimodal config keeps the language model's numbers in `text_config`. Shapes are given
    only for `LLAMA_FAMILY` and only for modules whose numbers are all present.
    """
    architectures = config.get("architectures")
    architecture = (
        architectures[0]
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
        else None
    )
    text = config.get("text_config")
    if not isinstance(text, dict) or "hidden_size" in config:
        text = config
    num_layers = _int(text, "num_hidden_layers")
    if architecture not in LLAMA_FAMILY:
        return architecture, num_layers, {}
    return architecture, num_layers, llama_shapes(text)


def llama_shapes(config: Mapping[str, Any]) -> dict[str, ModuleShape]:
    """Module shapes (as a LoRA sees them) of a Llama-family model with this config, with the
    defaults transformers' `LlamaConfig` applies for absent `head_dim`/`num_key_value_heads`."""
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads") or heads
    head_dim = _int(config, "head_dim") or (hidden // heads if hidden and heads else None)
    intermediate = _int(config, "intermediate_size")
    vocab = _int(config, "vocab_size")
    shapes: dict[str, ModuleShape] = {}
    if hidden is None:
        return shapes
    if heads and head_dim:
        shapes["q_proj"] = ModuleShape(hidden, heads * head_dim)
        shapes["o_proj"] = ModuleShape(heads * head_dim, hidden)
    if kv_heads and head_dim:
        shapes["k_proj"] = ModuleShape(hidden, kv_heads * head_dim)
        shapes["v_proj"] = ModuleShape(hidden, kv_heads * head_dim)
    if intermediate:
        shapes["gate_proj"] = ModuleShape(hidden, intermediate)
        shapes["up_proj"] = ModuleShape(hidden, intermediate)
        shapes["down_proj"] = ModuleShape(intermediate, hidden)
    if vocab:
        # PEFT's lora_embedding_A is [r, vocab] and lora_embedding_B [hidden, r].
        shapes["embed_tokens"] = ModuleShape(vocab, hidden)
        shapes["lm_head"] = ModuleShape(hidden, vocab)
    return shapes


def _int(config: Mapping[str, Any], key: str) -> int | None:
    """A positive integer from the config, else None (absent, null, wrong type)."""
    value = config.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None
