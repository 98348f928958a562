"""Inspection: a pure function from an adapter folder to `Valid` or `Invalid(reason, message)`.

It checks what vLLM checks when it loads an adapter (`lora/peft_helper.py`: rank, bias, DoRA,
modules_to_save, required fields) and what vLLM does not: name rules, containment inside the
drop directory (symlinks too), only regular files, the base model with its aliases, and whole
weights (a safetensors header that accounts for the file's size, LoRA tensors of the declared
rank). No network, no global state, nothing unpickled: the daemon and the vLLM plugin run this
very function.

Reasons are stable snake_case codes (`Reason`), meant for machines; messages are for people.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from lorawarm.names import BadName, check_name

CONFIG_FILE = "adapter_config.json"
# vLLM tries these in this order (lora/lora_model.py) and uses the first one present.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")

MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_ENTRIES = 256
MAX_SAFETENSORS_HEADER = 64 << 20
# What torch.save writes first in its legacy (non-zip) format: pickle's LONG1 of MAGIC_NUMBER.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# PEFT modules vLLM accepts in modules_to_save (vllm/lora/peft_helper.py).
ALLOWED_MODULES_TO_SAVE = frozenset({"classifier", "score"})
# String values of init_lora_weights that only set the initial weights (vllm/lora/peft_helper.py
# `_init_is_supported`); PiSSA, OLoRA, CorDA, LoftQ... change the base model and are refused.
SUPPORTED_STRING_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


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
    WEIGHTS_EMPTY = "weights_empty"
    WEIGHTS_TRUNCATED = "weights_truncated"
    WEIGHTS_HEADER_INVALID = "weights_header_invalid"
    WEIGHTS_NOT_LORA = "weights_not_lora"
    WEIGHTS_RANK_MISMATCH = "weights_rank_mismatch"
    WEIGHTS_UNRECOGNIZED = "weights_unrecognized"


@dataclass(frozen=True)
class Rules:
    """What an adapter is checked against; built from the settings, passed in explicitly."""

    max_lora_rank: int = 16
    base_model: str | None = None
    base_model_aliases: tuple[str, ...] = ()
    served_model_names: tuple[str, ...] = ()

    @property
    def accepted_base_models(self) -> frozenset[str]:
        names = [self.base_model, *self.base_model_aliases, *self.served_model_names]
        return frozenset(_norm_model(n) for n in names if n)


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
    config: Mapping[str, Any] = field(repr=False, compare=False)

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


class _Reject(Exception):
    """Internal control flow: raised by a check, turned into `Invalid`; never escapes."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def inspect_adapter(
    folder: Path,
    *,
    root: Path,
    rules: Rules,
    name: str | None = None,
    allowed_roots: Iterable[Path] = (),
) -> Result:
    """Inspect `folder` (an adapter under `root`) and say whether vLLM can load it safely.

    `name` defaults to the folder's path relative to `root`. `allowed_roots` lists further
    directories that symlinks may point into (for operators who keep weights elsewhere).
    Never raises for anything found on disk.
    """
    folder = Path(folder)
    if name is None:
        try:
            name = folder.relative_to(root).as_posix()
        except ValueError:
            name = folder.name
    try:
        files, config, weights, rank = _inspect(folder, root, rules, name, allowed_roots)
    except _Reject as rej:
        return Invalid(name=name, path=folder, reason=rej.reason, message=rej.message)
    base = config.get("base_model_name_or_path")
    return Valid(
        name=name,
        path=folder,
        rank=rank,
        weights=weights,
        base_model=base if isinstance(base, str) else None,
        files=files,
        config=config,
    )


