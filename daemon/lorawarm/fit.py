"""Whether one server can take one valid adapter, decided before anything is sent to it.

`judge(adapter, facts, policy)` is pure: an inspected adapter (`inspection.Valid`, with the
`LoraShape` its safetensors header showed), what was learned of a server (`ServerFacts`) and the
operator's overrides (`FitPolicy`) in; a `Fit` out. The daemon's reconcilers and the plugin's
resolver call the same function, so they agree on every (adapter, server) verdict.

What decides is what vLLM itself checks when it loads an adapter, in vLLM's order
(`lora/worker_manager.py` `_load_adapter`, `lora/lora_model.py`, the layers' `set_lora`):

1. the adapter's name is not a served base model name (vLLM's 400), `name_is_base_model`;
2. only when the operator enforces a base model: `base_model_name_or_path` is it, one of its
   aliases or a name the server serves its model by, `base_model_mismatch`;
3. the largest rank is within the server's `--max-lora-rank` (or the override),
   `rank_too_large`;
4. every module the weights name is one the served model class takes LoRA on,
   `target_modules_not_supported` (vLLM refuses this with a 500 after reading the weights:
   `expected target modules in {...} but received [...]`);
5. every LoRA matrix fits the module it lands on, and no tensor names a layer the model does
   not have, `shape_mismatch`. vLLM 0.32 copies each matrix into a slot sized for the served
   model: a larger one is refused with a 500 (`The size of tensor a (256) must match the size
   of tensor b (512)`), but a SMALLER one, and one for a layer the model lacks, are taken
   silently (200) and serve an adapter made for another model. lorawarm refuses both: exact
   dimensions and layer indices below the model's layer count.

The base model's name decides nothing unless the operator set one: adapters in the wild name
quantized variants (`unsloth/...-bnb-4bit`), training paths or nothing at all, and vLLM serves
them all. A name that matches neither the server's names nor an alias is reported as the
warning `base_model_differs`.

A fact that is not known (None, empty) skips the checks that need it: such a server gets what
inspection alone accepts, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from lorawarm.inspection import Reason, Valid
from lorawarm.inspection.lora_shape import ModuleDims
from lorawarm.inspection.verdict import norm_model
from lorawarm.server_facts import ServerFacts

# Module names outside the LoRA check: classification heads saved whole (modules_to_save,
# vLLM matches them by name) and fused MoE experts, which vLLM names by another rule.
_EXPERTS = ".experts"


class Caution(StrEnum):
    """Why a fitting adapter is reported anyway. The values are public: status API, logs."""

    BASE_MODEL_DIFFERS = "base_model_differs"


@dataclass(frozen=True)
class FitPolicy:
    """The operator's overrides for one server (settings, or its `[[servers]]` entry).

    `base_model` set enforces the base-model check, with `base_model_aliases` as further
    accepted names; unset, the aliases only quiet the `base_model_differs` warning.
    `max_lora_rank` replaces the server's learned `--max-lora-rank`. `served_model_names` are
    names no adapter may take, in addition to those learned.
    """

    base_model: str | None = None
    base_model_aliases: tuple[str, ...] = ()
    max_lora_rank: int | None = None
    served_model_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FitWarning:
    """Something an operator should know about an adapter that fits: code and message."""

    code: Caution
    message: str


@dataclass(frozen=True)
class Fit:
    """The verdict for one adapter on one server: `ok`, or `reason` + `message` saying why
    not; `warnings` in both cases."""

    ok: bool
    reason: Reason | None = None
    message: str = ""
    warnings: tuple[FitWarning, ...] = ()


class _Misfit(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def judge(adapter: Valid, facts: ServerFacts, policy: FitPolicy) -> Fit:
    """Can the server described by `facts` take `adapter`? See the module docstring."""
    warnings = _warnings(adapter, facts, policy)
    try:
        _check_name(adapter, facts, policy)
        _check_base_model(adapter, facts, policy)
        _check_rank(adapter, facts, policy)
        _check_modules(adapter, facts)
        _check_shapes(adapter, facts)
    except _Misfit as misfit:
        return Fit(False, misfit.reason, misfit.message, warnings)
    return Fit(True, warnings=warnings)


def _served_names(facts: ServerFacts, policy: FitPolicy) -> frozenset[str]:
    """The names vLLM refuses for an adapter: what it serves the model as (`--model` when no
    `--served-model-name` is given), plus the operator's."""
    learned = facts.served_model_names or ((facts.model,) if facts.model else ())
    return frozenset((*learned, *policy.served_model_names))


