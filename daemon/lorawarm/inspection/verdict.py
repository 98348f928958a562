"""What inspection answers and what it is asked against: verdicts, reasons, rules, wording.

Every check module raises `Reject` with a reason and a message that states the fact; the
package's `inspect_adapter` turns it into `Invalid`, adding the hints that fit whoever prints the
message (`Context`): the daemon and the plugin watch a directory that folders are copied into
and read their limits from `LORAWARM_*` settings; `lorawarm validate` is given a folder on its
command line and takes its limits as flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from lorawarm.inspection.lora_shape import LoraShape

CONFIG_FILE = "adapter_config.json"
# vLLM tries these in this order (lora/lora_model.py) and uses the first one present.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
# The largest adapter accepted by default: a rank-64 LoRA on every linear layer of a 70B model
# is ~1.7 GB in bf16 and ~3.3 GB in fp32; 8 GiB leaves room for that and refuses a hostile
# sparse file or a full checkpoint dropped by mistake before it is digested and copied.
DEFAULT_MAX_ADAPTER_BYTES = 8 << 30


class Reason(StrEnum):
    """Why an adapter folder is not usable. The values are public: status API, CLI, logs."""

    INVALID_NAME = "invalid_name"
    NAME_TOO_LONG = "name_too_long"
    NAME_IS_BASE_MODEL = "name_is_base_model"
    NOT_A_DIRECTORY = "not_a_directory"
    OUTSIDE_ROOT = "outside_root"
    SYMLINK_ESCAPE = "symlink_escape"
    NOT_REGULAR_FILE = "not_regular_file"
    TOO_MANY_FILES = "too_many_files"
    TOO_LARGE = "too_large"
    UNREADABLE = "unreadable"
    MISSING_CONFIG = "missing_config"
    CONFIG_TOO_LARGE = "config_too_large"
    CONFIG_NOT_JSON = "config_not_json"
    CONFIG_NOT_OBJECT = "config_not_object"
    WRONG_PEFT_TYPE = "wrong_peft_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    RANK_TOO_LARGE = "rank_too_large"
    BIAS_NOT_SUPPORTED = "bias_not_supported"
    DORA_NOT_SUPPORTED = "dora_not_supported"
    LORA_BIAS_NOT_SUPPORTED = "lora_bias_not_supported"
    QALORA_NOT_SUPPORTED = "qalora_not_supported"
    ALORA_NOT_SUPPORTED = "alora_not_supported"
    LAYER_REPLICATION_NOT_SUPPORTED = "layer_replication_not_supported"
    BDLORA_NOT_SUPPORTED = "bdlora_not_supported"
    INIT_NOT_SUPPORTED = "init_not_supported"
    MODULES_TO_SAVE_NOT_SUPPORTED = "modules_to_save_not_supported"
    BASE_MODEL_MISMATCH = "base_model_mismatch"
    MISSING_WEIGHTS = "missing_weights"
    PICKLE_NOT_ALLOWED = "pickle_not_allowed"
    WEIGHTS_EMPTY = "weights_empty"
    WEIGHTS_TRUNCATED = "weights_truncated"
    WEIGHTS_HEADER_INVALID = "weights_header_invalid"
    WEIGHTS_NOT_LORA = "weights_not_lora"
    WEIGHTS_RANK_MISMATCH = "weights_rank_mismatch"
    WEIGHTS_UNRECOGNIZED = "weights_unrecognized"
    # Per server (`lorawarm.fit`): the adapter is sound, but this server's model cannot take it.
    TARGET_MODULES_NOT_SUPPORTED = "target_modules_not_supported"
    SHAPE_MISMATCH = "shape_mismatch"


class Context(StrEnum):
    """Who prints a message. It changes the hints in messages, never a verdict or a reason."""

    WATCHED = "watched"  # daemon, plugin: folders are copied in; limits are LORAWARM_* settings
    COMMAND = "command"  # `lorawarm validate`: folders named on a command line; limits are flags


# Flags of `lorawarm validate` whose spelling is not the setting's name with dashes.
_FLAGS = {"base_model_aliases": "--base-model-alias"}


def spell(setting: str, context: Context) -> str:
    """How the reader of a message changes `setting`: its environment variable or its flag."""
    if context is Context.COMMAND:
        return _FLAGS.get(setting, "--" + setting.replace("_", "-"))
    return "LORAWARM_" + setting.upper()


def norm_model(name: str) -> str:
    """A model name as compared: `org/model/` and ` org/model` are `org/model`."""
    return name.strip().rstrip("/")


@dataclass(frozen=True)
class Rules:
    """What an adapter is checked against; built from the settings, passed in explicitly.

    The rank limit, the base model and the served names belong to a server (`lorawarm.fit`
    judges them against what each server is learned to run); inspection checks them only when
    they are set here, as `lorawarm validate --max-lora-rank/--base-model` and the operator's
    `LORAWARM_MAX_LORA_RANK`/`LORAWARM_BASE_MODEL` do. Unset, they are not checked.
    """

    max_lora_rank: int | None = None
    base_model: str | None = None
    base_model_aliases: tuple[str, ...] = ()
    served_model_names: tuple[str, ...] = ()
    # Config plus weights, the bytes that are digested, copied and loaded.
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    # Refuse `.bin`/`.pt` weights, which vLLM reads with torch.load (see `Settings`).
    safetensors_only: bool = True

    @property
    def accepted_base_models(self) -> frozenset[str]:
        """The names base_model_name_or_path must be one of; empty (not checked) unless a base
        model is set: aliases and served names alone only widen an enforced base model."""
        if not self.base_model:
            return frozenset()
        names = [self.base_model, *self.base_model_aliases, *self.served_model_names]
        return frozenset(norm_model(n) for n in names if n)


@dataclass(frozen=True)
class FileStat:
    """What inspection saw of one file: enough to notice any later change without reading it."""

    name: str
    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class Valid:
    """A folder vLLM will load, with what the daemon needs to snapshot and schedule it."""

    name: str
    path: Path
    rank: int
    weights: str
    base_model: str | None
    files: tuple[FileStat, ...]
    # What the LoRA tensors touch (from the safetensors header); None for .bin/.pt weights,
    # which are never opened that far: the per-server module and shape checks are skipped.
    lora_shape: LoraShape | None = None

    ok = True

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def newest_mtime_ns(self) -> int:
        return max(f.mtime_ns for f in self.files)

    @property
    def fingerprint(self) -> tuple[FileStat, ...]:
        return self.files


@dataclass(frozen=True)
class Invalid:
    """A folder that must not reach vLLM, and why."""

    name: str
    path: Path
    reason: Reason
    message: str

    ok = False


Result = Valid | Invalid


class Reject(Exception):
    """Raised by a check, turned into `Invalid` by `inspect_adapter`; never escapes the package.

    `message` states what was found. `copying` marks a finding that a copy still in progress
    explains (a watched folder is told so); `hint` says, for the reader's context, what would
    let the adapter through ("" for nothing to say there).
    """

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        copying: bool = False,
        hint: Callable[[Context], str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.copying = copying
        self.hint = hint

    def worded(self, context: Context) -> str:
        """The message as `context`'s reader should see it."""
        text = self.message
        if self.copying and context is Context.WATCHED:
            text += " (the folder may still be copying)"
        extra = self.hint(context) if self.hint is not None else ""
        return f"{text}; {extra}" if extra else text
