"""`lorawarm.fit.judge`: one valid adapter against one server's facts and the operator's policy.

Adapters are written in PEFT's format (tests/unit/adapters.py: a Llama-style adapter with LoRA
on q/k/v/o of 2 layers, hidden size 64) and inspected by the real `inspect_adapter`, so each
verdict is judged from what inspection really read from the safetensors header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorawarm.fit import Caution, Fit, FitPolicy, judge
from lorawarm.inspection import Reason, Rules, Valid, inspect_adapter
from lorawarm.server_facts import ModuleShape, ServerFacts
from tests.unit.adapters import BIN, HIDDEN, TARGETS, lora_tensors, torch_zip_bytes, write_adapter

MODEL = "/models/tiny"
LLAMA_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    | {"embed_tokens", "lm_head"}
)
SHAPES = {m: ModuleShape(HIDDEN, HIDDEN) for m in TARGETS}
FACTS = ServerFacts(
    model=MODEL,
    served_model_names=("tiny",),
    max_lora_rank=16,
    architecture="LlamaForCausalLM",
    num_layers=2,
    lora_modules=LLAMA_MODULES,
    module_shapes=SHAPES,
)
FREE = FitPolicy()


def valid(root: Path, name: str = "a", **kwargs: Any) -> Valid:
    """A real adapter folder at `root/name`, inspected with no server-dependent rule."""
    kwargs.setdefault("base_model", MODEL)
    write_adapter(root / name, **kwargs)
    rules = Rules(safetensors_only=False)
    result = inspect_adapter(root / name, root=root, rules=rules)
    assert isinstance(result, Valid), result
    return result


def refused(fit: Fit, reason: Reason) -> str:
    assert (fit.ok, fit.reason) == (False, reason), fit
    return fit.message


def test_adapter_for_the_served_model_fits(tmp_path: Path) -> None:
    """An adapter trained for --model, of the model's dimensions and rank, fits, no warning."""
    assert judge(valid(tmp_path), FACTS, FREE) == Fit(True)


def test_name_of_a_served_model_is_refused(tmp_path: Path) -> None:
    """An adapter named like a served name is name_is_base_model (vLLM's 400); without served
    names --model is the served name; the operator's served names count too."""
    message = refused(judge(valid(tmp_path, "tiny"), FACTS, FREE), Reason.NAME_IS_BASE_MODEL)
    assert "'tiny'" in message
    plain = ServerFacts(model="mymodel")
    refused(judge(valid(tmp_path, "mymodel"), plain, FREE), Reason.NAME_IS_BASE_MODEL)
    extra = FitPolicy(served_model_names=("chat",))
    refused(judge(valid(tmp_path, "chat"), FACTS, extra), Reason.NAME_IS_BASE_MODEL)
    assert judge(valid(tmp_path, "chat"), FACTS, FREE).ok


def test_other_base_model_is_a_warning_when_not_enforced(tmp_path: Path) -> None:
    """With no base model set, an adapter naming a quantized variant, a training path or no
    base at all fits, with the warning base_model_differs naming what it said."""
    for i, base in enumerate(("unsloth/tiny-bnb-4bit", "/kaggle/working/out", None)):
        config = {"base_model_name_or_path": base}
        fit = judge(valid(tmp_path, f"a{i}", config=config), FACTS, FREE)
        assert fit.ok, fit
        assert [w.code for w in fit.warnings] == [Caution.BASE_MODEL_DIFFERS]
        assert ("names no base model" if base is None else base) in fit.warnings[0].message
        assert MODEL in fit.warnings[0].message


def test_aliases_and_served_names_quiet_the_warning(tmp_path: Path) -> None:
    """A base named by an alias, a served name or --model with a trailing slash is no warning."""
    aliases = FitPolicy(base_model_aliases=("org/tiny",))
    assert judge(valid(tmp_path, "a", base_model="org/tiny"), FACTS, aliases).warnings == ()
    assert judge(valid(tmp_path, "b", base_model="tiny"), FACTS, FREE).warnings == ()
    assert judge(valid(tmp_path, "c", base_model=MODEL + "/"), FACTS, FREE).warnings == ()


