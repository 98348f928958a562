"""First request to a new adapter: time to first token (streamed) of the first completion that
names a just-published adapter, three ways in one run, each as a ratio to the same completion on
the same adapter once it is warm:

- pre-warmed: published into lorawarm's drop directory by `mv`, loaded by the daemon (the bench
  waits until `/v1/models` lists it), then requested;
- on demand by the lorawarm plugin (`VLLM_PLUGINS=lorawarm`): copied into the plugin's drop
  directory, then requested (the plugin inspects, snapshots, and vLLM loads inside the request);
- on demand by vLLM's built-in filesystem resolver (`VLLM_PLUGINS=lora_filesystem_resolver`,
  `VLLM_LORA_RESOLVER_CACHE_DIR`): copied into its directory, then requested.

One vLLM server runs both plugins, each on its own directory, so every way meets the same
engine. Adapters are real PEFT adapters of a larger random Llama (`LARGE_DIMS`: hidden 512,
24 layers), rank 64 on every linear layer: ~54 MB of safetensors each. Prefix caching is off, so
the warm repeats cost what the first request would without the load. The order of the three
ways rotates every trial; round 0 is a warm-up and is not counted.

    flock /tmp/lorawarm-vllm.lock .venv/bin/python -m bench.first_request [--trials 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tests.support.vllm_server import LORA_RESOLVED_LOG

from bench.common import (
    BenchContext,
    BenchError,
    adapter_bytes,
    dump_json,
    header,
    large_model,
    listed,
    lorawarm,
    ms,
    mv,
    real_adapter,
    running,
    scratch,
    stage,
    stream_completion,
    summarize,
    table,
    tiny_model,
    vllm_context,
    wait_listed,
)

GOAL_RATIO = 1.05
WAYS = ("pre-warmed by lorawarm", "lorawarm plugin", "vLLM filesystem resolver")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.first_request", description=__doc__)
    parser.add_argument("--trials", type=int, default=10, help="adapters per way (10)")
    parser.add_argument(
        "--warm-repeats", type=int, default=3, help="warm completions per adapter (3)"
    )
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per completion (4)")
    parser.add_argument(
        "--pause", type=float, default=1.0, help="seconds between publishing and requesting (1)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny model and rank-8 adapters (smoke runs)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def run(ctx: BenchContext, args: argparse.Namespace, source: Path) -> dict[str, Any]:
    """Measure the three ways against `ctx`'s server (which must run both plugins)."""
    if not ctx.plugins:
        raise BenchError("first_request needs a vLLM server with both resolver plugins")
    size_mb = adapter_bytes(source) / 1e6
    print(f"adapter: {source} ({size_mb:.1f} MB)", flush=True)
    drop, state = ctx.work / "prewarm-drop", ctx.work / "prewarm-state"
    daemon = lorawarm(
        drop,
        state,
        [ctx.url],
        log_path=ctx.work / "prewarm-lorawarm.log",
        MAX_LORA_RANK=str(ctx.max_lora_rank),
    )
    first: dict[str, list[float]] = {w: [] for w in WAYS}
    warm: dict[str, list[float]] = {w: [] for w in WAYS}
    ratios: dict[str, list[float]] = {w: [] for w in WAYS}
    ready: list[float] = []
    base: list[float] = []
    resolved_before = ctx.server.count_log(LORA_RESOLVED_LOG)
    with running(daemon), httpx.Client(timeout=600) as client:
        for trial in range(args.trials + 1):  # trial 0 warms the engine up: not counted
            for k in range(len(WAYS)):
                way = WAYS[(trial + k) % len(WAYS)]
                name = f"{way.split()[0].replace('-', '')}-{trial:03d}"
                if way == WAYS[0]:
                    staged = stage(source, drop, name)
                    started = time.perf_counter()
                    mv(staged, drop / name)
                    ready.append(wait_listed(client, ctx.url, name, timeout=300) - started)
                elif way == WAYS[1]:
                    shutil.copytree(source, ctx.plugin_drop / name)
                else:
                    shutil.copytree(source, ctx.fs_drop / name)
                time.sleep(args.pause)
                cold = stream_completion(client, ctx.url, name, max_tokens=args.max_tokens)
                hot = statistics.median(
                    stream_completion(client, ctx.url, name, max_tokens=args.max_tokens).ttft
                    for _ in range(args.warm_repeats)
                )
                if trial > 0:
                    first[way].append(cold.ttft)
                    warm[way].append(hot)
                    ratios[way].append(cold.ttft / hot)
            reference = stream_completion(
                client, ctx.url, ctx.model_name, max_tokens=args.max_tokens
            )
            if trial > 0:
                base.append(reference.ttft)
        roots = listed(client, ctx.url)
    resolved = ctx.server.count_log(LORA_RESOLVED_LOG) - resolved_before
    plugin_roots = [r for n, r in roots.items() if n.startswith("lorawarm-")]
    plugin_ok = all(r.startswith(str(ctx.plugin_state)) for r in plugin_roots)

    rows = []
    figures: dict[str, Any] = {"adapter_mb": size_mb, "ways": {}}
    for way in WAYS:
        f, w, r = summarize(first[way]), summarize(warm[way]), summarize(ratios[way])
        rows.append([way, f.n, ms(f.p50), ms(f.p95), ms(w.p50), f"{r.p50:.2f}", f"{r.p95:.2f}"])
        figures["ways"][way] = {"first": f.as_dict(), "warm": w.as_dict(), "ratio": r.as_dict()}
    b, d = summarize(base), summarize(ready)
    print()
    print(
        f"## First request to a new adapter ({size_mb:.0f} MB, rank "
        f"{64 if not args.tiny else 8}), time to first token, {args.max_tokens} tokens"
    )
    print(
        table(
            [
                "way",
                "n",
                "first TTFT p50",
                "first TTFT p95",
                "warm TTFT p50",
                "ratio p50",
                "ratio p95",
            ],
            rows,
        )
    )
    print()
    print(f"base model (no adapter) TTFT p50: {ms(b.p50)}")
    print(f"pre-warm: mv -> listed in /v1/models p50 {ms(d.p50)}, p95 {ms(d.p95)} (n={d.n})")
    print(
        f"resolver loads logged by vLLM: {resolved} (expected {2 * (args.trials + 1)}); "
        f"plugin-resolved adapters served from lorawarm snapshots: {plugin_ok}"
    )
    prewarmed = summarize(ratios[WAYS[0]]).p50
    verdict = "met" if prewarmed <= GOAL_RATIO else "MISSED"
    print(f"goal: pre-warmed ratio p50 <= {GOAL_RATIO}: {prewarmed:.3f} -> {verdict}")
    figures |= {
        "base_ttft": b.as_dict(),
        "prewarm_ready": d.as_dict(),
        "resolved": resolved,
        "plugin_snapshots": plugin_ok,
        "goal_met": prewarmed <= GOAL_RATIO,
    }
    return figures


def main(argv: Sequence[str] | None = None, *, ctx: BenchContext | None = None) -> int:
    """Run the benchmark (on `ctx`'s server when given, else on a vLLM started here)."""
    args = parse_args(argv)
    header("first_request", "bench.first_request", argv)
    if ctx is not None:
        figures = run(ctx, args, real_adapter(ctx.model, large=False))
    else:
        model = tiny_model() if args.tiny else large_model()
        source = real_adapter(model, large=not args.tiny)
        extra = ["--max-loras", "2", "--max-cpu-loras", "4"]
        with (
            scratch(args.keep) as work,
            vllm_context(model, work, plugins=True, max_lora_rank=64, extra_args=extra) as started,
        ):
            figures = run(started, args, source)
    dump_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
