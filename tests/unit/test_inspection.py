"""Inspection: synthetic but format-exact adapters, each broken in exactly one way."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorawarm.inspection import (
    MAX_CONFIG_BYTES,
    MAX_ENTRIES,
    MAX_JSON_DEPTH,
    MAX_SAFETENSORS_HEADER,
    Context,
    FileStat,
    Invalid,
    Reason,
    Result,
    Rules,
    Valid,
    inspect_adapter,
)
from lorawarm.inspection.containment import realpath_below
from tests.unit.adapters import (
    BASE_MODEL,
    BIN,
    CONFIG,
    PT,
    SAFETENSORS,
    drop,
    lora_tensors,
    raw_safetensors,
    safetensors_bytes,
    split_safetensors,
    torch_zip_bytes,
    write_adapter,
)

RULES = Rules(max_lora_rank=16, base_model=BASE_MODEL)
# What `.bin`/`.pt` weights are checked against when pickles are allowed (safetensors_only off).
PICKLES = Rules(max_lora_rank=16, base_model=BASE_MODEL, safetensors_only=False)

# A small, complete safetensors file (one layer, one target) to cut and bend.
SMALL = lora_tensors(r=8, hidden=8, layers=1, targets=("q_proj",))
GOOD = safetensors_bytes(SMALL)
HEADER, DATA = split_safetensors(GOOD)
A_NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def inspect(
    folder: Path,
    root: Path,
    rules: Rules = RULES,
    *,
    name: str | None = None,
    context: Context = Context.WATCHED,
) -> Valid | Invalid:
    return inspect_adapter(folder, root=root, rules=rules, name=name, context=context)


# --------------------------------------------------------------------------------------------
# The table of broken folders. A builder gets the cache root (its parent is free scratch space)
# and returns the folder to inspect, or (folder, name) when the name is the point.

Built = Path | tuple[Path, str]


@dataclass(frozen=True)
class Case:
    id: str
    reason: Reason
    build: Callable[[Path], Built]
    rules: Rules = field(default=RULES)


def adapter(name: str = "x", **kwargs: object) -> Callable[[Path], Built]:
    return lambda root: write_adapter(root / name, **kwargs)  # type: ignore[arg-type]  # table rows mix types


def named(name: str) -> Callable[[Path], Built]:
    return lambda root: (write_adapter(root / "x"), name)


def cfg(**overrides: object) -> Callable[[Path], Built]:
    return adapter(config=overrides)


def weights(data: bytes, name: str = SAFETENSORS) -> Callable[[Path], Built]:
    return adapter(weights=name, weights_bytes=data)


def header_with(**tensors: object) -> bytes:
    """A safetensors file whose header describes `tensors` (name -> info) over DATA's bytes."""
    return raw_safetensors(dict(tensors), DATA)


def folder_symlink_out(root: Path) -> Built:
    outside = write_adapter(root.parent / "outside" / "x")
    (root / "x").symlink_to(outside, target_is_directory=True)
    return root / "x"


def org_symlink_out(root: Path) -> Built:
    write_adapter(root.parent / "outside" / "x")
    (root / "org").symlink_to(root.parent / "outside", target_is_directory=True)
    return root / "org" / "x"


def outside_root(root: Path) -> Built:
    return write_adapter(root.parent / "elsewhere" / "x")


def root_itself(root: Path) -> Built:
    write_adapter(root)  # even a root that looks like an adapter is not one
    (root / "x").symlink_to(".", target_is_directory=True)
    return root / "x"


def file_symlink_out(root: Path) -> Built:
    folder = write_adapter(root / "x", weights=None)
    stolen = write_adapter(root.parent / "outside") / SAFETENSORS
    (folder / SAFETENSORS).symlink_to(stolen)
    return folder


def dangling_symlink(root: Path) -> Built:
    folder = write_adapter(root / "x")
    (folder / "README.md").symlink_to(folder / "gone.md")
    return folder


def symlink_loop(root: Path) -> Built:
    folder = write_adapter(root / "x", config_text="{}")
    (folder / CONFIG).unlink()
    (folder / CONFIG).symlink_to(CONFIG)
    return folder


def fifo_inside(root: Path) -> Built:
    folder = write_adapter(root / "x")
    os.mkfifo(folder / "pipe")
    return folder


def fifo_config(root: Path) -> Built:
    folder = write_adapter(root / "x")
    (folder / CONFIG).unlink()
    os.mkfifo(folder / CONFIG)  # opening it would block forever: it must never be opened
    return folder


def socket_inside(root: Path) -> Built:
    folder = write_adapter(root / "x")
    # AF_UNIX paths are limited to ~108 bytes: bind relative to the folder.
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind("sock")
    finally:
        os.chdir(cwd)
    return folder


def config_is_directory(root: Path) -> Built:
    folder = write_adapter(root / "x")
    (folder / CONFIG).unlink()
    (folder / CONFIG).mkdir()
    return folder


def weights_is_directory(root: Path) -> Built:
    folder = write_adapter(root / "x", weights=None)
    (folder / SAFETENSORS).mkdir()  # vLLM checks weights with os.path.isfile
    return folder


def too_many_files(root: Path) -> Built:
    folder = write_adapter(root / "x")
    for i in range(MAX_ENTRIES):
        (folder / f"f{i}").touch()
    return folder


def file_not_folder(root: Path) -> Built:
    (root / "x").write_text("not a folder")
    return root / "x"


def missing_config(root: Path) -> Built:
    folder = write_adapter(root / "x")
    (folder / CONFIG).unlink()
    return folder


def big_config(root: Path) -> Built:
    text = json.dumps({"peft_type": "LORA", "pad": "x" * MAX_CONFIG_BYTES})
    return write_adapter(root / "x", config_text=text)


def nested_config(root: Path) -> Built:
    depth = MAX_JSON_DEPTH + 8
    return write_adapter(root / "x", config_text='{"a": ' + "[" * depth + "]" * depth + "}")