def test_enforced_base_model_refuses_other_names(tmp_path: Path) -> None:
    """With a base model set, another name (or none) is base_model_mismatch; the base model,
    its aliases and the server's own names are accepted."""
    policy = FitPolicy(base_model="org/tiny", base_model_aliases=("org/tiny-v1",))
    other = valid(tmp_path, "a", base_model="unsloth/tiny-bnb-4bit")
    message = refused(judge(other, FACTS, policy), Reason.BASE_MODEL_MISMATCH)
    assert "unsloth/tiny-bnb-4bit" in message
    assert "org/tiny" in message
    nothing = valid(tmp_path, "b", config={"base_model_name_or_path": None})
    assert "names no base model" in refused(
        judge(nothing, FACTS, policy), Reason.BASE_MODEL_MISMATCH
    )
    for i, base in enumerate(("org/tiny", "org/tiny-v1", MODEL, "tiny")):
        fit = judge(valid(tmp_path, f"ok{i}", base_model=base), FACTS, policy)
        assert fit == Fit(True), (base, fit)


def test_rank_above_the_server_limit(tmp_path: Path) -> None:
    """The largest rank (rank_pattern included) above the server's --max-lora-rank is
    rank_too_large; the operator's max_lora_rank overrides the learned limit both ways."""
    r8 = valid(tmp_path, "a")
    low = ServerFacts(max_lora_rank=4)
    assert "rank 8 is above this server's max LoRA rank 4" in refused(
        judge(r8, low, FREE), Reason.RANK_TOO_LARGE
    )
    assert judge(r8, low, FitPolicy(max_lora_rank=8)).ok
    refused(judge(r8, FACTS, FitPolicy(max_lora_rank=4)), Reason.RANK_TOO_LARGE)
    tensors = {**lora_tensors(r=8), **lora_tensors(r=12, layers=1, targets=("q_proj",))}
    pattern = valid(tmp_path, "b", tensors=tensors, config={"rank_pattern": {"q_proj": 12}})
    refused(judge(pattern, ServerFacts(max_lora_rank=8), FREE), Reason.RANK_TOO_LARGE)


def test_module_the_model_does_not_take_lora_on(tmp_path: Path) -> None:
    """A module outside the model class's LoRA modules (lm_head on Mistral) is
    target_modules_not_supported, and the message lists what the model takes."""
    tensors = {
        **lora_tensors(targets=("q_proj",)),
        "base_model.model.lm_head.lora_A.weight": lora_tensors(layers=1)[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ],
        "base_model.model.lm_head.lora_B.weight": lora_tensors(layers=1)[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        ],
    }
    adapter = valid(tmp_path, tensors=tensors, config={"target_modules": ["q_proj", "lm_head"]})
    no_embeddings = LLAMA_MODULES - {"lm_head", "embed_tokens"}
    mistral = ServerFacts(architecture="MistralForCausalLM", lora_modules=no_embeddings)
    message = refused(judge(adapter, mistral, FREE), Reason.TARGET_MODULES_NOT_SUPPORTED)
    assert message.startswith("the adapter has LoRA weights for lm_head, which")
    assert "(MistralForCausalLM)" in message
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message
    assert judge(adapter, ServerFacts(lora_modules=LLAMA_MODULES), FREE).ok


def test_config_targets_without_weights_decide_nothing(tmp_path: Path) -> None:
    """target_modules naming a module that has no tensors is not refused: vLLM goes by the
    tensor names (PEFT skips targets the model does not have)."""
    adapter = valid(tmp_path, config={"target_modules": [*TARGETS, "lm_head"]})
    assert adapter.lora_shape is not None
    assert "lm_head" in adapter.lora_shape.target_modules
    assert judge(adapter, ServerFacts(lora_modules=frozenset(TARGETS)), FREE).ok


