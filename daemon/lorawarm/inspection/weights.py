"""The weights file vLLM will pick: whole, of the declared rank, and never unpickled.

vLLM takes the first of `adapter_model.safetensors`, `.bin`, `.pt` that exists. A safetensors
file is checked completely from its header: the header parses, its tensors tile the data
exactly and the file's size matches (so a copy still in progress is never taken), and the LoRA
tensors fit the ranks of the config. A `.bin`/`.pt` file is refused outright when the rules
allow only safetensors; otherwise only its container is looked at (`check_torch_file`).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Set
from pathlib import Path
from typing import Any

from lorawarm.inspection.containment import open_regular, read_exactly
from lorawarm.inspection.lora_shape import LORA_SUFFIXES, ShapeReader
from lorawarm.inspection.verdict import CONFIG_FILE, Context, Reason, Reject, Rules, spell

# The safetensors format caps its header at 100 MB (vLLM refuses anything larger). A real LoRA
# header is kilobytes to a few MB (even per-expert LoRA of a 256-expert MoE is ~16 MB); this cap
# bounds what is read and parsed to 64 MiB before `json.loads` sees a byte of it.
MAX_SAFETENSORS_HEADER = 64 << 20
# What torch.save writes first in its legacy (non-zip) format: pickle's LONG1 of MAGIC_NUMBER.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def check_weights(path: Path, size: int, ranks: Set[int], rules: Rules) -> ShapeReader | None:
    """Check the weights file vLLM will load from `path` (`size` bytes as listed); return what
    its LoRA tensors touch when the file is safetensors (a pickle is never opened that far)."""
    if path.suffix != ".safetensors" and rules.safetensors_only:
        raise Reject(
            Reason.PICKLE_NOT_ALLOWED,
            f"{path.name} is a pickle, which vLLM loads with torch.load; only safetensors "
            "weights are accepted",
            hint=_allow_pickles,
        )
    if size == 0:
        raise Reject(Reason.WEIGHTS_EMPTY, f"{path.name} is empty", copying=True)
    with open_regular(path) as fd:
        if path.suffix == ".safetensors":
            return check_safetensors(fd, size, ranks, path.name)
        check_torch_file(fd, path.name)
        return None


def _allow_pickles(context: Context) -> str:
    how = (
        "pass --no-safetensors-only"
        if context is Context.COMMAND
        else f"set {spell('safetensors_only', context)}=false"
    )
    return (
        "convert it (safetensors.torch.save_file, or PEFT's save_pretrained with "
        f"safe_serialization=True), or {how} if you trust whoever can write this folder"
    )


def check_safetensors(fd: int, size: int, ranks: Set[int], shown: str) -> ShapeReader:
    """Check a whole safetensors file from its header, in one pass over its tensors; return
    the modules and dimensions its LoRA tensors imply (`lora_shape`).

    `size` is the file's size as listed; a file that shrank since is read short and refused.
    Every tensor's dtype, shape and byte span must agree, the spans must tile the data exactly
    (no gap, no overlap, nothing left over or missing), and the LoRA matrices (`lora_A` [r, in],
    `lora_B` [out, r], embeddings likewise) must be 2-D with an `r` from `ranks`; at least one
    LoRA matrix must be there. A LoRA tensor must be named as vLLM reads one
    (`...lora_A.weight`, `...lora_embedding_A`; PEFT's unsaved `lora_A.default.weight` is not),
    and every module needs both its matrices: vLLM refuses anything else on every server.
    """
    header, header_len = _read_header(fd, size)
    reader = ShapeReader()
    spans: list[tuple[int, int]] = []
    lora = 0
    misfit: Reject | None = None  # reported once the file is known whole: a cut file is that first
    for tname, info in header.items():
        if tname == "__metadata__":
            if not (type(info) is dict and all(type(v) is str for v in info.values())):
                raise Reject(
                    Reason.WEIGHTS_HEADER_INVALID,
                    "the safetensors __metadata__ must map names to strings",
                )
            continue
        spans.append(_span(tname, info))
        shape = info["shape"]  # checked by _span
        kind = LORA_SUFFIXES.get(tname[-14:]) or LORA_SUFFIXES.get(tname[-17:])
        if kind is None:
            if ".lora_A." in tname or ".lora_B." in tname or ".lora_embedding_" in tname:
                lora += 1  # a LoRA matrix, but not named as vLLM reads one
                misfit = misfit or Reject(
                    Reason.WEIGHTS_UNRECOGNIZED,
                    f"tensor {ascii(tname)[:80]} is not named as vLLM reads LoRA weights "
                    "(<module>.lora_A.weight, <module>.lora_B.weight, "
                    "<module>.lora_embedding_A/B)",
                )
            continue
        lora += 1
        is_a, embedding = kind
        if misfit is None:
            if len(shape) != 2 or shape[0 if is_a else 1] not in ranks:
                misfit = _misfit(tname, shape, ranks)
            else:
                cut = 17 if embedding else 14
                reader.add(tname[:-cut], is_a, embedding, shape)
    _check_tiling(spans, size - 8 - header_len)
    if misfit is not None:
        raise misfit
    if lora == 0:
        raise Reject(Reason.WEIGHTS_NOT_LORA, f"{shown} holds no LoRA tensors (lora_A / lora_B)")
    alone = reader.unpaired()
    if alone is not None:
        raise Reject(
            Reason.WEIGHTS_NOT_LORA,
            f"{shown} has no tensor {ascii(alone)[:100]}: a LoRA module needs both its A and B "
            "matrices",
        )
    return reader


def _misfit(tname: str, shape: list[int], ranks: Set[int]) -> Reject:
    if len(shape) != 2:
        return Reject(
            Reason.WEIGHTS_RANK_MISMATCH,
            f"tensor {ascii(tname)[:80]} has shape {shape}; a LoRA matrix is 2-D",
        )
    return Reject(
        Reason.WEIGHTS_RANK_MISMATCH,
        f"tensor {ascii(tname)[:80]} has shape {shape}, which does not fit rank "
        f"{sorted(ranks)} from {CONFIG_FILE}",
    )


def _read_header(fd: int, size: int) -> tuple[dict[str, Any], int]:
    """The header as a JSON object and its length, read only once the length is sane."""
    if size < 8:
        raise Reject(
            Reason.WEIGHTS_TRUNCATED,
            "the safetensors file is shorter than its header",
            copying=True,
        )
    prefix = read_exactly(fd, 8)
    if len(prefix) < 8:  # shrank since it was measured: being rewritten right now
        raise Reject(Reason.WEIGHTS_TRUNCATED, "the safetensors file shrank while being read")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_SAFETENSORS_HEADER:
        raise Reject(
            Reason.WEIGHTS_HEADER_INVALID,
            f"the safetensors header claims {header_len} bytes; at most "
            f"{MAX_SAFETENSORS_HEADER} are accepted",
        )
    if 8 + header_len > size:
        raise Reject(
            Reason.WEIGHTS_TRUNCATED,
            f"the safetensors header claims {header_len} bytes but the file has {size}",
            copying=True,
        )
    raw = read_exactly(fd, header_len)
    if len(raw) < header_len:
        raise Reject(Reason.WEIGHTS_TRUNCATED, "the safetensors file shrank while being read")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise Reject(Reason.WEIGHTS_HEADER_INVALID, "the safetensors header is not JSON") from None
    if type(header) is not dict:
        raise Reject(Reason.WEIGHTS_HEADER_INVALID, "the safetensors header is not an object")
    return header, header_len


def _span(tname: str, info: object) -> tuple[int, int]:
    """The byte span of one tensor entry, its dtype, shape and span checked together.

    JSON numbers are exact ints, so `type(x) is int` is the check (it also leaves out the bools
    `true`/`false`). Each test is done once, in the order that names the first thing wrong.
    """
    if type(info) is not dict:
        raise _bad_tensor(tname, "has no description")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    nbytes = _DTYPE_BYTES.get(dtype) if type(dtype) is str else None
    if nbytes is None:
        raise _bad_tensor(tname, f"has unknown dtype {ascii(dtype)[:20]}")
    if type(shape) is not list:
        raise _bad_tensor(tname, "has a malformed shape")
    for d in shape:
        if type(d) is not int or d < 0:
            raise _bad_tensor(tname, "has a malformed shape")
        nbytes *= d
    begin, end = offsets if type(offsets) is list and len(offsets) == 2 else (None, None)
    if not (type(begin) is int and type(end) is int and 0 <= begin <= end):
        raise _bad_tensor(tname, "has malformed data_offsets")
    if end - begin != nbytes:
        raise _bad_tensor(tname, f"has shape {shape} of {dtype} but spans {end - begin} bytes")
    return begin, end


def _bad_tensor(tname: str, what: str) -> Reject:
    # The name is shown only once something is wrong: ascii() on every tensor costs ~5%.
    return Reject(Reason.WEIGHTS_HEADER_INVALID, f"tensor {ascii(tname)[:80]} {what}")


def _check_tiling(spans: list[tuple[int, int]], data: int) -> None:
    """The tensors' spans cover the `data` bytes after the header exactly once."""
    spans.sort()
    end = 0
    for begin, stop in spans:
        if begin != end:
            what = "overlap" if begin < end else "leave a gap"
            raise Reject(
                Reason.WEIGHTS_HEADER_INVALID, f"the safetensors tensors {what} at byte {begin}"
            )
        end = stop
    if end > data:
        raise Reject(
            Reason.WEIGHTS_TRUNCATED,
            f"the safetensors header declares {end} bytes of tensors but the file holds {data}; "
            "the file is incomplete",
            copying=True,
        )
    if end < data:
        raise Reject(
            Reason.WEIGHTS_HEADER_INVALID,
            f"the safetensors file has {data - end} bytes its header does not account for",
        )


def check_torch_file(fd: int, shown: str) -> None:
    """Check a `.bin`/`.pt` file through `fd` as far as can be done without unpickling it.

    What this proves: the file is a zip archive whose central directory is whole and that holds
    a `data.pkl` (the container `torch.save` writes), or it starts with the pickle of torch's
    legacy magic number (what `torch.save(..., _use_new_zipfile_serialization=False)` writes
    first). What it does NOT prove: that the pickle inside is harmless, holds tensors, or fits
    the config. vLLM unpickles it with `torch.load(weights_only=True)`, which restricts what
    the pickle may build but has had bypasses; `Rules.safetensors_only` refuses such files
    before this check runs. A legacy file's completeness cannot be checked at all.
    """
    magic = read_exactly(fd, 32)
    if magic[:2] == b"PK":  # torch.save's zip container: the central directory must be whole
        try:
            # Through the descriptor already checked to be a regular file: re-opening the path
            # could block forever on a FIFO swapped in meanwhile.
            with os.fdopen(fd, "rb", closefd=False) as fobj, zipfile.ZipFile(fobj) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise Reject(
                Reason.WEIGHTS_TRUNCATED, f"{shown} is a damaged or incomplete torch archive"
            ) from None
        if not any(n.endswith("data.pkl") for n in names):
            raise Reject(Reason.WEIGHTS_UNRECOGNIZED, f"{shown} is a zip but not a torch file")
        return
    if magic[:1] == b"\x80":  # legacy torch file: its first pickle must be torch's magic number,
        # or torch.load refuses it ("Invalid magic number"): any other pickle is not a torch
        # file (and may be a payload).
        start = 11 if magic[2:3] == b"\x95" else 2  # protocol 4+: a FRAME opcode first
        if magic[start:].startswith(_TORCH_LEGACY_MAGIC):
            return
    raise Reject(
        Reason.WEIGHTS_UNRECOGNIZED,
        f"{shown} is neither a torch zip archive nor a legacy torch file (a pickle that "
        "does not start with torch's magic number is refused, never unpickled)",
    )
