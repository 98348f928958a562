"""What lorawarm knows of one vLLM server: the facts that decide which adapters it can take.

The plugin's endpoint part builds a `ServerFacts` inside vLLM and answers it as JSON
(`to_json()`); the daemon reads that answer back (`from_json()`), or assembles what it can from
`GET /v1/models`, a local `--model` directory's `config.json` and the settings
(`lorawarm.learn`). Whatever is not known stays None ("not known", never "none"): a check that
needs an unknown fact is skipped, and `learned_from` says where each server's facts came from.

Module names are the ones adapters use (`q_proj`, `gate_proj`, `lm_head`, `embed_tokens`):
vLLM's packed modules (`qkv_proj`, `gate_up_proj`) are already unpacked here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

SCHEMA = 1

# A local Hugging Face cache path, `.../models--org--name/snapshots/<rev>`: vLLM replaces a hub
# id by it when HF_HUB_OFFLINE is set (engine/arg_utils.py), reports it as `root` in /v1/models
# and passes it to resolvers as `base_model_name`; adapters name the hub id.
_HF_CACHE_PATH = re.compile(r".*/models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?")


class LearnedFrom(StrEnum):
    """Where facts came from, in the order they are trusted."""

    PLUGIN = "plugin"  # lorawarm's endpoint inside vLLM: vLLM's own parsed flags and model
    MODELS = "models"  # GET /v1/models: served names and --model only
    CONFIG = "config"  # a local --model directory's config.json: dimensions, no module list
    SETTINGS = "settings"  # LORAWARM_* settings or a [[servers]] entry


@dataclass(frozen=True)
class ModuleShape:
    """One module's dimensions as a LoRA sees them: A is [rank, in], B is [out, rank]."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class ServerFacts:
    """Facts about one server; None means not known."""

    learned_from: tuple[LearnedFrom, ...] = ()
    vllm_version: str | None = None
    # --model as vLLM reports it (`root` of the base entries), and other names of the same
    # model (the hub id `org/name` of a Hugging Face cache path).
    model: str | None = None
    model_aliases: tuple[str, ...] = ()
    served_model_names: tuple[str, ...] = ()
    max_lora_rank: int | None = None
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    architecture: str | None = None
    num_layers: int | None = None
    # The modules the served model class takes LoRA on (vLLM's expected target modules).
    lora_modules: frozenset[str] | None = None
    # Dimensions per module name, where known (from the model or its config.json).
    module_shapes: Mapping[str, ModuleShape] = field(default_factory=dict)
    runtime_lora_updating: bool | None = None
    resolver: bool | None = None  # lorawarm's resolver is registered in that vLLM
    resident: frozenset[str] | None = None  # adapter names in the engine's CPU cache now

    @property
    def model_names(self) -> frozenset[str]:
        """Every name the served base model goes by: --model, its aliases, served names."""
        names = [self.model, *self.model_aliases, *self.served_model_names]
        return frozenset(n for n in names if n)

    def to_json(self) -> dict[str, Any]:
        """The endpoint's answer (and the status API's view of the facts)."""
        out: dict[str, Any] = {"schema": SCHEMA}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "module_shapes":
                value = {
                    name: {"in": s.in_features, "out": s.out_features}
                    for name, s in sorted(value.items())
                }
            elif isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, payload: object) -> ServerFacts:
        """Read an endpoint's answer; raises ValueError when it is not one (a wrong schema, a
        field of the wrong type). Unknown fields are ignored: a newer plugin may add some."""
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
        if payload.get("schema") != SCHEMA:
            raise ValueError(f"schema {payload.get('schema')!r}, expected {SCHEMA}")
        return cls(
            learned_from=tuple(LearnedFrom(v) for v in _strs(payload, "learned_from")),
            vllm_version=_opt(payload, "vllm_version", str),
            model=_opt(payload, "model", str),
            model_aliases=_strs(payload, "model_aliases"),
            served_model_names=_strs(payload, "served_model_names"),
            max_lora_rank=_opt(payload, "max_lora_rank", int),
            max_loras=_opt(payload, "max_loras", int),
            max_cpu_loras=_opt(payload, "max_cpu_loras", int),
            architecture=_opt(payload, "architecture", str),
            num_layers=_opt(payload, "num_layers", int),
            lora_modules=(
                None
                if payload.get("lora_modules") is None
                else frozenset(_strs(payload, "lora_modules"))
            ),
            module_shapes=_shapes(payload.get("module_shapes")),
            runtime_lora_updating=_opt(payload, "runtime_lora_updating", bool),
            resolver=_opt(payload, "resolver", bool),
            resident=(
                None if payload.get("resident") is None else frozenset(_strs(payload, "resident"))
            ),
        )


def model_aliases(model: str) -> tuple[str, ...]:
    """Other names of the model vLLM was started with: the hub id `org/name` of a local
    Hugging Face cache path, nothing for any other `--model`."""
    match = _HF_CACHE_PATH.fullmatch(model)
    return (f"{match['org']}/{match['name']}",) if match else ()


def _opt(payload: dict[str, Any], key: str, kind: type) -> Any:
    value = payload.get(key)
    if value is None:
        return None
    # bool is an int in Python: a count given as true is as wrong as a flag given as 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _strs(payload: dict[str, Any], key: str) -> tuple[str, ...]:
    value = payload.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: expected a list of strings")
    return tuple(value)


def _shapes(value: object) -> dict[str, ModuleShape]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("module_shapes: expected an object")
    shapes = {}
    for name, dims in value.items():
        if not (
            isinstance(dims, dict)
            and all(
                isinstance(dims.get(k), int) and not isinstance(dims.get(k), bool)
                for k in ("in", "out")
            )
        ):
            raise ValueError(f"module_shapes.{name}: expected {{'in': int, 'out': int}}")
        shapes[str(name)] = ModuleShape(dims["in"], dims["out"])
    return shapes
