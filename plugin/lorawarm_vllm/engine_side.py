"""The worker-side half of the endpoint: what vLLM's LoRA manager decides with, read in the worker.

vLLM decides which adapter modules it accepts in the worker process, where the model lives:
`LoRAModelManager.supported_lora_modules` (every linear/MoE child's last name plus the class's
`embedding_modules`, `lora/utils.py get_supported_lora_modules`) expanded through its
`packed_modules_mapping` exactly as `WorkerLoRAManager._load_adapter` expands them, and
`LoRAModel.from_local_checkpoint` refuses any other module name. The API server, where the
endpoint's route runs, has only the model class and its config, and a class's linear children
exist only once it is built. So `install()` (called by the `vllm.general_plugins` entry
`lorawarm_vllm:register`, which vLLM runs in every process) adds one method, `RPC_METHOD`, to
vLLM's `WorkerWrapperBase`; the endpoint calls it once through `engine_client.collective_rpc`,
which is the pairing `vllm/plugins/endpoint_plugins/interface.py` prescribes for engine-side
behaviour. The method only reads; it returns plain lists and ints (they cross vLLM's msgpack
IPC).

Shapes are read from the built layers as a LoRA sees them: `in_features` is what lora_A takes,
`out_features` what lora_B gives; a packed layer (`qkv_proj`) is split into the names adapters
use (`q_proj`, `k_proj`, `v_proj`) by its `output_sizes`; `embed_tokens` is (vocab, hidden) and
`lm_head` (hidden, vocab), as PEFT's tensors are. A name whose layers differ between blocks gets
no shape (not known, so not checked). Nothing here imports vLLM or torch: the layers are read by
their attributes.
"""

from __future__ import annotations

import importlib
from typing import Any

RPC_METHOD = "lorawarm_model_facts"
WORKER_WRAPPER_MODULE = "vllm.v1.worker.worker_base"


def install() -> None:
    """Add `RPC_METHOD` to vLLM's worker wrapper class; idempotent, raises ImportError or
    AttributeError when this vLLM has no `WorkerWrapperBase` (the caller logs and goes on)."""
    wrapper = importlib.import_module(WORKER_WRAPPER_MODULE).WorkerWrapperBase
    if getattr(wrapper, RPC_METHOD, None) is not _rpc:
        setattr(wrapper, RPC_METHOD, _rpc)


def _rpc(wrapper: Any) -> dict[str, Any] | None:
    """What `collective_rpc(RPC_METHOD)` runs in each worker: `model_facts` of its model, or
    None when LoRA is not enabled (no LoRA manager on the model)."""
    model = wrapper.worker.model_runner.get_model()
    manager = getattr(model, "lora_manager", None)
    if manager is None:
        return None
    return model_facts(model, manager)


def model_facts(model: Any, manager: Any) -> dict[str, Any]:
    """`{"lora_modules": [...], "module_shapes": {name: [in, out]}}` for a model wrapped by
    vLLM's `LoRAModelManager` `manager`."""
    supported: list[str] = list(manager.supported_lora_modules)
    packed: dict[str, list[str]] = dict(manager.packed_modules_mapping)
    return {
        "lora_modules": sorted(expected_modules(supported, packed)),
        "module_shapes": {
            name: list(shape) for name, shape in sorted(module_shapes(model, supported, packed))
        },
    }


def expected_modules(supported: list[str], packed: dict[str, list[str]]) -> set[str]:
    """vLLM's `expected_lora_modules`, computed as `WorkerLoRAManager._load_adapter` does."""
    expected: list[str] = []
    for module in supported:
        if module in packed:
            expected.extend(packed[module])
        else:
            expected.append(module)
        if module == "experts":
            expected.append(module)
    return set(expected)


def module_shapes(
    model: Any, supported: list[str], packed: dict[str, list[str]]
) -> list[tuple[str, tuple[int, int]]]:
    """(adapter module name, (in, out)) for every name whose layers all agree."""
    directions: dict[str, str] = dict(getattr(model, "embedding_modules", None) or {})
    seen: dict[str, set[tuple[int, int]]] = {}
    # remove_duplicate=False: a tied lm_head is the embedding's module under a second name.
    for path, module in model.named_modules(remove_duplicate=False):
        suffix = path.rsplit(".", 1)[-1]
        if suffix not in supported or suffix == "base_layer":
            continue
        layer = getattr(module, "base_layer", module)
        for name, shape in _layer_shapes(suffix, layer, packed.get(suffix), directions):
            seen.setdefault(name, set()).add(shape)
    return [(name, next(iter(shapes))) for name, shapes in seen.items() if len(shapes) == 1]


def _layer_shapes(
    suffix: str, layer: Any, unpacked: list[str] | None, directions: dict[str, str]
) -> list[tuple[str, tuple[int, int]]]:
    """The (name, (in, out)) pairs one built layer stands for; [] for a kind not understood
    (an MoE runner, a layer without dimensions): its modules then have no known shape."""
    hidden, vocab = _int(layer, "embedding_dim"), _int(layer, "org_vocab_size")
    if hidden is not None and vocab is not None:
        is_input = directions.get(suffix, "") == "input_embeddings" or (
            suffix not in directions and suffix != "lm_head"
        )
        return [(suffix, (vocab, hidden) if is_input else (hidden, vocab))]
    in_features, out_features = _int(layer, "input_size"), _int(layer, "output_size")
    if in_features is None or out_features is None:
        return []
    if unpacked:
        sizes = _output_sizes(layer)
        if sizes is None or len(sizes) != len(unpacked):
            return []
        return [(name, (in_features, size)) for name, size in zip(unpacked, sizes, strict=True)]
    return [(suffix, (in_features, out_features))]


def _output_sizes(layer: Any) -> list[int] | None:
    """The unsharded output size of each part of a packed layer.

    A QKV layer's `output_sizes` count key/value heads per tensor-parallel rank times the rank
    count, which overcounts when heads are replicated (more ranks than kv heads); its
    `total_num_*` attributes are the model's own numbers.
    """
    heads, kv_heads = _int(layer, "total_num_heads"), _int(layer, "total_num_kv_heads")
    head_size = _int(layer, "head_size")
    if heads is not None and kv_heads is not None and head_size is not None:
        v_head_size = _int(layer, "v_head_size") or head_size
        return [heads * head_size, kv_heads * head_size, kv_heads * v_head_size]
    sizes = getattr(layer, "output_sizes", None)
    if isinstance(sizes, list | tuple) and all(
        isinstance(s, int) and not isinstance(s, bool) for s in sizes
    ):
        return [int(s) for s in sizes]
    return None


def _int(layer: Any, attribute: str) -> int | None:
    """An integer attribute of a layer, or None (absent, or not an int)."""
    value = getattr(layer, attribute, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