@pytest.mark.parametrize(
    ("shape", "tensor", "expected"),
    [
        pytest.param(
            ModuleShape(128, HIDDEN),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "has shape [8, 64], expected [8, 128]: this server's q_proj has 128 inputs",
            id="inputs",
        ),
        pytest.param(
            ModuleShape(HIDDEN, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "has shape [64, 8], expected [32, 8]: this server's q_proj has 32 outputs",
            id="outputs",
        ),
    ],
)
def test_shape_mismatch_names_the_tensor(
    tmp_path: Path, shape: ModuleShape, tensor: str, expected: str
) -> None:
    """A LoRA matrix of other dimensions than the served module, larger or smaller, is
    shape_mismatch; the message names the tensor, its shape and the one expected."""
    facts = ServerFacts(module_shapes={**SHAPES, "q_proj": shape})
    message = refused(judge(valid(tmp_path), facts, FREE), Reason.SHAPE_MISMATCH)
    assert message.startswith(f"tensor {tensor} {expected}; the adapter was made for a model")


def test_layer_the_model_does_not_have(tmp_path: Path) -> None:
    """Tensors for layer 3 on a 2-layer model are shape_mismatch (vLLM would drop them)."""
    adapter = valid(tmp_path, tensors=lora_tensors(layers=4))
    assert adapter.lora_shape is not None
    assert adapter.lora_shape.layers == (0, 1, 2, 3)
    message = refused(judge(adapter, FACTS, FREE), Reason.SHAPE_MISMATCH)
    assert "layer 3, but this server's model has 2 layers (0-1)" in message
    assert judge(valid(tmp_path, "b", tensors=lora_tensors(layers=1)), FACTS, FREE).ok


def test_unknown_facts_skip_their_checks(tmp_path: Path) -> None:
    """A server nothing is known of takes any valid adapter: every check needs a fact."""
    big = valid(tmp_path, "tiny", r=64, tensors=lora_tensors(r=64, layers=9, hidden=32))
    assert judge(big, ServerFacts(), FREE) == Fit(True)


def test_pickled_weights_skip_module_and_shape_checks(tmp_path: Path) -> None:
    """`.bin` weights are never opened far enough to know their modules: only the config's
    facts (rank) are judged."""
    adapter = valid(tmp_path, weights=BIN, weights_bytes=torch_zip_bytes())
    assert adapter.lora_shape is None
    facts = ServerFacts(max_lora_rank=16, lora_modules=frozenset({"x"}), num_layers=1)
    assert judge(adapter, facts, FREE).ok
    refused(judge(adapter, ServerFacts(max_lora_rank=4), FREE), Reason.RANK_TOO_LARGE)


def test_checks_come_in_vllms_order(tmp_path: Path) -> None:
    """An adapter wrong in several ways gets the reason vLLM would give first: the rank before
    the modules, the modules before the shapes."""
    adapter = valid(tmp_path, r=32, tensors=lora_tensors(r=32, hidden=32))
    facts = ServerFacts(max_lora_rank=16, lora_modules=frozenset({"q_proj"}), module_shapes=SHAPES)
    refused(judge(adapter, facts, FREE), Reason.RANK_TOO_LARGE)
    refused(judge(adapter, facts, FitPolicy(max_lora_rank=32)), Reason.TARGET_MODULES_NOT_SUPPORTED)
    wide = ServerFacts(lora_modules=LLAMA_MODULES, module_shapes=SHAPES)
    refused(judge(adapter, wide, FREE), Reason.SHAPE_MISMATCH)


def test_warning_comes_with_a_refusal_too(tmp_path: Path) -> None:
    """A refused adapter still carries its warnings (the status shows both)."""
    adapter = valid(tmp_path, base_model="other/model", r=32, tensors=lora_tensors(r=32))
    fit = judge(adapter, FACTS, FREE)
    refused(fit, Reason.RANK_TOO_LARGE)
    assert [w.code for w in fit.warnings] == [Caution.BASE_MODEL_DIFFERS]