def truncated_safetensors(root: Path) -> Built:
    folder = write_adapter(root / "x")
    data = (folder / SAFETENSORS).read_bytes()
    (folder / SAFETENSORS).write_bytes(data[: len(data) - 100])
    return folder


def rank_mismatch_b(root: Path) -> Built:
    tensors = {
        A_NAME: np.zeros((8, 64), np.float32),
        B_NAME: np.zeros((64, 4), np.float32),
    }
    return write_adapter(root / "x", tensors=tensors)


def lora_vector(root: Path) -> Built:
    return write_adapter(root / "x", tensors={A_NAME: np.zeros(8, np.float32)})


def lora_a_alone(root: Path) -> Built:
    return write_adapter(root / "x", tensors={A_NAME: np.zeros((8, 64), np.float32)})


def lora_unsaved_name(root: Path) -> Built:
    """PEFT's in-memory names (`lora_A.default.weight`), which vLLM cannot parse."""
    tensors = {
        A_NAME.replace(".weight", ".default.weight"): np.zeros((8, 64), np.float32),
        B_NAME.replace(".weight", ".default.weight"): np.zeros((64, 8), np.float32),
    }
    return write_adapter(root / "x", tensors=tensors)


def not_lora(root: Path) -> Built:
    tensors = {"model.layers.0.self_attn.q_proj.weight": np.zeros((8, 8), np.float32)}
    return write_adapter(root / "x", tensors=tensors)


def broken_bin_zip(root: Path) -> Built:
    data = torch_zip_bytes()
    return write_adapter(root / "x", weights=BIN, weights_bytes=data[: len(data) - 40])


def safetensors_wins_even_broken(root: Path) -> Built:
    folder = write_adapter(root / "x", weights=BIN, weights_bytes=torch_zip_bytes())
    (folder / SAFETENSORS).write_bytes(GOOD[:-1])  # vLLM reads this one, so it must be whole
    return folder


def header_over_cap(root: Path) -> Built:
    """A header one byte over the cap, in a sparse file large enough to hold it."""
    folder = write_adapter(root / "x", weights_bytes=struct.pack("<Q", MAX_SAFETENSORS_HEADER + 1))
    os.truncate(folder / SAFETENSORS, 8 + MAX_SAFETENSORS_HEADER + 1 + 64)
    return folder


def empty_folder(root: Path) -> Built:
    (root / "x").mkdir()
    return root / "x"


def directory_of_adapters(root: Path) -> Built:
    write_adapter(root / "org" / "a")
    write_adapter(root / "org" / "b")
    return root / "org"


SPAN = {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]}

