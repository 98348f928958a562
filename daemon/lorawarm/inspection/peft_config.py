"""`adapter_config.json`: read within bounds, then checked as vLLM checks it on load
(`lora/peft_helper.py`: rank, bias, DoRA, modules_to_save, required fields) plus the base model,
which vLLM does not check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorawarm.inspection.containment import open_regular, read_exactly
from lorawarm.inspection.verdict import (
    CONFIG_FILE,
    Context,
    Reason,
    Reject,
    Rules,
    norm_model,
    spell,
)

MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
# PEFT modules vLLM accepts in modules_to_save (vllm/lora/peft_helper.py).
ALLOWED_MODULES_TO_SAVE = frozenset({"classifier", "score"})
# String values of init_lora_weights that only set the initial weights (vllm/lora/peft_helper.py
# `_init_is_supported`); PiSSA, OLoRA, CorDA, LoftQ... change the base model and are refused.
SUPPORTED_STRING_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})


def read_config(path: Path, size: int) -> dict[str, Any]:
    """The config as a JSON object; refused when it is too large, too deep or not an object."""
    if size > MAX_CONFIG_BYTES:
        raise Reject(
            Reason.CONFIG_TOO_LARGE,
            f"{CONFIG_FILE} is {size} bytes; at most {MAX_CONFIG_BYTES} are accepted",
        )
    with open_regular(path) as fd:
        raw = read_exactly(fd, MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise Reject(Reason.CONFIG_TOO_LARGE, f"{CONFIG_FILE} grew past {MAX_CONFIG_BYTES} bytes")
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise Reject(
            Reason.CONFIG_NOT_JSON, f"{CONFIG_FILE} nests deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise Reject(
            Reason.CONFIG_NOT_JSON,
            f"{CONFIG_FILE} is not valid JSON ({str(err)[:120]})",
            copying=True,
        ) from None
    if not isinstance(config, dict):
        raise Reject(Reason.CONFIG_NOT_OBJECT, f"{CONFIG_FILE} must hold a JSON object")
    return config


def _json_depth(raw: bytes) -> int:
    """Bracket nesting depth, ignoring brackets inside strings: cheap, and bounds the parser.

    Up to MAX_JSON_DEPTH it may answer the bracket count instead, an upper bound of the depth.
    """
    openers = raw.count(b"[") + raw.count(b"{")
    if openers <= MAX_JSON_DEPTH:
        return openers  # skips the byte loop, a quarter of inspecting a PEFT config
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: dict[str, Any], rules: Rules) -> frozenset[int]:
    """Check the PEFT config as vLLM will, plus the base model; return every rank it declares
    (`r` and the values of `rank_pattern`)."""
    peft_type = config.get("peft_type")
    if not _is_lora_type(peft_type):
        raise Reject(
            Reason.WRONG_PEFT_TYPE,
            f'peft_type is {ascii(peft_type)[:40]}; only LoRA adapters ("LORA") can be served',
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise Reject(Reason.MISSING_FIELD, f"{CONFIG_FILE} has no {key!r}; vLLM needs it")
    r = config["r"]
    if not _is_int(r) or r < 1:
        raise Reject(Reason.BAD_FIELD, f"'r' must be a positive integer, not {ascii(r)[:40]}")
    alpha = config["lora_alpha"]
    if not (_is_int(alpha) or isinstance(alpha, float)) or not math.isfinite(alpha):
        raise Reject(Reason.BAD_FIELD, f"'lora_alpha' must be a number, not {ascii(alpha)[:40]}")
    targets = config["target_modules"]
    if isinstance(targets, str):
        if not targets:
            raise Reject(Reason.BAD_FIELD, "'target_modules' is an empty string")
    elif not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    ):
        raise Reject(
            Reason.BAD_FIELD, "'target_modules' must be a non-empty list of module names or a regex"
        )
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_is_int(v) and v >= 1 for v in pattern.values()):
        raise Reject(
            Reason.BAD_FIELD, "'rank_pattern' must map module names to positive integer ranks"
        )
    ranks = frozenset({r, *pattern.values()})
    rank = max(ranks)
    if rules.max_lora_rank is not None and rank > rules.max_lora_rank:
        raise Reject(
            Reason.RANK_TOO_LARGE,
            f"LoRA rank {rank} is above the max LoRA rank {rules.max_lora_rank}",
            hint=_raise_rank,
        )
    _check_supported(config)
    _check_base_model(config, rules)
    return ranks


def _is_lora_type(peft_type: object) -> bool:
    """vLLM never reads peft_type (`lora/peft_helper.py` takes r, lora_alpha and target_modules,
    and the weights decide the rest), so it serves "LORA" in any case and also a config whose
    peft_type is missing, null or "none" (seen from hand-written and converted configs). PEFT
    itself loads only "LORA". Accepted: any case of "lora", and missing/null/"none", since the
    weights check then proves the tensors are LoRA matrices of the declared rank; refused: any
    other method's name ("IA3", "LOHA", "ADALORA", ...), whose weights vLLM cannot read."""
    if peft_type is None:
        return True
    return isinstance(peft_type, str) and peft_type.strip().lower() in ("lora", "none", "")


