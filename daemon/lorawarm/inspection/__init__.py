"""Inspection: a pure function from an adapter folder to `Valid` or `Invalid(reason, message)`.

It checks what vLLM checks when it loads an adapter (`lora/peft_helper.py`: rank, bias, DoRA,
modules_to_save, required fields) and what vLLM does not: name rules, containment inside the
drop directory (symlinks too), only regular files, a bounded size, the base model with its
aliases, and whole weights (a safetensors header that accounts for the file's size, LoRA
tensors of the declared rank). No network, no global state, nothing unpickled: the daemon, the
vLLM plugin and `lorawarm validate` run this very function.

By concept: `containment` (where the folder and its files really are, and reading them without
blocking), `peft_config` (`adapter_config.json`), `weights` (the weights file vLLM picks),
`lora_shape` (what the LoRA tensors touch, for the per-server judgement in `lorawarm.fit`),
`verdict` (results, reasons, rules and the wording of messages). This module puts them in order.

What depends on a server (its rank limit, the modules and dimensions of its model, its served
names, the base model when the operator enforces one) is judged by `lorawarm.fit` against that
server's facts; inspection checks the rank, base model and served names only when `Rules` sets
them.

Reasons are stable snake_case codes (`Reason`), meant for machines; messages are for people.
"""

from __future__ import annotations

from pathlib import Path

from lorawarm.inspection.containment import (
    MAX_ENTRIES,
    adapters_among,
    check_directory,
    real_folder,
    scan,
)
from lorawarm.inspection.lora_shape import LoraShape, ModuleDims
from lorawarm.inspection.peft_config import (
    MAX_CONFIG_BYTES,
    MAX_JSON_DEPTH,
    check_config,
    read_config,
)
from lorawarm.inspection.verdict import (
    CONFIG_FILE,
    DEFAULT_MAX_ADAPTER_BYTES,
    WEIGHT_FILES,
    Context,
    FileStat,
    Invalid,
    Reason,
    Reject,
    Result,
    Rules,
    Valid,
    spell,
)
from lorawarm.inspection.weights import MAX_SAFETENSORS_HEADER, check_weights
from lorawarm.names import BadName, check_name

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_MAX_ADAPTER_BYTES",
    "MAX_CONFIG_BYTES",
    "MAX_ENTRIES",
    "MAX_JSON_DEPTH",
    "MAX_SAFETENSORS_HEADER",
    "WEIGHT_FILES",
    "Context",
    "FileStat",
    "Invalid",
    "LoraShape",
    "ModuleDims",
    "Reason",
    "Result",
    "Rules",
    "Valid",
    "inspect_adapter",
]


def inspect_adapter(
    folder: Path,
    *,
    root: Path,
    rules: Rules,
    name: str | None = None,
    context: Context = Context.WATCHED,
) -> Result:
    """Inspect `folder` (an adapter under the drop directory `root`) and say whether vLLM can
    load it safely.

    `name` defaults to the folder's path relative to `root`. `context` says who prints the
    message, which changes its hints only. Never raises for anything found on disk.
    """
    folder = Path(folder)
    if name is None:
        try:
            name = folder.relative_to(root).as_posix()
        except ValueError:
            name = folder.name
    try:
        return _inspect(folder, root, rules, name)
    except Reject as rej:
        return Invalid(name=name, path=folder, reason=rej.reason, message=rej.worded(context))


def _inspect(folder: Path, root: Path, rules: Rules, name: str) -> Valid:
    # vLLM serves `--model` under its own name unless --served-model-name is given.
    served = rules.served_model_names or ((rules.base_model,) if rules.base_model else ())
    try:
        check_name(name, served)
    except BadName as bad:
        raise Reject(Reason(bad.reason), bad.message) from None

    real, real_root = real_folder(folder, root)
    check_directory(real, folder)
    listing = scan(real, real_root)
    files = listing.files
    if CONFIG_FILE not in files:
        _missing_config(folder, real, listing.subfolders)
    config = read_config(Path(real) / CONFIG_FILE, files[CONFIG_FILE].size)
    ranks = check_config(config, rules)
    weights = next((w for w in WEIGHT_FILES if w in files), None)
    if weights is None:
        raise Reject(
            Reason.MISSING_WEIGHTS,
            f"no weights: expected one of {', '.join(WEIGHT_FILES)}",
            copying=True,
        )
    used = (files[CONFIG_FILE], files[weights])
    _check_size(used, rules.max_adapter_bytes)
    reader = check_weights(Path(real) / weights, files[weights].size, ranks, rules)
    base = config.get("base_model_name_or_path")
    return Valid(
        name=name,
        path=folder,
        rank=max(ranks),
        weights=weights,
        base_model=base if isinstance(base, str) else None,
        files=used,
        lora_shape=None if reader is None else reader.shape(config),
    )


def _missing_config(folder: Path, real: str, subfolders: tuple[str, ...]) -> None:
    """Refuse a folder without a config, saying so plainly when it holds adapters instead."""
    held = adapters_among(real, subfolders)
    if not held:
        raise Reject(Reason.MISSING_CONFIG, f"{CONFIG_FILE} is missing", copying=True)
    shown = ", ".join(sorted(held)[:3]) + (", ..." if len(held) > 3 else "")

    def hint(context: Context) -> str:
        if context is Context.COMMAND:
            return f"pass the adapter folders inside it instead, such as {folder / sorted(held)[0]}"
        return "an adapter is a folder directly in the adapter directory (or in an org folder)"

    raise Reject(
        Reason.MISSING_CONFIG,
        f"{folder} looks like a directory of adapters ({shown}), not an adapter: it has no "
        f"{CONFIG_FILE} of its own",
        copying=True,  # a training output (checkpoint-*/ inside) still being copied looks so too
        hint=hint,
    )


def _check_size(used: tuple[FileStat, ...], limit: int) -> None:
    """Refuse an adapter whose files are larger than the limit, before any byte is digested."""
    total = sum(f.size for f in used)
    if total > limit:
        raise Reject(
            Reason.TOO_LARGE,
            f"the adapter's {' and '.join(f.name for f in used)} are {_amount(total)}; at most "
            f"{_amount(limit)} are accepted",
            hint=lambda context: (
                f"raise {spell('max_adapter_bytes', context)} if it really is this large"
            ),
        )


def _amount(size: int) -> str:
    """A byte count for people: exact, with a binary unit beside it when it is large."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size} bytes ({size / (1 << shift):.1f} {unit})"
    return f"{size} bytes"