CASES = [
    # ---- names
    Case("name-dotdot", Reason.INVALID_NAME, named("../x")),
    Case("name-absolute", Reason.INVALID_NAME, named("/etc/x")),
    Case("name-empty", Reason.INVALID_NAME, named("")),
    Case("name-three-levels", Reason.INVALID_NAME, adapter("a/b/c")),
    Case("name-leading-dot", Reason.INVALID_NAME, adapter(".x.tmp")),
    Case("name-org-leading-dot", Reason.INVALID_NAME, adapter(".org/x")),
    Case("name-unicode-lookalike", Reason.INVALID_NAME, adapter("lor\u0430")),  # Cyrillic a
    Case("name-space", Reason.INVALID_NAME, adapter("my adapter")),
    Case("name-component-too-long", Reason.NAME_TOO_LONG, adapter("a" * 97)),
    Case("name-too-long", Reason.NAME_TOO_LONG, adapter("a" * 90 + "/" + "b" * 90)),
    Case(
        "name-is-served-model",
        Reason.NAME_IS_BASE_MODEL,
        adapter("served"),
        Rules(served_model_names=("served",)),
    ),
    Case("name-is-base-model", Reason.NAME_IS_BASE_MODEL, adapter(BASE_MODEL)),
    # ---- containment
    Case("folder-symlink-out", Reason.SYMLINK_ESCAPE, folder_symlink_out),
    Case("org-symlink-out", Reason.SYMLINK_ESCAPE, org_symlink_out),
    Case("folder-outside-root", Reason.OUTSIDE_ROOT, outside_root),
    Case("folder-is-the-root", Reason.SYMLINK_ESCAPE, root_itself),
    Case("file-symlink-out", Reason.SYMLINK_ESCAPE, file_symlink_out),
    Case("dangling-symlink", Reason.NOT_REGULAR_FILE, dangling_symlink),
    Case("symlink-loop", Reason.UNREADABLE, symlink_loop),
    Case("fifo-inside", Reason.NOT_REGULAR_FILE, fifo_inside),
    Case("fifo-config", Reason.NOT_REGULAR_FILE, fifo_config),
    Case("socket-inside", Reason.NOT_REGULAR_FILE, socket_inside),
    Case("config-is-directory", Reason.NOT_REGULAR_FILE, config_is_directory),
    Case("too-many-files", Reason.TOO_MANY_FILES, too_many_files),
    Case("folder-is-a-file", Reason.NOT_A_DIRECTORY, file_not_folder),
    Case("folder-missing", Reason.NOT_A_DIRECTORY, lambda root: root / "x"),
    # ---- adapter_config.json
    Case("config-missing", Reason.MISSING_CONFIG, missing_config),
    Case("config-too-large", Reason.CONFIG_TOO_LARGE, big_config),
    Case("config-not-json", Reason.CONFIG_NOT_JSON, adapter(config_text="{'r': 8}")),
    Case("config-half-copied", Reason.CONFIG_NOT_JSON, adapter(config_text='{"r": 8, "lora_')),
    Case("config-not-utf8", Reason.CONFIG_NOT_JSON, adapter(config_text=b'{"r": "\xff"}')),
    Case("config-deeply-nested", Reason.CONFIG_NOT_JSON, nested_config),
    Case("config-not-object", Reason.CONFIG_NOT_OBJECT, adapter(config_text="[1, 2]")),
    Case("config-string", Reason.CONFIG_NOT_OBJECT, adapter(config_text='"LORA"')),
    Case("peft-type-ia3", Reason.WRONG_PEFT_TYPE, cfg(peft_type="IA3")),
    Case("peft-type-loha", Reason.WRONG_PEFT_TYPE, cfg(peft_type="LOHA")),
    Case("peft-type-number", Reason.WRONG_PEFT_TYPE, cfg(peft_type=1)),
    Case("r-missing", Reason.MISSING_FIELD, cfg(r=drop())),
    Case("r-null", Reason.MISSING_FIELD, cfg(r=None)),
    Case("lora-alpha-missing", Reason.MISSING_FIELD, cfg(lora_alpha=drop())),
    Case("target-modules-missing", Reason.MISSING_FIELD, cfg(target_modules=drop())),
    Case("r-string", Reason.BAD_FIELD, cfg(r="8")),
    Case("r-bool", Reason.BAD_FIELD, cfg(r=True)),
    Case("r-zero", Reason.BAD_FIELD, cfg(r=0)),
    Case("r-negative", Reason.BAD_FIELD, cfg(r=-8)),
    Case("r-float", Reason.BAD_FIELD, cfg(r=8.0)),
    Case("lora-alpha-string", Reason.BAD_FIELD, cfg(lora_alpha="16")),
    Case("lora-alpha-bool", Reason.BAD_FIELD, cfg(lora_alpha=True)),
    Case("lora-alpha-nan", Reason.BAD_FIELD, cfg(lora_alpha=float("nan"))),
    Case("target-modules-empty-list", Reason.BAD_FIELD, cfg(target_modules=[])),
    Case("target-modules-empty-string", Reason.BAD_FIELD, cfg(target_modules="")),
    Case("target-modules-numbers", Reason.BAD_FIELD, cfg(target_modules=[1, 2])),
    Case("target-modules-object", Reason.BAD_FIELD, cfg(target_modules={"q_proj": 1})),
    Case("rank-pattern-list", Reason.BAD_FIELD, cfg(rank_pattern=["q_proj"])),
    Case("rank-pattern-zero", Reason.BAD_FIELD, cfg(rank_pattern={"q_proj": 0})),
    Case("rank-pattern-string", Reason.BAD_FIELD, cfg(rank_pattern={"q_proj": "4"})),
    Case("rank-above-max", Reason.RANK_TOO_LARGE, adapter(r=32)),
    Case("rank-pattern-above-max", Reason.RANK_TOO_LARGE, cfg(rank_pattern={"q_proj": 32})),
    Case("rank-above-flag", Reason.RANK_TOO_LARGE, adapter(r=16), Rules(max_lora_rank=8)),
    Case("bias-all", Reason.BIAS_NOT_SUPPORTED, cfg(bias="all")),
    Case("bias-lora-only", Reason.BIAS_NOT_SUPPORTED, cfg(bias="lora_only")),
    Case("bias-null", Reason.BIAS_NOT_SUPPORTED, cfg(bias=None)),
    Case("use-dora", Reason.DORA_NOT_SUPPORTED, cfg(use_dora=True)),
    Case("lora-bias", Reason.LORA_BIAS_NOT_SUPPORTED, cfg(lora_bias=True)),
    Case("use-qalora", Reason.QALORA_NOT_SUPPORTED, cfg(use_qalora=True)),
    Case("alora", Reason.ALORA_NOT_SUPPORTED, cfg(alora_invocation_tokens=[5, 6])),
    Case(
        "layer-replication", Reason.LAYER_REPLICATION_NOT_SUPPORTED, cfg(layer_replication=[[0, 1]])
    ),
    Case("bdlora", Reason.BDLORA_NOT_SUPPORTED, cfg(use_bdlora={"nblocks": 2})),
    Case("init-pissa", Reason.INIT_NOT_SUPPORTED, cfg(init_lora_weights="pissa")),
    Case("init-loftq", Reason.INIT_NOT_SUPPORTED, cfg(init_lora_weights="loftq")),
    Case(
        "modules-to-save-lm-head",
        Reason.MODULES_TO_SAVE_NOT_SUPPORTED,
        cfg(modules_to_save=["lm_head"]),
    ),
    Case(
        "modules-to-save-string",
        Reason.MODULES_TO_SAVE_NOT_SUPPORTED,
        cfg(modules_to_save="embed_tokens"),
    ),
    Case(
        "modules-to-save-mixed",
        Reason.MODULES_TO_SAVE_NOT_SUPPORTED,
        cfg(modules_to_save=["score", "lm_head"]),
    ),
    Case(
        "modules-to-save-unhashable",
        Reason.MODULES_TO_SAVE_NOT_SUPPORTED,
        cfg(modules_to_save=[["lm_head"]]),
    ),
    Case("modules-to-save-number", Reason.MODULES_TO_SAVE_NOT_SUPPORTED, cfg(modules_to_save=7)),
    Case("base-model-mismatch", Reason.BASE_MODEL_MISMATCH, adapter(base_model="other/model")),
    Case("base-model-missing", Reason.BASE_MODEL_MISMATCH, cfg(base_model_name_or_path=drop())),
    Case("base-model-not-string", Reason.BASE_MODEL_MISMATCH, cfg(base_model_name_or_path=["x"])),
    # ---- weights
    Case("weights-missing", Reason.MISSING_WEIGHTS, adapter(weights=None)),
    Case("weights-wrong-name", Reason.MISSING_WEIGHTS, adapter(weights="model.safetensors")),
    Case("weights-is-directory", Reason.MISSING_WEIGHTS, weights_is_directory),
    Case("weights-empty", Reason.WEIGHTS_EMPTY, weights(b"")),
    Case("bin-empty", Reason.WEIGHTS_EMPTY, weights(b"", BIN), PICKLES),
    Case("safetensors-truncated", Reason.WEIGHTS_TRUNCATED, truncated_safetensors),
    Case("safetensors-shorter-than-prefix", Reason.WEIGHTS_TRUNCATED, weights(GOOD[:5])),
    Case("safetensors-header-cut", Reason.WEIGHTS_TRUNCATED, weights(GOOD[:40])),
    Case(
        "safetensors-header-beyond-file",
        Reason.WEIGHTS_TRUNCATED,
        weights(struct.pack("<Q", 10_000) + b"{}"),
    ),
    Case(
        "safetensors-header-absurd",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(struct.pack("<Q", 1 << 62) + b"{}"),
    ),
    Case(
        "safetensors-header-not-json",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(raw_safetensors(b"{not json")),
    ),
    Case("safetensors-header-list", Reason.WEIGHTS_HEADER_INVALID, weights(raw_safetensors(b"[]"))),
    Case(
        "safetensors-overlapping",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(header_with(**{A_NAME: SPAN, B_NAME: SPAN})),
    ),
    Case(
        "safetensors-gap",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(raw_safetensors({A_NAME: {**SPAN, "data_offsets": [256, 512]}}, DATA)),
    ),
    Case("safetensors-trailing-bytes", Reason.WEIGHTS_HEADER_INVALID, weights(GOOD + b"\0" * 8)),
    Case(
        "safetensors-data-short",
        Reason.WEIGHTS_TRUNCATED,
        weights(raw_safetensors(HEADER, DATA[:-4])),
    ),
    Case(
        "safetensors-unknown-dtype",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(header_with(**{A_NAME: {**SPAN, "dtype": "F128"}})),
    ),
    Case(
        "safetensors-shape-vs-span",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(header_with(**{A_NAME: {**SPAN, "shape": [8, 4]}})),
    ),
    Case(
        "safetensors-bad-shape",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(header_with(**{A_NAME: {**SPAN, "shape": [8, -8]}})),
    ),
    Case(
        "safetensors-bad-offsets",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(header_with(**{A_NAME: {**SPAN, "data_offsets": [256, 0]}})),
    ),
    Case(
        "safetensors-tensor-not-object",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(header_with(**{A_NAME: [0, 256]})),
    ),
    Case(
        "safetensors-metadata-not-strings",
        Reason.WEIGHTS_HEADER_INVALID,
        weights(raw_safetensors({**HEADER, "__metadata__": {"format": 1}}, DATA)),
    ),
    Case("safetensors-no-lora-tensors", Reason.WEIGHTS_NOT_LORA, not_lora),
    Case("lora-a-without-b", Reason.WEIGHTS_NOT_LORA, lora_a_alone),
    Case("lora-unsaved-tensor-names", Reason.WEIGHTS_UNRECOGNIZED, lora_unsaved_name),
    Case(
        "safetensors-only-metadata",
        Reason.WEIGHTS_NOT_LORA,
        weights(raw_safetensors({"__metadata__": {"format": "pt"}})),
    ),
    Case("rank-mismatch", Reason.WEIGHTS_RANK_MISMATCH, adapter(r=8, tensor_rank=4)),
    Case("rank-mismatch-lora-b", Reason.WEIGHTS_RANK_MISMATCH, rank_mismatch_b),
    Case("lora-tensor-1d", Reason.WEIGHTS_RANK_MISMATCH, lora_vector),
    Case("bin-garbage", Reason.WEIGHTS_UNRECOGNIZED, weights(b"GGUF not torch", BIN), PICKLES),
    Case("pt-garbage", Reason.WEIGHTS_UNRECOGNIZED, weights(b"<html>", PT), PICKLES),
    Case("bin-zip-truncated", Reason.WEIGHTS_TRUNCATED, broken_bin_zip, PICKLES),
    Case(
        "bin-zip-not-torch",
        Reason.WEIGHTS_UNRECOGNIZED,
        weights(torch_zip_bytes(with_pickle=False), BIN),
        PICKLES,
    ),
    Case("bin-refused", Reason.PICKLE_NOT_ALLOWED, weights(torch_zip_bytes(), BIN)),
    Case("pt-refused", Reason.PICKLE_NOT_ALLOWED, weights(torch_zip_bytes(), PT)),
    Case("bin-garbage-refused", Reason.PICKLE_NOT_ALLOWED, weights(b"GGUF not torch", BIN)),
    Case("safetensors-header-over-cap", Reason.WEIGHTS_HEADER_INVALID, header_over_cap),
    Case("too-large", Reason.TOO_LARGE, adapter(), Rules(max_adapter_bytes=1000)),
    Case("directory-of-adapters", Reason.MISSING_CONFIG, directory_of_adapters),
    Case(
        "safetensors-preferred-even-broken", Reason.WEIGHTS_TRUNCATED, safetensors_wins_even_broken
    ),
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    root.mkdir()
    return root


def _run(case: Case, root: Path, context: Context = Context.WATCHED) -> Valid | Invalid:
    built = case.build(root)
    folder, name = built if isinstance(built, tuple) else (built, None)
    return inspect(folder, root, case.rules, name=name, context=context)


@pytest.mark.parametrize("context", list(Context))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_broken_folder_has_its_reason(case: Case, root: Path, context: Context) -> None:
    """Every broken folder is Invalid with its own stable reason code and a one-line message,
    whoever prints it (the daemon and plugin, or `validate`): the context words, never judges."""
    result = _run(case, root, context)
    assert isinstance(result, Invalid), result
    assert (result.reason, result.ok) == (case.reason, False), result.message
    assert result.message
    assert "\n" not in result.message


def test_table_covers_every_reason() -> None:
    """The broken-folder table produces every reason code inspection has (the two judged per
    server, by `lorawarm.fit`, are covered by test_fit.py and the differential test)."""
    per_server = {Reason.TARGET_MODULES_NOT_SUPPORTED, Reason.SHAPE_MISMATCH}
    assert {c.reason for c in CASES} == set(Reason) - per_server
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("build", "rules", "watched", "command"),
    [
        pytest.param(
            empty_folder,
            RULES,
            "adapter_config.json is missing (the folder may still be copying)",
            "adapter_config.json is missing",
            id="empty-folder",
        ),
        pytest.param(
            adapter(r=32),
            RULES,
            "LoRA rank 32 is above the max LoRA rank 16; raise vLLM's --max-lora-rank and "
            "LORAWARM_MAX_LORA_RANK, or retrain with a smaller r",
            "LoRA rank 32 is above the max LoRA rank 16; pass a larger --max-lora-rank "
            "(vLLM's), or retrain with a smaller r",
            id="rank",
        ),
        pytest.param(
            adapter(base_model="other/model"),
            RULES,
            "add it with LORAWARM_BASE_MODEL_ALIASES if it is the same model",
            "add it with --base-model-alias if it is the same model",
            id="base-model",
        ),
        pytest.param(
            adapter(weights=BIN, weights_bytes=torch_zip_bytes()),
            RULES,
            "or set LORAWARM_SAFETENSORS_ONLY=false if you trust whoever can write this folder",
            "or pass --no-safetensors-only if you trust whoever can write this folder",
            id="pickle",
        ),
        pytest.param(
            adapter(),
            Rules(max_adapter_bytes=2 << 10),
            "KiB) are accepted; raise LORAWARM_MAX_ADAPTER_BYTES if it really is this large",
            "KiB) are accepted; raise --max-adapter-bytes if it really is this large",
            id="too-large",
        ),
        pytest.param(
            directory_of_adapters,
            RULES,
            "looks like a directory of adapters (a, b), not an adapter: it has no "
            "adapter_config.json of its own (the folder may still be copying); an adapter is a "
            "folder directly in the adapter directory",
            "looks like a directory of adapters (a, b), not an adapter: it has no "
            "adapter_config.json of its own; pass the adapter folders inside it instead, such as ",
            id="directory-of-adapters",
        ),
    ],
)
def test_messages_fit_who_prints_them(
    root: Path, build: Callable[[Path], Built], rules: Rules, watched: str, command: str
) -> None:
    """The daemon and plugin (a watched directory, LORAWARM_* settings) and `validate` (a folder
    on the command line, flags) each get the hint that fits them, and only that one."""
    built = build(root)
    assert isinstance(built, Path)
    seen = {c: inspect(built, root, rules, context=c) for c in Context}
    messages = {c: r.message for c, r in seen.items() if isinstance(r, Invalid)}
    assert watched in messages[Context.WATCHED]
    assert command in messages[Context.COMMAND]
    assert "LORAWARM_" not in messages[Context.COMMAND]
    assert "copying" not in messages[Context.COMMAND]


