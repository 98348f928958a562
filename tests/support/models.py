"""Generators for tiny random models (Llama, Mistral, Qwen2) and real PEFT LoRA adapters for them.

Nothing here downloads anything: the tokenizer is trained on a few sentences in well under a
second, the model has random weights (fixed seed), and adapters come from ``peft`` itself, so
vLLM reads them exactly like adapters from the wild.

Heavy imports (torch, transformers, peft, tokenizers) happen inside the functions, so importing
this module is cheap and works without the ``e2e`` extras installed.

CLI for demos::

    python -m tests.support.models MODEL_DIR ADAPTER_DIR [--count N]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Files whose presence marks a complete model folder written by :func:`make_tiny_model`.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
#: Files whose presence marks a complete adapter folder written by :func:`make_adapter`.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Every linear layer of a Llama block (what PEFT's "all-linear" picks, lm_head aside).
ALL_LINEAR_MODULES: tuple[str, ...] = (
    *DEFAULT_TARGET_MODULES,
    "gate_proj",
    "up_proj",
    "down_proj",
)

#: The tiny model's shape (``transformers.LlamaConfig`` arguments).
TINY_DIMS: Mapping[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
#: A larger model (~63 M parameters, 250 MB in float32) for benchmarks: a rank-64 adapter on
#: :data:`ALL_LINEAR_MODULES` of it is ~54 MB, big enough for its load to matter.
LARGE_DIMS: Mapping[str, int] = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}

_MODEL_SEED = 1234
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny language model used only for tests.",
    "LoRA adapters are small low-rank weight updates loaded at runtime.",
    "vLLM serves many adapters on one base model at the same time.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ,.;:!?()[]{}<>-_=+*/'\"",
    "Once upon a time there was a daemon that warmed adapters before requests came.",
)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the deprecation/user warnings the ML libraries emit (pytest turns them to errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging = _lib("transformers.utils.logging")
        logging.disable_progress_bar()
        logging.set_verbosity_error()
        yield


def _lib(name: str) -> Any:
    """Import a generation library untyped: their signatures change between releases."""
    return importlib.import_module(name)


def _is_complete(folder: Path, files: Sequence[str]) -> bool:
    return all((folder / name).is_file() for name in files)


def make_tiny_model(dest: Path) -> Path:
    """Write the tiny random Llama (:data:`TINY_DIMS`) to ``dest``; see :func:`make_model`."""
    return make_model(dest, TINY_DIMS)


def make_large_model(dest: Path) -> Path:
    """Write the larger random Llama (:data:`LARGE_DIMS`) to ``dest``; see :func:`make_model`."""
    return make_model(dest, LARGE_DIMS)


#: Architectures :func:`make_model` can write: name -> (config class, model class) in transformers.
ARCHITECTURES: Mapping[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def make_model(dest: Path, dims: Mapping[str, int], *, architecture: str = "llama") -> Path:
    """Write a random model of ``architecture`` (a key of :data:`ARCHITECTURES`) and shape
    ``dims`` with its own byte-level BPE tokenizer to ``dest``.

    Returns ``dest``.

    Deterministic for a given library version. Idempotent: a folder that already holds a complete
    model is returned untouched. The model is written to a temporary sibling folder and renamed,
    so a crash never leaves a half-written model that would look complete.
    """
    dest = Path(dest).resolve()
    if _is_complete(dest, MODEL_FILES):
        return dest
    with _quiet():
        torch = _lib("torch")
        tok = _lib("tokenizers")
        transformers = _lib("transformers")
        models, pre_tokenizers = tok.models, tok.pre_tokenizers

        bpe = tok.Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = tok.decoders.ByteLevel()
        trainer = tok.trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=list(_SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(list(_CORPUS), trainer=trainer)
        bpe.post_processor = tok.processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
        )
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            model_max_length=512,
        )

        config_cls, model_cls = ARCHITECTURES[architecture]
        config = getattr(transformers, config_cls)(
            **dims,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng():
            torch.manual_seed(_MODEL_SEED)
            model = getattr(transformers, model_cls)(config)
            # The default init (std 0.02) gives near-uniform logits; larger weights make greedy
            # outputs and LoRA effects clearly visible.
            with torch.no_grad():
                for param in model.parameters():
                    if param.dim() > 1:
                        param.normal_(mean=0.0, std=0.2)

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            tmp.chmod(0o755)
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            if dest.exists() and not _is_complete(dest, MODEL_FILES):
                shutil.rmtree(dest)
            try:
                tmp.rename(dest)
            except OSError:
                # Another process finished the same model first: keep its copy.
                if not _is_complete(dest, MODEL_FILES):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


@functools.lru_cache(maxsize=4)
def _load_base(base_model: str) -> Any:
    """Load the base model once per process; adapters are made from fresh PEFT wrappers of it."""
    with _quiet():
        return _lib("transformers").AutoModelForCausalLM.from_pretrained(base_model)


def make_adapter(
    base_model: Path,
    dest: Path,
    *,
    r: int = 8,
    seed: int = 0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    base_model_name_or_path: str | None = None,
    **lora_kwargs: Any,
) -> Path:
    """Write a real PEFT LoRA adapter for ``base_model`` to ``dest``; return ``dest``.

    ``seed`` controls the random LoRA weights (``init_lora_weights=False``), so two seeds give
    different completions. ``base_model_name_or_path`` in adapter_config.json defaults to
    ``str(base_model)``; pass another value to rewrite it. Extra keyword arguments go to
    ``LoraConfig`` (e.g. ``lora_alpha``, ``bias``, ``use_dora``). ``dest`` is overwritten.
    """
    base_model = Path(base_model).resolve()
    dest = Path(dest).resolve()
    with _quiet():
        torch = _lib("torch")
        peft = _lib("peft")
        # A private copy: get_peft_model injects LoRA layers into the model it is given.
        base = copy.deepcopy(_load_base(str(base_model)))
        options: dict[str, Any] = {"lora_alpha": 16, "init_lora_weights": False}
        options.update(lora_kwargs)
        config = peft.LoraConfig(r=r, target_modules=list(target_modules), **options)
        with torch.random.fork_rng():  # leave the caller's global RNG state alone
            torch.manual_seed(seed)
            peft_model = peft.get_peft_model(base, config)
        dest.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(dest), safe_serialization=True)

    config_path = dest / "adapter_config.json"
    data = json.loads(config_path.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])  # PEFT writes set order
    data["base_model_name_or_path"] = (
        str(base_model) if base_model_name_or_path is None else base_model_name_or_path
    )
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """Write a tiny model and ``--count`` adapters (adapter-0, adapter-1, ...) with seeds 0..N-1."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.models", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    model = make_tiny_model(args.model_dir)
    print(f"model: {model}")
    for i in range(args.count):
        adapter = make_adapter(model, args.adapter_dir / f"adapter-{i}", r=args.rank, seed=i)
        print(f"adapter: {adapter}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
