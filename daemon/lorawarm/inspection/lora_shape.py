"""What an adapter's LoRA weights touch, as vLLM will read them: the facts `lorawarm.fit` judges
against each server's model.

Taken from the safetensors header inspection parses anyway (no extra read). vLLM names a LoRA
module by its tensor names (`lora/utils.py` `parse_fine_tuned_lora_name`, `lora/lora_model.py`):

- `<path>.lora_A.weight` / `<path>.lora_B.weight` are a linear module's matrices, A [rank, in]
  and B [out, rank];
- `<path>.lora_embedding_A` / `<path>.lora_embedding_B` an embedding's, A [rank, vocab] and
  B [hidden, rank] (so here too `in` is A's second axis and `out` B's first);
- the module is `<path>` without PEFT's `base_model.model.` prefix, and vLLM checks its last
  component (`q_proj`, `lm_head`, `embed_tokens`) against the modules the served model class
  takes LoRA on; that component is the `name` here;
- `...embed_tokens.base_layer.weight` / `...lm_head.base_layer.weight` (a base embedding saved
  alongside) are skipped by vLLM, and so are tensors that are no LoRA matrix here: they are
  left out (a tensor named almost like a LoRA matrix is refused by `weights`, since vLLM
  refuses it whatever the server).

A module's dimensions are recorded once per distinct (name, in, out): a well-formed adapter has
one entry per module name, whatever its layer count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# vLLM's only LoRA tensor forms: suffix -> (is A, is an embedding).
LORA_SUFFIXES = {
    ".lora_A.weight": (True, False),
    ".lora_B.weight": (False, False),
    ".lora_embedding_A": (True, True),
    ".lora_embedding_B": (False, True),
}
_LAYER = re.compile(r"\.(\d+)\.")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ModuleDims:
    """One module of the adapter with the dimensions its LoRA matrices imply.

    `in_features` comes from A's second axis, `out_features` from B's first (None when that
    matrix is missing); `path` is the tensor prefix of the first layer seen with these
    dimensions (`base_model.model.model.layers.0.self_attn.q_proj`), for messages.
    """

    name: str
    in_features: int | None
    out_features: int | None
    rank: int
    path: str
    embedding: bool

    @property
    def a_tensor(self) -> str:
        return self.path + (".lora_embedding_A" if self.embedding else ".lora_A.weight")

    @property
    def b_tensor(self) -> str:
        return self.path + (".lora_embedding_B" if self.embedding else ".lora_B.weight")


@dataclass(frozen=True)
class LoraShape:
    """What an adapter touches: its modules with their dimensions, the layer indices its tensors
    name, and what its config declares (`target_modules`, a list or a regex string, and
    `modules_to_save`). Frozen and hashable; empty `layers` means no layer index was seen
    (an adapter of `lm_head` alone)."""

    modules: tuple[ModuleDims, ...]
    layers: tuple[int, ...]
    target_modules: tuple[str, ...] | str
    modules_to_save: tuple[str, ...] = ()

    @property
    def names(self) -> frozenset[str]:
        """The module names vLLM compares with the model's LoRA modules."""
        return frozenset(m.name for m in self.modules)


class ShapeReader:
    """Collects a `LoraShape` from tensor names and shapes, one `add` per LoRA tensor.

    Kept to a dict lookup and a list store per tensor: it runs inside the header loop of
    `weights.check_safetensors`, the hot path of inspecting a large adapter (which finds the
    suffix and hands over the path without it).
    """

    __slots__ = ("_paths",)

    def __init__(self) -> None:
        # tensor prefix -> [in, out, rank, embedding]
        self._paths: dict[str, list[int | None]] = {}

    def add(self, path: str, is_a: bool, embedding: bool, shape: list[int]) -> None:
        """Record one 2-D LoRA matrix of the module at `path` (the tensor name less its
        suffix, one of `LORA_SUFFIXES`)."""
        module = self._paths.get(path)
        if module is None:
            module = self._paths[path] = [None, None, 0, int(embedding)]
        if is_a:
            module[2], module[0] = shape
        else:
            module[1], module[2] = shape

    def unpaired(self) -> str | None:
        """A tensor whose partner matrix is missing (vLLM needs both A and B), or None."""
        for path, (fin, fout, rank, embedding) in self._paths.items():
            if fin is None or fout is None:
                dims = ModuleDims(path, fin, fout, rank or 0, path, bool(embedding))
                return dims.b_tensor if fin is None else dims.a_tensor
        return None

    def shape(self, config: dict[str, object]) -> LoraShape:
        """The collected shape, with the declarations of `config` (adapter_config.json)."""
        seen: dict[tuple[str, int | None, int | None], ModuleDims] = {}
        indices: set[str] = set()
        for path, (fin, fout, rank, embedding) in self._paths.items():
            key = (path[path.rfind(".") + 1 :], fin, fout)
            if key not in seen:
                seen[key] = ModuleDims(key[0], fin, fout, rank or 0, path, bool(embedding))
            at = path.find(".layers.")  # Llama, Mistral, Qwen2 and most others: one find
            if at >= 0:
                end = path.find(".", at + 8)
                indices.add(path[at + 8 : end if end >= 0 else None])
            else:
                layer = _LAYER.search(path)  # the first numeric part (`h.3`, `blocks.3`)
                if layer is not None:
                    indices.add(layer[1])
        layers = {int(i) for i in indices if i.isdigit()}
        targets = config.get("target_modules")
        saved = config.get("modules_to_save") or ()
        return LoraShape(
            modules=tuple(sorted(seen.values(), key=lambda m: (m.name, m.path))),
            layers=tuple(sorted(layers)),
            target_modules=(
                targets
                if isinstance(targets, str)
                else tuple(str(t) for t in targets)
                if isinstance(targets, list)
                else ()
            ),
            modules_to_save=(
                (saved,)
                if isinstance(saved, str)
                else tuple(str(t) for t in saved)
                if isinstance(saved, list)
                else ()
            ),
        )