def test_too_large_names_the_size_and_the_limit(root: Path) -> None:
    """An adapter above `max_adapter_bytes` is refused before its weights are read, with its
    size and the limit in bytes and in GiB."""
    folder = write_adapter(root / "x")
    os.truncate(folder / SAFETENSORS, 9 << 30)  # sparse: no disk used, and no header either
    result = inspect(folder, root)
    assert isinstance(result, Invalid)
    assert result.reason == Reason.TOO_LARGE
    total = (9 << 30) + (folder / CONFIG).stat().st_size
    assert f"are {total} bytes (9.0 GiB); at most {8 << 30} bytes (8.0 GiB)" in result.message


def test_reasons_are_snake_case() -> None:
    """Reason codes are stable snake_case strings, usable as they are in JSON and metrics."""
    for reason in Reason:
        assert reason.value == reason.name.lower()
        assert str(reason) == reason.value


# --------------------------------------------------------------------------------------------
# Positive cases


def test_peft_like_adapter_is_valid(root: Path) -> None:
    """A folder as PEFT writes it is Valid, with its name, rank, weights file and base model."""
    folder = write_adapter(root / "support-bot")
    (folder / "README.md").write_text("model card")
    result = inspect(folder, root)
    assert isinstance(result, Valid), result
    assert result.ok
    assert (result.name, result.path, result.rank) == ("support-bot", folder, 8)
    assert (result.weights, result.base_model) == (SAFETENSORS, BASE_MODEL)
    assert [f.name for f in result.files] == [CONFIG, SAFETENSORS]  # README.md is not used
    sizes = [(folder / f.name).stat().st_size for f in result.files]
    assert result.size == sum(sizes)
    assert result.fingerprint == result.files
    assert result.newest_mtime_ns == max((folder / f.name).stat().st_mtime_ns for f in result.files)
    assert all(isinstance(f, FileStat) and f.inode for f in result.files)


