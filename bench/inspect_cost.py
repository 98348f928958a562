"""Inspection cost: how long `inspect_adapter` takes per folder, for adapters of a few layouts.

Inspection runs for every folder at start-up, on every rescan that finds a change, and inside
vLLM on every resolve, so what it learns about an adapter must come from what it already reads
(the config and the safetensors header), never from another read. This measures one call,
in-process, with the files in the page cache (the steady state of a rescan):

- tiny: 2 layers x 4 attention projections (16 tensors), the test suite's adapters;
- 7b: 32 layers x 7 linear modules (448 tensors), the layout of a rank-16 "all-linear" LoRA of
  a 7B Llama (dimensions are kept small: the header, not the data, is what is parsed);
- 70b: 80 layers x 7 modules plus embed_tokens and lm_head (1,124 tensors).

`--baseline DIR` runs the same measurement in child processes, alternately with one whose
`lorawarm` package comes from DIR (another checkout's `daemon/` folder) and prints both side
by side with the ratio of the medians (this checkout / baseline):

    .venv/bin/python -m bench.inspect_cost --baseline /path/to/other/checkout/daemon
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

LAYOUTS: dict[str, tuple[int, tuple[str, ...], bool]] = {
    "tiny": (2, ("q_proj", "k_proj", "v_proj", "o_proj"), False),
    "7b": (
        32,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        False,
    ),
    "70b": (
        80,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        True,
    ),
}
RANK = 8
DIM = 16  # the header's size depends on the tensor count, not on the dimensions


def write_adapter(folder: Path, layers: int, modules: Sequence[str], embeddings: bool) -> None:
    """An adapter folder in PEFT's format: adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True)
    tensors: dict[str, np.ndarray] = {}
    prefix = "base_model.model.model.layers"
    for i in range(layers):
        for m in modules:
            part = "mlp" if m.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            tensors[f"{prefix}.{i}.{part}.{m}.lora_A.weight"] = np.zeros((RANK, DIM), np.float16)
            tensors[f"{prefix}.{i}.{part}.{m}.lora_B.weight"] = np.zeros((DIM, RANK), np.float16)
    targets = list(modules)
    if embeddings:
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros(
            (RANK, DIM), np.float16
        )
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = np.zeros(
            (DIM, RANK), np.float16
        )
        tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((RANK, DIM), np.float16)
        tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((DIM, RANK), np.float16)
        targets += ["embed_tokens", "lm_head"]
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 16,
        "target_modules": targets,
        "bias": "none",
        "base_model_name_or_path": "org/model",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def measure(repeats: int) -> dict[str, dict[str, float]]:
    """Per layout: median and p95 of one `inspect_adapter` call, in microseconds."""
    from lorawarm.inspection import Rules, Valid, inspect_adapter

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lorawarm-inspect-cost-") as tmp:
        root = Path(tmp)
        for name, (layers, modules, embeddings) in LAYOUTS.items():
            folder = root / name
            write_adapter(folder, layers, modules, embeddings)
            rules = Rules()
            result = inspect_adapter(folder, root=root, rules=rules)
            if not isinstance(result, Valid):
                raise SystemExit(f"{name}: not valid: {result}")
            times = []
            for _ in range(repeats):
                start = time.perf_counter_ns()
                inspect_adapter(folder, root=root, rules=rules)
                times.append((time.perf_counter_ns() - start) / 1000)
            times.sort()
            out[name] = {
                "tensors": float(2 * layers * len(modules) + (4 if embeddings else 0)),
                "p50_us": statistics.median(times),
                "p95_us": times[int(len(times) * 0.95)],
            }
    return out


def child(daemon: Path, here: Path, repeats: int) -> dict[str, dict[str, float]]:
    """The figures of one run in a child process whose `lorawarm` comes from `daemon`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(daemon), str(here)])
        cmd = [sys.executable, "-m", "bench.inspect_cost", "--repeats", str(repeats)]
        subprocess.run([*cmd, "--json", f.name], check=True, env=env, stdout=subprocess.DEVNULL)
        result: dict[str, dict[str, float]] = json.loads(Path(f.name).read_text())
        return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inspect_cost", description=__doc__)
    parser.add_argument("--repeats", type=int, default=2000, help="calls per layout (2000)")
    parser.add_argument("--baseline", type=Path, help="a daemon/ folder to compare against")
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs per side (5)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    mine = measure(args.repeats)
    if args.json:
        args.json.write_text(json.dumps(mine))
    base: dict[str, dict[str, float]] | None = None
    if args.baseline is not None:
        # The machine is shared: both sides run as child processes, alternately, `--rounds`
        # times, and each figure is the median over the rounds.
        here = Path(__file__).resolve().parent.parent
        sides = {"mine": here / "daemon", "base": args.baseline.resolve()}
        runs: dict[str, list[dict[str, dict[str, float]]]] = {"mine": [], "base": []}
        for _ in range(args.rounds):
            for side, daemon in sides.items():
                runs[side].append(child(daemon, here, args.repeats))
        mine, base = (
            {
                name: {k: statistics.median(r[name][k] for r in runs[side]) for k in mine[name]}
                for name in mine
            }
            for side in ("mine", "base")
        )
    print(f"inspect_adapter, one call, files in the page cache, {args.repeats} calls per layout")
    head = "| layout | tensors | p50 | p95 |"
    if base is not None:
        head += " baseline p50 | baseline p95 | p50 ratio |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, fig in mine.items():
        row = f"| {name} | {fig['tensors']:.0f} | {fig['p50_us']:.0f} us | {fig['p95_us']:.0f} us |"
        if base is not None:
            b = base[name]
            row += (
                f" {b['p50_us']:.0f} us | {b['p95_us']:.0f} us |"
                f" {fig['p50_us'] / b['p50_us']:.2f}x |"
            )
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