def _inspect(
    folder: Path, root: Path, rules: Rules, name: str, allowed_roots: Iterable[Path]
) -> tuple[tuple[FileStat, ...], dict[str, Any], str, int]:
    # vLLM serves `--model` under its own name unless --served-model-name is given.
    served = rules.served_model_names or ((rules.base_model,) if rules.base_model else ())
    try:
        check_name(name, served)
    except BadName as bad:
        raise _Reject(Reason(bad.reason), bad.message) from None

    roots = [os.path.realpath(r) for r in (root, *allowed_roots)]
    real_folder = _realpath_below(folder, root, roots[0])
    # Strictly below the drop directory (the drop directory itself is no adapter), or anywhere
    # in an explicitly allowed root.
    if not (_inside(real_folder, roots[:1]) and real_folder != roots[0]) and not _inside(
        real_folder, roots[1:]
    ):
        if real_folder == roots[0]:
            raise _Reject(
                Reason.SYMLINK_ESCAPE,
                f"folder {folder} resolves to the adapter directory itself, not to an adapter",
            )
        lexically_inside = _inside(os.path.abspath(folder), [os.path.abspath(root)])
        if lexically_inside:  # a symlink (the folder itself, or `org/`) leads out
            raise _Reject(
                Reason.SYMLINK_ESCAPE,
                f"folder {folder} is or passes through a symlink that leads outside the adapter "
                f"directory {root}; copy the adapter in instead",
            )
        raise _Reject(
            Reason.OUTSIDE_ROOT, f"folder {folder} is not inside the adapter directory {root}"
        )
    try:
        st = os.stat(real_folder)
    except FileNotFoundError:
        raise _Reject(Reason.NOT_A_DIRECTORY, f"folder {folder} does not exist") from None
    except OSError as err:
        raise _Reject(Reason.UNREADABLE, f"cannot stat {folder}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _Reject(Reason.NOT_A_DIRECTORY, f"{folder} is not a directory")

    entries = _scan(Path(real_folder), roots)
    if CONFIG_FILE not in entries:
        raise _Reject(
            Reason.MISSING_CONFIG, f"{CONFIG_FILE} is missing (the folder may still be copying)"
        )
    config = _read_config(Path(real_folder) / CONFIG_FILE, entries[CONFIG_FILE].size)
    rank = _check_config(config, rules)
    weights = next((w for w in WEIGHT_FILES if w in entries), None)
    if weights is None:
        raise _Reject(
            Reason.MISSING_WEIGHTS,
            f"no weights: expected one of {', '.join(WEIGHT_FILES)} (the folder may still be "
            "copying)",
        )
    _check_weights(Path(real_folder) / weights, entries[weights].size, config)
    used = (entries[CONFIG_FILE], entries[weights])
    return used, config, weights, rank


def _realpath_below(folder: Path, root: Path, real_root: str) -> str:
    """`os.path.realpath(folder)`, without resolving `root` a second time when `folder` is
    `root/name` or `root/org/name` and neither part is a symlink (the common case)."""
    path, base = os.fspath(folder), os.fspath(root).rstrip(os.sep)
    parts = path[len(base) + 1 :].split(os.sep) if path.startswith(base + os.sep) else []
    if not 1 <= len(parts) <= 2 or any(p in ("", ".", "..") for p in parts):
        return os.path.realpath(folder)
    probe, real = base, real_root
    for part in parts:
        probe, real = f"{probe}{os.sep}{part}", f"{real}{os.sep}{part}"
        try:
            if stat.S_ISLNK(os.lstat(probe).st_mode):
                return os.path.realpath(folder)
        except OSError:
            return os.path.realpath(folder)  # gone, or unreadable: realpath says what it can
    return real


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _scan(folder: Path, roots: list[str]) -> dict[str, FileStat]:
    """Stat the folder's top-level entries; refuse escaping symlinks and non-regular files.

    vLLM reads only top-level files of an adapter folder, so subfolders are ignored (their
    content is never read, by us or by vLLM).
    """
    found: dict[str, FileStat] = {}
    try:
        with os.scandir(folder) as it:
            for count, entry in enumerate(it):
                if count >= MAX_ENTRIES:
                    raise _Reject(
                        Reason.TOO_MANY_FILES,
                        f"the folder holds more than {MAX_ENTRIES} entries; an adapter needs two",
                    )
                found_stat = _stat_entry(entry, roots)
                if found_stat is not None:
                    found[entry.name] = found_stat
    except OSError as err:
        raise _Reject(Reason.UNREADABLE, f"cannot list {folder}: {err.strerror}") from None
    return found


def _stat_entry(entry: os.DirEntry[str], roots: list[str]) -> FileStat | None:
    try:
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not _inside(target, roots):
                raise _Reject(
                    Reason.SYMLINK_ESCAPE,
                    f"{entry.name} is a symlink that points outside the adapter directory",
                )
        st = os.stat(entry.path)
    except FileNotFoundError:
        if entry.is_symlink():
            raise _Reject(Reason.NOT_REGULAR_FILE, f"{entry.name} is a dangling symlink") from None
        return None  # vanished while we looked: the next look sees the folder as it is then
    except OSError as err:
        raise _Reject(
            Reason.UNREADABLE,
            f"cannot stat {entry.name}: {err.strerror} (a symlink loop, or permissions)",
        ) from None
    if stat.S_ISDIR(st.st_mode):
        if entry.name == CONFIG_FILE:
            raise _Reject(Reason.NOT_REGULAR_FILE, f"{CONFIG_FILE} is a directory, not a JSON file")
        return None  # vLLM never reads subfolders, and checks weights with os.path.isfile
    if not stat.S_ISREG(st.st_mode):
        raise _Reject(
            Reason.NOT_REGULAR_FILE,
            f"{entry.name} is not a regular file (a FIFO, socket or device); refusing to read it",
        )
    return FileStat(entry.name, st.st_size, st.st_mtime_ns, st.st_ino)


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[int]:
    """Open a file for reading without ever blocking on a FIFO or following a late swap."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise _Reject(
            Reason.UNREADABLE,
            f"cannot open {path.name}: {err.strerror}; the files must be readable by the "
            "lorawarm and vLLM users",
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Reject(Reason.NOT_REGULAR_FILE, f"{path.name} is not a regular file")
        yield fd
    finally:
        os.close(fd)


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_config(path: Path, size: int) -> dict[str, Any]:
    if size > MAX_CONFIG_BYTES:
        raise _Reject(
            Reason.CONFIG_TOO_LARGE,
            f"{CONFIG_FILE} is {size} bytes; at most {MAX_CONFIG_BYTES} are accepted",
        )
    with _open_regular(path) as fd:
        raw = _read_exactly(fd, MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise _Reject(Reason.CONFIG_TOO_LARGE, f"{CONFIG_FILE} grew past {MAX_CONFIG_BYTES} bytes")
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise _Reject(
            Reason.CONFIG_NOT_JSON, f"{CONFIG_FILE} nests deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise _Reject(
            Reason.CONFIG_NOT_JSON,
            f"{CONFIG_FILE} is not valid JSON ({str(err)[:120]}); the folder may still be copying",
        ) from None
    if not isinstance(config, dict):
        raise _Reject(Reason.CONFIG_NOT_OBJECT, f"{CONFIG_FILE} must hold a JSON object")
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


def _check_config(config: dict[str, Any], rules: Rules) -> int:
    """Check the PEFT config as vLLM will, plus the base model; return the largest rank."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _Reject(
            Reason.WRONG_PEFT_TYPE,
            f'peft_type is {ascii(peft_type)[:40]}; only LoRA adapters ("LORA") can be served',
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise _Reject(Reason.MISSING_FIELD, f"{CONFIG_FILE} has no {key!r}; vLLM needs it")
    r = config["r"]
    if not _is_int(r) or r < 1:
        raise _Reject(Reason.BAD_FIELD, f"'r' must be a positive integer, not {ascii(r)[:40]}")
    alpha = config["lora_alpha"]
    if not (_is_int(alpha) or isinstance(alpha, float)) or not math.isfinite(alpha):
        raise _Reject(Reason.BAD_FIELD, f"'lora_alpha' must be a number, not {ascii(alpha)[:40]}")
    targets = config["target_modules"]
    if isinstance(targets, str):
        if not targets:
            raise _Reject(Reason.BAD_FIELD, "'target_modules' is an empty string")
    elif not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    ):
        raise _Reject(
            Reason.BAD_FIELD, "'target_modules' must be a non-empty list of module names or a regex"
        )
    ranks = [r]
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_is_int(v) and v >= 1 for v in pattern.values()):
        raise _Reject(
            Reason.BAD_FIELD, "'rank_pattern' must map module names to positive integer ranks"
        )
    ranks.extend(pattern.values())
    rank = max(ranks)
    if rank > rules.max_lora_rank:
        raise _Reject(
            Reason.RANK_TOO_LARGE,
            f"LoRA rank {rank} is above the server's max LoRA rank {rules.max_lora_rank} "
            "(raise vLLM's --max-lora-rank and LORAWARM_MAX_LORA_RANK, or retrain with a "
            "smaller r)",
        )
    bias = config.get("bias", "none")
    if bias != "none":  # vLLM compares exactly: a null bias is refused too
        raise _Reject(
            Reason.BIAS_NOT_SUPPORTED,
            f"bias is {ascii(bias)[:40]}; vLLM serves only adapters trained with bias='none'",
        )
    if config.get("use_dora"):
        raise _Reject(Reason.DORA_NOT_SUPPORTED, "DoRA adapters (use_dora) are not served by vLLM")
    if config.get("lora_bias"):
        raise _Reject(Reason.LORA_BIAS_NOT_SUPPORTED, "lora_bias adapters are not served by vLLM")
    if config.get("use_qalora"):
        raise _Reject(Reason.QALORA_NOT_SUPPORTED, "QALoRA adapters are not served by vLLM")
    if config.get("alora_invocation_tokens"):
        raise _Reject(
            Reason.ALORA_NOT_SUPPORTED, "Activated LoRA (alora_invocation_tokens) is not served"
        )
    if config.get("layer_replication"):
        raise _Reject(
            Reason.LAYER_REPLICATION_NOT_SUPPORTED, "layer_replication adapters are not served"
        )
    if config.get("use_bdlora"):
        raise _Reject(
            Reason.BDLORA_NOT_SUPPORTED, "block-diagonal LoRA (use_bdlora) is not served by vLLM"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_STRING_INITS:
        raise _Reject(
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
            raise _Reject(
                Reason.MODULES_TO_SAVE_NOT_SUPPORTED,
                f"modules_to_save is {ascii(saved)[:80]}; vLLM accepts only "
                f"{sorted(ALLOWED_MODULES_TO_SAVE)}",
            )
    accepted = rules.accepted_base_models
    if accepted:
        base = config.get("base_model_name_or_path")
        if not isinstance(base, str):
            raise _Reject(
                Reason.BASE_MODEL_MISMATCH,
                f"{CONFIG_FILE} names no base model (base_model_name_or_path); it must be one "
                f"of {', '.join(sorted(accepted))}",
            )
        if _norm_model(base) not in accepted:
            raise _Reject(
                Reason.BASE_MODEL_MISMATCH,
                f"adapter was trained for base model {ascii(base)[:120]}, not for "
                f"{', '.join(sorted(accepted))}; add it to LORAWARM_BASE_MODEL_ALIASES if it is "
                "the same model under another name",
            )
    return int(rank)


def _norm_model(name: str) -> str:
    return name.strip().rstrip("/")


def _check_weights(path: Path, size: int, config: dict[str, Any]) -> None:
    if size == 0:
        raise _Reject(
            Reason.WEIGHTS_EMPTY, f"{path.name} is empty (the folder may still be copying)"
        )
    if path.suffix == ".safetensors":
        _check_safetensors(path, size, config)
    else:
        _check_torch_file(path, size)


def read_safetensors_header(fd: int, size: int) -> dict[str, Any]:
    """Read and check a safetensors header; raise `_Reject` when it does not describe the file.

    Exposed so settle can ask "are these weights whole?" with the same rules.
    """
    if size < 8:
        raise _Reject(Reason.WEIGHTS_TRUNCATED, "the safetensors file is shorter than its header")
    prefix = _read_exactly(fd, 8)
    if len(prefix) < 8:  # shrank since it was measured: being rewritten right now
        raise _Reject(Reason.WEIGHTS_TRUNCATED, "the safetensors file shrank while being read")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_SAFETENSORS_HEADER:
        raise _Reject(
            Reason.WEIGHTS_HEADER_INVALID,
            f"the safetensors header claims {header_len} bytes; at most "
            f"{MAX_SAFETENSORS_HEADER} are accepted",
        )
    if 8 + header_len > size:
        raise _Reject(
            Reason.WEIGHTS_TRUNCATED,
            f"the safetensors header claims {header_len} bytes but the file has {size}",
        )
    raw = _read_exactly(fd, header_len)
    if len(raw) < header_len:
        raise _Reject(Reason.WEIGHTS_TRUNCATED, "the safetensors file shrank while being read")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Reject(Reason.WEIGHTS_HEADER_INVALID, "the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise _Reject(Reason.WEIGHTS_HEADER_INVALID, "the safetensors header is not an object")
    spans: list[tuple[int, int]] = []
    for tname, info in header.items():
        if tname == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise _Reject(
                    Reason.WEIGHTS_HEADER_INVALID,
                    "the safetensors __metadata__ must map names to strings",
                )
            continue
        spans.append(_tensor_span(tname, info))
    spans.sort()
    end = 0
    for begin, stop in spans:
        if begin != end:
            what = "overlap" if begin < end else "leave a gap"
            raise _Reject(
                Reason.WEIGHTS_HEADER_INVALID, f"the safetensors tensors {what} at byte {begin}"
            )
        end = stop
    data = size - 8 - header_len
    if end > data:
        raise _Reject(
            Reason.WEIGHTS_TRUNCATED,
            f"the safetensors header declares {end} bytes of tensors but the file holds {data}; "
            "the file is incomplete (still copying, or truncated)",
        )
    if end < data:
        raise _Reject(
            Reason.WEIGHTS_HEADER_INVALID,
            f"the safetensors file has {data - end} bytes its header does not account for",
        )
    return header


def _tensor_span(tname: str, info: object) -> tuple[int, int]:
    """The byte span of one tensor, checked against its dtype and shape."""
    # The common case, checked in one pass (a third of inspecting a folder was spent here):
    # JSON numbers are exact ints, and `type(x) is int` leaves bools (true/false) out.
    if type(info) is dict:
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        nbytes = _DTYPE_BYTES.get(dtype) if type(dtype) is str else None
        if nbytes is not None and type(shape) is list and type(offsets) is list:
            for d in shape:
                if type(d) is not int or d < 0:
                    break
                nbytes *= d
            else:
                begin, end = offsets if len(offsets) == 2 else (None, None)
                # nbytes >= 0, so a matching span also has begin <= end
                if type(begin) is int and type(end) is int and begin >= 0 and end - begin == nbytes:
                    return begin, end
    return _tensor_span_checked(tname, info)  # something is off: find out what, and say so


def _tensor_span_checked(tname: str, info: object) -> tuple[int, int]:
    shown = ascii(tname)[:80]
    if not isinstance(info, dict):
        raise _Reject(Reason.WEIGHTS_HEADER_INVALID, f"tensor {shown} has no description")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype, str) and dtype in _DTYPE_BYTES):
        raise _Reject(
            Reason.WEIGHTS_HEADER_INVALID, f"tensor {shown} has unknown dtype {ascii(dtype)[:20]}"
        )
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise _Reject(Reason.WEIGHTS_HEADER_INVALID, f"tensor {shown} has a malformed shape")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise _Reject(Reason.WEIGHTS_HEADER_INVALID, f"tensor {shown} has malformed data_offsets")
    if math.prod(shape) * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise _Reject(
            Reason.WEIGHTS_HEADER_INVALID,
            f"tensor {shown} has shape {shape} of {dtype} but spans "
            f"{offsets[1] - offsets[0]} bytes",
        )
    return offsets[0], offsets[1]


def _check_safetensors(path: Path, size: int, config: dict[str, Any]) -> None:
    with _open_regular(path) as fd:
        header = read_safetensors_header(fd, size)
    allowed = {int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())}
    lora = 0
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        shape = info["shape"]
        # PEFT stores lora_A as [r, in] and lora_B as [out, r] (embeddings likewise).
        if ".lora_A." in tname or ".lora_embedding_A" in tname:
            rank_axis = 0
        elif ".lora_B." in tname or ".lora_embedding_B" in tname:
            rank_axis = 1
        else:
            continue
        lora += 1
        if len(shape) != 2:
            raise _Reject(
                Reason.WEIGHTS_RANK_MISMATCH,
                f"tensor {ascii(tname)[:80]} has shape {shape}; a LoRA matrix is 2-D",
            )
        if shape[rank_axis] not in allowed:
            raise _Reject(
                Reason.WEIGHTS_RANK_MISMATCH,
                f"tensor {ascii(tname)[:80]} has shape {shape}, which does not fit rank "
                f"{sorted(allowed)} from {CONFIG_FILE}",
            )
    if lora == 0:
        raise _Reject(
            Reason.WEIGHTS_NOT_LORA, f"{path.name} holds no LoRA tensors (lora_A / lora_B)"
        )