def test_org_name_adapter_is_valid(root: Path) -> None:
    """A hub-style `org/name` folder (two levels) is valid and named `org/name`."""
    result = inspect(write_adapter(root / "acme" / "support-bot"), root)
    assert isinstance(result, Valid)
    assert result.name == "acme/support-bot"


@pytest.mark.parametrize(
    ("config", "rules"),
    [
        pytest.param({"modules_to_save": ["classifier"]}, RULES, id="modules-to-save-classifier"),
        pytest.param({"modules_to_save": "score"}, RULES, id="modules-to-save-score-string"),
        pytest.param({"modules_to_save": []}, RULES, id="modules-to-save-empty"),
        pytest.param({"bias": drop()}, RULES, id="bias-absent"),
        pytest.param({"init_lora_weights": "gaussian"}, RULES, id="init-gaussian"),
        pytest.param({"init_lora_weights": False}, RULES, id="init-false"),
        pytest.param({"target_modules": r".*\.(q|v)_proj"}, RULES, id="target-modules-regex"),
        pytest.param({"lora_alpha": 8.5}, RULES, id="lora-alpha-float"),
        pytest.param({"use_rslora": True}, RULES, id="rslora"),
        pytest.param({"rank_pattern": None}, RULES, id="rank-pattern-null"),
        pytest.param(
            {"base_model_name_or_path": "org/Tiny/"},
            Rules(base_model="org/Tiny"),
            id="base-trailing-slash",
        ),
        pytest.param(
            {"base_model_name_or_path": "/models/tiny"},
            Rules(base_model="/models/tiny", base_model_aliases=("tiny-llama",)),
            id="base-exact",
        ),
        pytest.param(
            {"base_model_name_or_path": "tiny-llama"},
            Rules(base_model="/models/tiny", base_model_aliases=("tiny-llama",)),
            id="base-alias",
        ),
        pytest.param(
            {"base_model_name_or_path": "served"},
            Rules(served_model_names=("served",)),
            id="base-served-name",
        ),
        pytest.param({"base_model_name_or_path": "anything"}, Rules(), id="base-unchecked"),
        pytest.param(
            {"base_model_name_or_path": "anything"},
            Rules(base_model_aliases=("tiny-llama",), served_model_names=("served",)),
            id="base-unchecked-with-aliases",
        ),
        # vLLM never reads peft_type: it serves these as LoRA (the weights prove it is one).
        pytest.param({"peft_type": "lora"}, RULES, id="peft-type-lower"),
        pytest.param({"peft_type": "Lora"}, RULES, id="peft-type-title"),
        pytest.param({"peft_type": None}, RULES, id="peft-type-null"),
        pytest.param({"peft_type": "none"}, RULES, id="peft-type-none"),
        pytest.param({"peft_type": drop()}, RULES, id="peft-type-missing"),
    ],
)
def test_accepted_config_variants(root: Path, config: dict[str, object], rules: Rules) -> None:
    """Config variants vLLM loads (classifier heads, regex targets, aliases...) stay Valid."""
    result = inspect(write_adapter(root / "x", config=config), root, rules)
    assert isinstance(result, Valid), result


