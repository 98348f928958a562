"""Inspection of real adapters written by `peft` for a tiny random Llama (slow: ~15 s once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorawarm.cli import main
from lorawarm.inspection import Invalid, Reason, Rules, Valid, inspect_adapter
from lorawarm.snapshot import SnapshotStore


@pytest.fixture(scope="session")
def peft_root(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model dir, drop dir) with real PEFT adapters `r8` and `r32` in the drop dir."""
    from tests.support.models import make_adapter

    model = tiny_model
    root = tmp_path_factory.mktemp("peft-adapters")
    make_adapter(model, root / "r8", r=8, seed=0)
    make_adapter(model, root / "r32", r=32, seed=1)
    return model, root


def test_real_peft_adapter_is_valid(peft_root: tuple[Path, Path]) -> None:
    """An adapter saved by peft's save_pretrained is Valid, with its rank and base model."""
    model, root = peft_root
    result = inspect_adapter(root / "r8", root=root, rules=Rules(base_model=str(model)))
    assert isinstance(result, Valid), result
    assert (result.name, result.rank, result.weights) == ("r8", 8, "adapter_model.safetensors")
    assert result.base_model == str(model)


def test_real_peft_adapter_validates_on_the_command_line(
    peft_root: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`lorawarm validate --base-model` exits 0 on a real PEFT adapter."""
    model, root = peft_root
    assert main(["validate", "--base-model", str(model), str(root / "r8")]) == 0
    assert capsys.readouterr().out.strip().endswith("valid (rank 8, adapter_model.safetensors)")


def test_real_peft_adapter_above_max_rank(
    peft_root: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A real r=32 adapter is rank_too_large under a max rank of 16, valid when raised, and
    not judged by rank at all when no limit is given (the limit is each server's)."""
    model, root = peft_root
    rules = Rules(base_model=str(model), max_lora_rank=16)
    result = inspect_adapter(root / "r32", root=root, rules=rules)
    assert isinstance(result, Invalid)
    assert result.reason == Reason.RANK_TOO_LARGE
    assert main(["validate", "--max-lora-rank", "16", str(root / "r32")]) == 1
    assert main(["validate", "--max-lora-rank", "32", str(root / "r32")]) == 0
    assert main(["validate", str(root / "r32")]) == 0
    capsys.readouterr()


def test_real_peft_adapter_snapshot(peft_root: tuple[Path, Path], tmp_path: Path) -> None:
    """A real adapter's snapshot holds byte-identical files that pass inspection again."""
    model, root = peft_root
    rules = Rules(base_model=str(model))
    adapter = inspect_adapter(root / "r8", root=root, rules=rules)
    assert isinstance(adapter, Valid)
    snap = SnapshotStore(tmp_path / "state").create(adapter, rules)
    for f in adapter.files:
        assert (snap.path / f.name).read_bytes() == (root / "r8" / f.name).read_bytes()


def test_lora_shape_of_real_peft_adapters(tiny_model: Path, tmp_path: Path) -> None:
    """`Valid.lora_shape` names each module as vLLM parses PEFT's tensor names, with the
    dimensions of the tiny Llama (hidden 256, MLP 512, vocabulary 512), its 2 layer indices
    and the config's target_modules; lm_head and embed_tokens are told apart by their tensors."""
    from tests.support.models import make_adapter

    targets = ["down_proj", "embed_tokens", "lm_head", "q_proj", "up_proj"]
    folder = make_adapter(tiny_model, tmp_path / "a", r=4, target_modules=targets)
    result = inspect_adapter(folder, root=tmp_path, rules=Rules())
    assert isinstance(result, Valid), result
    shape = result.lora_shape
    assert shape is not None
    dims = {m.name: (m.in_features, m.out_features, m.rank, m.embedding) for m in shape.modules}
    vocab = dims["embed_tokens"][0]
    assert dims == {
        "q_proj": (256, 256, 4, False),
        "up_proj": (256, 512, 4, False),
        "down_proj": (512, 256, 4, False),
        "lm_head": (256, vocab, 4, False),
        "embed_tokens": (vocab, 256, 4, True),
    }
    assert shape.layers == (0, 1)
    assert shape.target_modules == tuple(targets)
    embed = next(m for m in shape.modules if m.name == "embed_tokens")
    assert embed.a_tensor == "base_model.model.model.embed_tokens.lora_embedding_A"