def _check_torch_file(path: Path, size: int) -> None:
    """Check a .bin/.pt as far as is safe: never unpickle, only look at the container."""
    with _open_regular(path) as fd:
        magic = _read_exactly(fd, 32)
    if magic[:2] == b"PK":  # torch.save's zip container: the central directory must be whole
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise _Reject(
                Reason.WEIGHTS_TRUNCATED,
                f"{path.name} is a damaged or incomplete torch archive",
            ) from None
        if not any(n.endswith("data.pkl") for n in names):
            raise _Reject(Reason.WEIGHTS_UNRECOGNIZED, f"{path.name} is a zip but not a torch file")
        return
    if magic[:1] == b"\x80":  # legacy torch file: its completeness cannot be checked unloaded
        # ...but its first pickle must be torch's magic number, or torch.load refuses it
        # ("Invalid magic number"): any other pickle is not a torch file (and may be a payload).
        start = 11 if magic[2:3] == b"\x95" else 2  # protocol 4+: a FRAME opcode first
        if magic[start:].startswith(_TORCH_LEGACY_MAGIC):
            return
    raise _Reject(
        Reason.WEIGHTS_UNRECOGNIZED,
        f"{path.name} is neither a torch zip archive nor a legacy torch file (a pickle that "
        "does not start with torch's magic number is refused, never unpickled)",
    )


def safetensors_complete(path: Path) -> bool:
    """True when `path` is a safetensors file whose header accounts for its whole size."""
    try:
        with _open_regular(path) as fd:
            read_safetensors_header(fd, os.fstat(fd).st_size)
    except _Reject:
        return False
    return True