def test_base_model_name_allowed_when_served_names_given(root: Path) -> None:
    """An adapter may share --model's name when vLLM serves the model under other names."""
    rules = Rules(base_model=BASE_MODEL, served_model_names=("chat",))
    assert isinstance(inspect(write_adapter(root / BASE_MODEL), root, rules), Valid)


def test_rank_pattern_tensors_are_accepted(root: Path) -> None:
    """Tensors of a rank from rank_pattern fit, and the largest rank is reported."""
    tensors = {**lora_tensors(r=8), **lora_tensors(r=12, layers=1, targets=("q_proj",))}
    folder = write_adapter(root / "x", tensors=tensors, config={"rank_pattern": {"q_proj": 12}})
    result = inspect(folder, root)
    assert isinstance(result, Valid), result
    assert result.rank == 12


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8])
def test_dtypes_are_accepted(root: Path, dtype: type) -> None:
    """Whatever dtype the tensors are saved in, a whole file of the right rank is Valid."""
    folder = write_adapter(root / "x", tensors=lora_tensors(dtype=dtype))
    assert isinstance(inspect(folder, root), Valid)


def test_rank_equal_to_max_is_accepted(root: Path) -> None:
    """The max LoRA rank itself is allowed (vLLM refuses only ranks above it)."""
    assert isinstance(inspect(write_adapter(root / "x", r=16), root), Valid)


@pytest.mark.parametrize(
    ("file", "data"),
    [
        pytest.param(BIN, torch_zip_bytes(), id="bin-torch-zip"),
        pytest.param(  # what torch.save(..., _use_new_zipfile_serialization=False) starts with
            BIN,
            b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.",
            id="bin-legacy-pickle",
        ),
        pytest.param(PT, torch_zip_bytes(), id="pt-torch-zip"),
    ],
)
def test_torch_weights_are_accepted(root: Path, file: str, data: bytes) -> None:
    """With pickles allowed, a `.bin`/`.pt` torch container is Valid from its structure alone,
    never unpickled."""
    result = inspect(write_adapter(root / "x", weights=file, weights_bytes=data), root, PICKLES)
    assert isinstance(result, Valid), result
    assert result.weights == file


def test_safetensors_preferred_over_bin(root: Path) -> None:
    """With both files present, the safetensors file is the one checked and used, as in vLLM."""
    folder = write_adapter(root / "x")
    (folder / BIN).write_bytes(b"garbage that is never looked at")
    result = inspect(folder, root)
    assert isinstance(result, Valid)
    assert result.weights == SAFETENSORS
    assert BIN not in {f.name for f in result.files}


def test_bin_preferred_over_pt(root: Path) -> None:
    """Between `.bin` and `.pt`, the `.bin` is used, in vLLM's order."""
    folder = write_adapter(root / "x", weights=BIN, weights_bytes=torch_zip_bytes())
    (folder / PT).write_bytes(b"garbage")
    result = inspect(folder, root, PICKLES)
    assert isinstance(result, Valid)
    assert result.weights == BIN


def test_symlinks_within_root_are_followed(root: Path) -> None:
    """A file symlink to another file inside the drop directory is fine (shared weights)."""
    shared = write_adapter(root / "shared")
    folder = write_adapter(root / "x", weights=None)
    (folder / SAFETENSORS).symlink_to(shared / SAFETENSORS)
    assert isinstance(inspect(folder, root), Valid)


def test_symlinks_to_a_sibling_directory_are_refused(root: Path, tmp_path: Path) -> None:
    """Symlinks (a folder's or a file's) into a directory beside the drop directory whose name
    shares its prefix (`cache-store` next to `cache`) lead out and are refused."""
    real = write_adapter(tmp_path / f"{root.name}-store" / "real")
    (root / "linked").symlink_to(real, target_is_directory=True)
    folder = write_adapter(root / "x", weights=None)
    (folder / SAFETENSORS).symlink_to(real / SAFETENSORS)
    for path in (root / "linked", folder):
        result = inspect(path, root)
        assert isinstance(result, Invalid)
        assert result.reason == Reason.SYMLINK_ESCAPE


def test_subfolders_are_ignored(root: Path) -> None:
    """Subfolders (checkpoints, runs) are ignored: vLLM reads only top-level files."""
    folder = write_adapter(root / "x")
    (folder / "checkpoint-100").mkdir()
    (folder / "checkpoint-100" / "pipe").symlink_to("/etc/passwd")
    assert isinstance(inspect(folder, root), Valid)