def _raise_rank(context: Context) -> str:
    if context is Context.COMMAND:
        flag = spell("max_lora_rank", context)
        return f"pass a larger {flag} (vLLM's), or retrain with a smaller r"
    return (
        f"raise vLLM's --max-lora-rank and {spell('max_lora_rank', context)}, or retrain with a "
        "smaller r"
    )


def _check_supported(config: dict[str, Any]) -> None:
    """Refuse the PEFT features vLLM does not serve."""
    bias = config.get("bias", "none")
    if bias != "none":  # vLLM compares exactly: a null bias is refused too
        raise Reject(
            Reason.BIAS_NOT_SUPPORTED,
            f"bias is {ascii(bias)[:40]}; vLLM serves only adapters trained with bias='none'",
        )
    if config.get("use_dora"):
        raise Reject(Reason.DORA_NOT_SUPPORTED, "DoRA adapters (use_dora) are not served by vLLM")
    if config.get("lora_bias"):
        raise Reject(Reason.LORA_BIAS_NOT_SUPPORTED, "lora_bias adapters are not served by vLLM")
    if config.get("use_qalora"):
        raise Reject(Reason.QALORA_NOT_SUPPORTED, "QALoRA adapters are not served by vLLM")
    if config.get("alora_invocation_tokens"):
        raise Reject(
            Reason.ALORA_NOT_SUPPORTED, "Activated LoRA (alora_invocation_tokens) is not served"
        )
    if config.get("layer_replication"):
        raise Reject(
            Reason.LAYER_REPLICATION_NOT_SUPPORTED, "layer_replication adapters are not served"
        )
    if config.get("use_bdlora"):
        raise Reject(
            Reason.BDLORA_NOT_SUPPORTED, "block-diagonal LoRA (use_bdlora) is not served by vLLM"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_STRING_INITS:
        raise Reject(
            Reason.INIT_NOT_SUPPORTED,
            f"init_lora_weights is {ascii(init)[:40]}, which changes the base model's weights; "
            "convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion",
        )
    saved = config.get("modules_to_save")
    if saved:
        names = [saved] if isinstance(saved, str) else saved
        if not (
            isinstance(names, list)
            and all(isinstance(n, str) for n in names)
            and set(names) <= ALLOWED_MODULES_TO_SAVE
        ):
            raise Reject(
                Reason.MODULES_TO_SAVE_NOT_SUPPORTED,
                f"modules_to_save is {ascii(saved)[:80]}; vLLM accepts only "
                f"{sorted(ALLOWED_MODULES_TO_SAVE)}",
            )


def _check_base_model(config: dict[str, Any], rules: Rules) -> None:
    accepted = rules.accepted_base_models
    if not accepted:
        return
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str):
        raise Reject(
            Reason.BASE_MODEL_MISMATCH,
            f"{CONFIG_FILE} names no base model (base_model_name_or_path); it must be one "
            f"of {', '.join(sorted(accepted))}",
        )
    if norm_model(base) not in accepted:
        raise Reject(
            Reason.BASE_MODEL_MISMATCH,
            f"adapter was trained for base model {ascii(base)[:120]}, not for "
            f"{', '.join(sorted(accepted))}",
            hint=lambda context: (
                f"add it with {spell('base_model_aliases', context)} if it is "
                "the same model under another name"
            ),
        )
