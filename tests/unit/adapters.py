"""Synthetic, format-exact LoRA adapter folders, written in milliseconds without torch or peft.

`write_adapter()` writes what `peft`'s `save_pretrained` writes for a Llama with LoRA on the
attention projections: an `adapter_config.json` with PEFT's keys (peft 0.21) and an
`adapter_model.safetensors` written by the `safetensors` package itself, holding
`base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight` [r, hidden] and
`lora_B.weight` [hidden, r]. Every part is a parameter, so a test breaks exactly one thing.

The byte-level helpers (`safetensors_bytes`, `raw_safetensors`, `torch_zip_bytes`) build the
files that no well-behaved writer produces: truncated, overlapping, lying headers.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save, save_file

BASE_MODEL = "tiny-llama"
HIDDEN = 64
LAYERS = 2
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
PT = "adapter_model.pt"

_DROP = object()  # a `config` override value that removes the key


def drop() -> Any:
    """Use as a value in `config=` to remove that key from adapter_config.json."""
    return _DROP


def peft_config(
    *,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Iterable[str] = TARGETS,
    base_model: str = BASE_MODEL,
    **overrides: Any,
) -> dict[str, Any]:
    """adapter_config.json as peft 0.21 writes it for a causal LM; `overrides` replace keys."""
    config: dict[str, Any] = {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(target_modules),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
    }
    return _apply(config, overrides)


def _apply(config: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def lora_tensors(
    *,
    r: int = 8,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
    targets: Iterable[str] = TARGETS,
    dtype: Any = np.float32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The state dict PEFT saves: lora_A [r, hidden] and lora_B [hidden, r] per target."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for i in range(layers):
        for target in targets:
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden)).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, r)).astype(dtype)
    return tensors


def write_adapter(
    folder: Path,
    *,
    r: int = 8,
    tensor_rank: int | None = None,
    lora_alpha: int = 16,
    base_model: str = BASE_MODEL,
    config: Mapping[str, Any] | None = None,
    config_text: str | bytes | None = None,
    tensors: Mapping[str, np.ndarray] | None = None,
    weights: str | None = SAFETENSORS,
    weights_bytes: bytes | None = None,
    seed: int = 0,
) -> Path:
    """Write one adapter folder (created if needed) and return it.

    - `r`, `lora_alpha`, `base_model`: the usual knobs; `config` replaces further keys
      (`drop()` removes one); `config_text` replaces the whole file's text.
    - `tensor_rank`: the rank of the tensors written (defaults to `r`): a mismatch is a bug.
    - `tensors`: the exact state dict instead of the generated one.
    - `weights`: the weights file's name, or None for no weights file at all.
    - `weights_bytes`: raw content for the weights file instead of a safetensors file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config_text is not None:
        raw = config_text.encode() if isinstance(config_text, str) else config_text
        (folder / CONFIG).write_bytes(raw)
    else:
        doc = _apply(peft_config(r=r, lora_alpha=lora_alpha, base_model=base_model), config or {})
        (folder / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if weights is not None:
        target = folder / weights
        if weights_bytes is not None:
            target.write_bytes(weights_bytes)
        else:
            state = tensors if tensors is not None else lora_tensors(r=tensor_rank or r, seed=seed)
            save_file(dict(state), str(target), metadata={"format": "pt"})
    return folder


def safetensors_bytes(tensors: Mapping[str, np.ndarray] | None = None) -> bytes:
    """A complete safetensors file's bytes, written by the safetensors package."""
    state = tensors if tensors is not None else lora_tensors()
    return bytes(save(dict(state), metadata={"format": "pt"}))


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, tensor data) of a safetensors file."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def raw_safetensors(
    header: Mapping[str, Any] | bytes, data: bytes = b"", *, header_len: int | None = None
) -> bytes:
    """A safetensors file from a header (object or raw bytes) and data; `header_len` may lie."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length) + raw + data


def torch_zip_bytes(*, with_pickle: bool = True) -> bytes:
    """The container `torch.save` writes (a zip with `archive/data.pkl`); the pickle inside is a
    harmless stub, because inspection must never unpickle anything."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        if with_pickle:
            zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/version", b"3\n")
        zf.writestr("archive/data/0", b"\x00" * 64)
    return buffer.getvalue()