def test_name_defaults_to_path_under_root_or_folder_name(root: Path, tmp_path: Path) -> None:
    """Without `name`, the name is the path under the root, else the folder's own name."""
    assert inspect(write_adapter(root / "o" / "n"), root).name == "o/n"
    outside = inspect(write_adapter(tmp_path / "elsewhere" / "n"), root)
    assert (outside.name, outside.ok) == ("n", False)


def test_name_is_checked_before_anything_is_read(root: Path) -> None:
    """A hostile name is refused by its characters alone, even if nothing exists there."""
    result = inspect(root / "../../etc", root, name="../../etc")
    assert isinstance(result, Invalid)
    assert result.reason == Reason.INVALID_NAME


# --------------------------------------------------------------------------------------------
# Permissions: root reads everything, so look as an ordinary user would.


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run the body with the effective uid of an unprivileged user when we are root."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A drop directory that an unprivileged user can reach (pytest's tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="lorawarm-perm-"))
    base.chmod(0o755)
    root = base / "cache"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(base)


def _deny_config(folder: Path) -> None:
    (folder / CONFIG).chmod(0)


def _deny_listing(folder: Path) -> None:
    folder.chmod(0o311)


def _deny_folder(folder: Path) -> None:
    folder.parent.chmod(0o600)  # no search permission: the folder cannot even be stat'ed


