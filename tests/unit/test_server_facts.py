"""ServerFacts as JSON: the endpoint's answer read back by the daemon, and what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from lorawarm.server_facts import LearnedFrom, ModuleShape, ServerFacts, model_aliases

FULL = ServerFacts(
    learned_from=(LearnedFrom.PLUGIN,),
    vllm_version="0.32.0",
    model="/models/tiny",
    model_aliases=("acme/tiny",),
    served_model_names=("tiny",),
    max_lora_rank=8,
    max_loras=2,
    max_cpu_loras=3,
    architecture="LlamaForCausalLM",
    num_layers=2,
    lora_modules=frozenset({"q_proj", "lm_head"}),
    module_shapes={"q_proj": ModuleShape(256, 256), "lm_head": ModuleShape(256, 458)},
    runtime_lora_updating=True,
    resolver=True,
    resident=frozenset({"a", "b"}),
)


def test_round_trip_keeps_every_fact() -> None:
    """What the endpoint writes, the daemon reads back unchanged (None stays None)."""
    assert ServerFacts.from_json(FULL.to_json()) == FULL
    assert ServerFacts.from_json(ServerFacts().to_json()) == ServerFacts()


def test_unknown_fields_are_ignored() -> None:
    """A newer plugin may add fields; an older daemon still reads the rest."""
    doc = {**FULL.to_json(), "added_later": {"x": 1}}
    assert ServerFacts.from_json(doc) == FULL


def _with(**changes: Any) -> dict[str, Any]:
    return {**FULL.to_json(), **changes}


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ([], "not a JSON object"),
        (None, "not a JSON object"),
        (_with(schema=2), "schema 2"),
        ({"learned_from": ["plugin"]}, "schema None"),
        (_with(max_lora_rank="8"), "max_lora_rank: expected int"),
        (_with(max_loras=True), "max_loras: expected int"),
        (_with(runtime_lora_updating=1), "runtime_lora_updating: expected bool"),
        (_with(served_model_names="tiny"), "served_model_names: expected a list"),
        (_with(lora_modules=["q_proj", 3]), "lora_modules: expected a list"),
        (_with(module_shapes=[]), "module_shapes: expected an object"),
        (_with(module_shapes={"q_proj": {"in": 256}}), "module_shapes.q_proj"),
        (_with(module_shapes={"q_proj": {"in": 1, "out": False}}), "module_shapes.q_proj"),
        (_with(learned_from=["guesswork"]), "guesswork"),
    ],
)
def test_from_json_refuses_what_is_not_an_answer(payload: object, error: str) -> None:
    """A document of the wrong shape is a ValueError naming the field, never a half-read fact."""
    with pytest.raises(ValueError, match=error):
        ServerFacts.from_json(payload)


def test_model_names_cover_model_aliases_and_served_names() -> None:
    """An adapter's base may name --model, its hub id or a served name."""
    assert FULL.model_names == {"/models/tiny", "acme/tiny", "tiny"}


@pytest.mark.parametrize(
    ("model", "aliases"),
    [
        ("/hf/hub/models--acme--tiny-llama/snapshots/0123abc", ("acme/tiny-llama",)),
        ("/hf/hub/models--acme--tiny-llama/snapshots/0123abc/", ("acme/tiny-llama",)),
        ("/models/tiny", ()),
        ("acme/tiny-llama", ()),
        ("/hf/hub/models--acme--tiny/refs/main", ()),
    ],
)
def test_model_aliases_name_the_hub_id_of_a_cache_path(
    model: str, aliases: tuple[str, ...]
) -> None:
    """A Hugging Face cache path (what vLLM uses for a hub id under HF_HUB_OFFLINE) is also
    known by its hub id; any other --model has no other name."""
    assert model_aliases(model) == aliases