def _check_name(adapter: Valid, facts: ServerFacts, policy: FitPolicy) -> None:
    if adapter.name in _served_names(facts, policy):
        raise _Misfit(
            Reason.NAME_IS_BASE_MODEL,
            f"adapter name {adapter.name!r} is a name this server serves its base model by; "
            "vLLM refuses it",
        )


def _known_names(facts: ServerFacts, policy: FitPolicy) -> frozenset[str]:
    names = (*facts.model_names, *policy.base_model_aliases, *policy.served_model_names)
    return frozenset(norm_model(n) for n in names if n)


def _check_base_model(adapter: Valid, facts: ServerFacts, policy: FitPolicy) -> None:
    if not policy.base_model:
        return
    accepted = _known_names(facts, policy) | {norm_model(policy.base_model)}
    base = adapter.base_model
    if base is not None and norm_model(base) in accepted:
        return
    what = "names no base model" if base is None else f"was trained for {ascii(base)[:120]}"
    raise _Misfit(
        Reason.BASE_MODEL_MISMATCH,
        f"adapter {what}; this server requires base model {policy.base_model} (also accepted: "
        f"{', '.join(sorted(accepted - {norm_model(policy.base_model)})) or 'nothing else'})",
    )


def _warnings(adapter: Valid, facts: ServerFacts, policy: FitPolicy) -> tuple[FitWarning, ...]:
    if policy.base_model or not facts.model_names:
        return ()  # enforced (a mismatch is a refusal), or nothing known to compare with
    base = adapter.base_model
    if base is not None and norm_model(base) in _known_names(facts, policy):
        return ()
    named = "names no base model" if base is None else f"names base model {ascii(base)[:120]}"
    return (
        FitWarning(
            Caution.BASE_MODEL_DIFFERS,
            f"adapter {named}, which is none of this server's names for its model "
            f"({', '.join(sorted(_known_names(facts, policy)))}); it is served because its "
            "modules and shapes fit",
        ),
    )


def _check_rank(adapter: Valid, facts: ServerFacts, policy: FitPolicy) -> None:
    limit = policy.max_lora_rank if policy.max_lora_rank is not None else facts.max_lora_rank
    if limit is not None and adapter.rank > limit:
        source = "the max LoRA rank set for it" if policy.max_lora_rank else "its --max-lora-rank"
        raise _Misfit(
            Reason.RANK_TOO_LARGE,
            f"LoRA rank {adapter.rank} is above this server's max LoRA rank {limit} "
            f"({source}); vLLM refuses it",
        )


def _checked_modules(adapter: Valid) -> tuple[ModuleDims, ...]:
    shape = adapter.lora_shape
    if shape is None:
        return ()
    saved = set(shape.modules_to_save)
    return tuple(m for m in shape.modules if m.name not in saved and _EXPERTS not in m.path)


def _check_modules(adapter: Valid, facts: ServerFacts) -> None:
    if facts.lora_modules is None:
        return
    outside = sorted({m.name for m in _checked_modules(adapter)} - facts.lora_modules)
    if outside:
        model = facts.architecture or facts.model or "the served model"
        raise _Misfit(
            Reason.TARGET_MODULES_NOT_SUPPORTED,
            f"the adapter has LoRA weights for {', '.join(outside)}, which this server's model "
            f"({model}) does not take LoRA on; it takes LoRA on "
            f"{', '.join(sorted(facts.lora_modules))}",
        )


def _check_shapes(adapter: Valid, facts: ServerFacts) -> None:
    for m in _checked_modules(adapter):
        want = facts.module_shapes.get(m.name)
        if want is None:
            continue
        kind = "vocabulary size" if m.embedding else "inputs"
        if m.in_features != want.in_features:
            raise _Misfit(
                Reason.SHAPE_MISMATCH,
                f"tensor {m.a_tensor} has shape [{m.rank}, {m.in_features}], expected "
                f"[{m.rank}, {want.in_features}]: this server's {m.name} has "
                f"{want.in_features} {kind}; the adapter was made for a model of other "
                "dimensions",
            )
        if m.out_features != want.out_features:
            raise _Misfit(
                Reason.SHAPE_MISMATCH,
                f"tensor {m.b_tensor} has shape [{m.out_features}, {m.rank}], expected "
                f"[{want.out_features}, {m.rank}]: this server's {m.name} has "
                f"{want.out_features} outputs; the adapter was made for a model of other "
                "dimensions",
            )
    layers = adapter.lora_shape.layers if adapter.lora_shape is not None else ()
    if facts.num_layers is not None and layers and layers[-1] >= facts.num_layers:
        raise _Misfit(
            Reason.SHAPE_MISMATCH,
            f"the adapter has LoRA weights for layer {layers[-1]}, but this server's model has "
            f"{facts.num_layers} layers (0-{facts.num_layers - 1}); it was made for a deeper "
            "model",
        )