@pytest.mark.parametrize(
    ("deny", "words"),
    [
        pytest.param(_deny_config, "cannot open adapter_config.json", id="config"),
        pytest.param(_deny_listing, "cannot list", id="listing"),
        pytest.param(_deny_folder, "cannot stat", id="folder"),
    ],
)
def test_permission_denied_is_unreadable(
    open_root: Path, deny: Callable[[Path], None], words: str
) -> None:
    """Files the daemon's user may not read are `unreadable`, with the OS's reason."""
    folder = write_adapter(open_root / "org" / "x")
    for path in (open_root / "org", folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    deny(folder)
    with as_nobody():
        result = inspect(folder, open_root)
    folder.parent.chmod(0o755)
    folder.chmod(0o755)
    assert isinstance(result, Invalid)
    assert result.reason == Reason.UNREADABLE
    assert words in result.message
    assert "denied" in result.message.lower()


# --------------------------------------------------------------------------------------------
# Whole weights, byte by byte, and robustness


def test_every_prefix_of_a_safetensors_file_is_refused(root: Path) -> None:
    """A safetensors file cut at any byte (a copy in progress) is never Valid."""
    folder = write_adapter(root / "x", tensors=SMALL)
    target = folder / SAFETENSORS
    allowed = {Reason.WEIGHTS_EMPTY, Reason.WEIGHTS_TRUNCATED, Reason.WEIGHTS_HEADER_INVALID}
    for cut in range(len(GOOD)):
        target.write_bytes(GOOD[:cut])
        result = inspect(folder, root)
        assert isinstance(result, Invalid), cut
        assert result.reason in allowed, (cut, result)
    target.write_bytes(GOOD)
    assert isinstance(inspect(folder, root), Valid)


@contextlib.contextmanager
def before_open(file: str, action: Callable[[Path], None]) -> Iterator[list[Path]]:
    """Run `action(path)` just before inspection opens `file` (os.open), as a concurrent writer
    would; yields the paths it was run on."""
    real_open = os.open
    seen: list[Path] = []

    def opening(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if Path(path).name == file and not seen:
            seen.append(Path(path))
            action(Path(path))
        return real_open(path, flags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", opening)
        yield seen


@pytest.mark.parametrize("keep", [4, 20], ids=["in-prefix", "in-header"])
def test_weights_that_shrink_after_listing_are_truncated(root: Path, keep: int) -> None:
    """A safetensors file cut shorter between listing and reading (rewritten in place) is
    `weights_truncated`: the read comes up short of the size listed."""
    folder = write_adapter(root / "x", tensors=SMALL)
    with before_open(SAFETENSORS, lambda path: os.truncate(path, keep)) as seen:
        result = inspect(folder, root)
    assert seen
    assert isinstance(result, Invalid)
    assert result.reason == Reason.WEIGHTS_TRUNCATED
    assert "shrank" in result.message


def test_config_at_the_size_limit_is_read(root: Path) -> None:
    """A config of exactly the size limit is still parsed (the limit is inclusive)."""
    config = json.dumps({"pad": ""})
    text = config.replace('""', '"' + "x" * (MAX_CONFIG_BYTES - len(config)) + '"')
    assert len(text) == MAX_CONFIG_BYTES
    result = inspect(write_adapter(root / "x", config_text=text), root)
    assert isinstance(result, Invalid)
    assert result.reason == Reason.MISSING_FIELD  # parsed, then judged: it has no 'r'


def test_brackets_inside_strings_do_not_count_as_nesting(root: Path) -> None:
    """The nesting guard ignores brackets and escaped quotes inside JSON strings."""
    folder = write_adapter(root / "x", config={"notes": '[[[[ \\" {{{{' * 40})
    assert isinstance(inspect(folder, root), Valid)


SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text()
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(
    [
        "r", "lora_alpha", "target_modules", "peft_type", "bias", "rank_pattern", "use_dora",
        "lora_bias", "use_qalora", "modules_to_save", "base_model_name_or_path",
        "init_lora_weights", "alora_invocation_tokens", "layer_replication", "use_bdlora",
    ]
)  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(overrides=st.dictionaries(KEYS, JSON, max_size=4))
def test_any_config_values_never_raise(overrides: dict[str, object]) -> None:
    """Whatever values the config's known keys hold, inspection answers and never raises."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = write_adapter(root / "x", config=overrides, tensors=SMALL)
        result = inspect(folder, root, Rules(max_lora_rank=16, base_model=BASE_MODEL))
        assert isinstance(result, Valid | Invalid)


# --------------------------------------------------------------------------------------------
# Races: the folder changes while it is being looked at.


def test_file_vanishing_during_scan_is_ignored(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file deleted between listing and stat is treated as absent, not as an error."""
    folder = write_adapter(root / "x")
    (folder / "vanishing.tmp").write_text("")
    real_stat = os.stat

    def stat_after_delete(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith("vanishing.tmp"):
            raise FileNotFoundError(2, "No such file or directory")
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]  # passed through

    monkeypatch.setattr(os, "stat", stat_after_delete)
    result = inspect(folder, root)
    assert isinstance(result, Valid), result


def test_config_growing_during_read_is_too_large(root: Path) -> None:
    """A config that grows past the limit after it was listed small is still refused."""
    folder = write_adapter(root / "x")

    def grow(path: Path) -> None:
        with path.open("a") as f:
            f.write(" " * MAX_CONFIG_BYTES)

    with before_open(CONFIG, grow) as seen:
        result = inspect(folder, root)
    assert seen
    assert isinstance(result, Invalid)
    assert result.reason == Reason.CONFIG_TOO_LARGE
    assert "grew" in result.message


def fifo_swap(path: Path) -> None:
    """Replace the file at `path` by a FIFO nobody writes to (a blocking open of it hangs)."""
    os.unlink(path)
    os.mkfifo(path)


def inspect_in_thread(folder: Path, root: Path, rules: Rules, timeout: float) -> Result | None:
    """Inspect in a thread; None when it did not answer within `timeout` seconds."""
    answer: list[Result] = []
    worker = threading.Thread(target=lambda: answer.append(inspect(folder, root, rules)))
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # blocked opening the FIFO: a writer's open releases it
        fd = os.open(folder / BIN, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout)
        return None
    return answer[0]


@pytest.mark.parametrize("data", [torch_zip_bytes(), torch_zip_bytes()[:-40]], ids=["whole", "cut"])
def test_torch_file_swapped_for_a_fifo_is_read_through_the_checked_fd(
    root: Path, data: bytes
) -> None:
    """A `.bin` replaced by a FIFO right after inspection opened it does not hang inspection:
    the archive is read through the descriptor that was checked, never opened again by path."""
    folder = write_adapter(root / "x", weights=BIN, weights_bytes=data)
    real_open = os.open
    swapped: list[Path] = []

    def open_then_swap(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        if Path(path).name == BIN and not swapped:
            fifo_swap(Path(path))
            swapped.append(Path(path))
        return fd

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", open_then_swap)
        result = inspect_in_thread(folder, root, PICKLES, timeout=5)
    assert swapped == [folder / BIN]
    assert result is not None, "inspection blocked re-opening the weights by path"
    assert stat.S_ISFIFO(os.lstat(folder / BIN).st_mode)  # the swap did happen
    expected = Reason.WEIGHTS_TRUNCATED if len(data) < len(torch_zip_bytes()) else None
    assert (None if isinstance(result, Valid) else result.reason) == expected


def test_realpath_below_agrees_with_realpath(tmp_path: Path) -> None:
    """The shortcut for `root/name` and `root/org/name` gives exactly what os.path.realpath
    gives, through symlinked folders, orgs and roots, missing folders and odd spellings."""
    real_root = tmp_path / "real-root"
    (real_root / "plain").mkdir(parents=True)
    (real_root / "org" / "name").mkdir(parents=True)
    (tmp_path / "elsewhere" / "x").mkdir(parents=True)
    (real_root / "linked").symlink_to(tmp_path / "elsewhere" / "x")
    (real_root / "linked-org").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "root-link").symlink_to(real_root)
    relative = ("plain", "org/name", "linked", "linked-org/x", "missing", "org/missing")
    odd = ("plain/../org", "./plain", "org//name", "org/name/deeper", "")
    for root in (real_root, tmp_path / "root-link", Path(f"{real_root}/")):
        resolved = os.path.realpath(root)
        for rel in (*relative, *odd):
            folder = Path(f"{root}/{rel}")
            assert realpath_below(folder, root, resolved) == os.path.realpath(folder)
        outside = tmp_path / "elsewhere" / "x"
        assert realpath_below(outside, root, resolved) == os.path.realpath(outside)


_JSON_NUMBERS = st.one_of(
    st.integers(-3, 1 << 40), st.booleans(), st.floats(allow_nan=False), st.none(), st.text()
)
WEIGHTS_REASONS = {
    Reason.WEIGHTS_HEADER_INVALID,
    Reason.WEIGHTS_TRUNCATED,
    Reason.WEIGHTS_NOT_LORA,
    Reason.WEIGHTS_RANK_MISMATCH,
}


@settings(max_examples=150, deadline=None, database=None)
@given(
    info=st.one_of(
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "X", 3]),
                "shape": st.one_of(st.lists(_JSON_NUMBERS, max_size=3), _JSON_NUMBERS),
                "data_offsets": st.one_of(st.lists(_JSON_NUMBERS, max_size=3), _JSON_NUMBERS),
            }
        ),
        st.fixed_dictionaries(
            {"dtype": st.just("F32"), "shape": st.lists(st.integers(0, 9), max_size=3)},
            optional={"data_offsets": st.lists(st.integers(0, 3000), min_size=2, max_size=2)},
        ),
        _JSON_NUMBERS,
    )
)
def test_any_tensor_entry_gets_a_weights_verdict(info: object) -> None:
    """Whatever one tensor entry of a safetensors header holds, inspection answers Valid only
    for a well-formed LoRA file and otherwise a weights reason, and never raises."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = raw_safetensors({A_NAME: HEADER[A_NAME], B_NAME: info}, DATA)
        result = inspect(write_adapter(root / "x", weights_bytes=data), root)
    if isinstance(result, Invalid):
        assert result.reason in WEIGHTS_REASONS, result
        assert result.message
    else:  # only an entry spanning the true bytes can tile the data
        assert isinstance(info, dict)
        assert info["data_offsets"] == HEADER[B_NAME]["data_offsets"]
