"""Drop-to-ready: from publishing an adapter folder until vLLM lists it in `GET /v1/models`.

Side by side in one run, against one real vLLM CPU server (tiny model, real PEFT adapters):

- lorawarm as shipped (inotify): publish by `mv` of a staged `.name.tmp` folder (taken at once),
  and by an in-place `cp -r` (taken once quiet for the settle period, 5 s by default);
- lorawarm with the polling observer at 5 s (`LORAWARM_POLLING=true LORAWARM_POLL_SECONDS=5`),
  a stand-in for the 5-second polling sidecars (NeMo's, the Gateway API's), the same publishes;
- the floor: a bare `POST /v1/load_lora_adapter` of the same folder.

Every sample is one adapter under a new name, published while nothing else happens, timed from
just before the `mv`/`cp -r`/POST until the first `/v1/models` poll (every 5 ms) that lists it.
Before each publish the bench waits a random 0-0.25 s (0-poll interval for the polling observer,
so that publishes land anywhere in its cycle, as real ones do).

    flock /tmp/lorawarm-vllm.lock .venv/bin/python -m bench.drop_to_ready [--count 20]
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchContext,
    Summary,
    cp_r,
    dump_json,
    header,
    load_lora,
    log_events,
    lorawarm,
    ms,
    mv,
    real_adapter,
    running,
    scratch,
    stage,
    summarize,
    table,
    tiny_model,
    vllm_context,
    wait_listed,
)

GOAL_MS = 100.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.drop_to_ready", description=__doc__)
    parser.add_argument("--count", type=int, default=20, help="adapters per series (20)")
    parser.add_argument(
        "--settle-seconds", type=float, default=5.0, help="LORAWARM_SETTLE_SECONDS (5, default)"
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=5.0, help="interval of the polling observer (5)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random pauses")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def measure_daemon(
    ctx: BenchContext,
    label: str,
    source: Path,
    args: argparse.Namespace,
    client: httpx.Client,
    rng: random.Random,
    *,
    polling: bool,
) -> dict[str, list[float]]:
    """`count` publishes by mv, then `count` by cp -r, into one lorawarm daemon."""
    drop, state = ctx.work / f"{label}-drop", ctx.work / f"{label}-state"
    settings = {"SETTLE_SECONDS": str(args.settle_seconds)}
    if polling:
        settings |= {"POLLING": "true", "POLL_SECONDS": str(args.poll_seconds)}
    daemon = lorawarm(drop, state, [ctx.url], log_path=ctx.work / f"{label}.log", **settings)
    pause = args.poll_seconds if polling else 0.25
    timeout = args.settle_seconds + args.poll_seconds + 60
    samples: dict[str, list[float]] = {"mv": [], "cp -r": []}
    published: dict[str, float] = {}  # name -> wall clock of the publish, for the breakdown
    with running(daemon):
        # A publish by rename copies first; that copy is not part of the latency. Staging every
        # folder up front also lets the polling observer see each rename as a move, as it does
        # in production, where a copy takes longer than one poll interval.
        names = [f"{label}-mv-{i:03d}" for i in range(args.count)]
        staged = [stage(source, drop, name) for name in names]
        time.sleep((args.poll_seconds + 1) if polling else 0.5)
        for name, path in zip(names, staged, strict=True):
            time.sleep(rng.uniform(0, pause))
            published[name] = time.time()
            started = time.perf_counter()
            mv(path, drop / name)
            seen = wait_listed(client, ctx.url, name, timeout=timeout)
            samples["mv"].append(seen - started)
        for i in range(args.count):
            name = f"{label}-cp-{i:03d}"
            time.sleep(rng.uniform(0, pause))
            published[name] = time.time()
            started = time.perf_counter()
            cp_r(source, drop / name)
            seen = wait_listed(client, ctx.url, name, timeout=timeout)
            samples["cp -r"].append(seen - started)
        valid = {e["adapter"]: _wall(e) for e in log_events(daemon, "adapter_valid")}
        loaded = {e["adapter"]: _wall(e) for e in log_events(daemon, "adapter_loaded")}
    for publish, prefix in (("mv", f"{label}-mv-"), ("cp -r", f"{label}-cp-")):
        names = [n for n in published if n.startswith(prefix) and n in valid and n in loaded]
        samples[f"{publish}: publish -> snapshot valid"] = [valid[n] - published[n] for n in names]
        samples[f"{publish}: snapshot valid -> loaded"] = [loaded[n] - valid[n] for n in names]
    return samples


def _wall(event: dict[str, Any]) -> float:
    """The wall-clock time of a daemon log line."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def measure_floor(
    ctx: BenchContext,
    source: Path,
    args: argparse.Namespace,
    client: httpx.Client,
    rng: random.Random,
) -> list[float]:
    """A bare load of a complete folder, observed the same way (the next /v1/models poll)."""
    folder = ctx.work / "floor"
    folder.mkdir(exist_ok=True)
    samples = []
    for i in range(args.count):
        name = f"floor-{i:03d}"
        path = shutil.copytree(source, folder / name)
        time.sleep(rng.uniform(0, 0.25))
        started = time.perf_counter()
        load_lora(client, ctx.url, name, path)
        seen = wait_listed(client, ctx.url, name, timeout=60)
        samples.append(seen - started)
    return samples


def run(ctx: BenchContext, args: argparse.Namespace, source: Path) -> dict[str, Any]:
    """Measure every series against `ctx`'s server and print the table; return the figures."""
    rng = random.Random(args.seed)  # noqa: S311 - pauses, not cryptography
    loads_before = ctx.server.count_lora_loads()
    series: dict[str, Summary] = {}
    stages: dict[str, Summary] = {}
    with httpx.Client(timeout=60) as client:
        print(f"lorawarm (inotify): {args.count} x mv, {args.count} x cp -r ...", flush=True)
        for publish, samples in measure_daemon(
            ctx, "inotify", source, args, client, rng, polling=False
        ).items():
            into = stages if ":" in publish else series
            into[f"lorawarm, inotify|{publish}"] = summarize(samples)
        print(f"lorawarm (polling {args.poll_seconds:g} s): same ...", flush=True)
        for publish, samples in measure_daemon(
            ctx, "polling", source, args, client, rng, polling=True
        ).items():
            into = stages if ":" in publish else series
            into[f"lorawarm, polling {args.poll_seconds:g} s|{publish}"] = summarize(samples)
        print("floor: bare POST /v1/load_lora_adapter ...", flush=True)
        floor = summarize(measure_floor(ctx, source, args, client, rng))
    series["floor: POST /v1/load_lora_adapter|complete folder"] = floor
    loads = ctx.server.count_lora_loads() - loads_before

    rows = []
    for key, s in series.items():
        who, publish = key.split("|")
        rows.append(
            [
                who,
                publish,
                s.n,
                ms(s.p50),
                ms(s.p95),
                ms(s.mean),
                f"{(s.p50 - floor.p50) * 1000:+.0f} ms",
                f"{s.p50 / floor.p50:.1f}x",
            ]
        )
    print()
    print(f"## Drop-to-ready (publish -> listed in /v1/models), settle {args.settle_seconds:g} s")
    print(
        table(
            ["who", "publish", "n", "p50", "p95", "mean", "p50 - floor p50", "p50 / floor p50"],
            rows,
        )
    )
    print()
    print("where lorawarm's time goes (from its log; wall clock, ms resolution):")
    print(
        table(
            ["who", "stage", "n", "p50", "p95"],
            [[*k.split("|"), s.n, ms(s.p50), ms(s.p95)] for k, s in stages.items()],
        )
    )
    mv_key = "lorawarm, inotify|mv"
    gap_ms = (series[mv_key].p50 - floor.p50) * 1000
    verdict = "met" if gap_ms <= GOAL_MS else "MISSED"
    expected = 5 * args.count
    print()
    print(
        f"goal: mv p50 within {GOAL_MS:.0f} ms of the floor: {gap_ms:+.1f} ms -> {verdict}; "
        f"vLLM 'Loaded new LoRA adapter' lines: {loads} (expected {expected}: each adapter "
        "loaded exactly once)"
    )
    return {
        "series": {k: v.as_dict() for k, v in series.items()},
        "stages": {k: v.as_dict() for k, v in stages.items()},
        "mv_gap_ms": gap_ms,
        "goal_met": gap_ms <= GOAL_MS,
        "vllm_loads": loads,
        "expected_loads": expected,
    }


def main(argv: Sequence[str] | None = None, *, ctx: BenchContext | None = None) -> int:
    """Run the benchmark (on `ctx`'s server when given, else on a vLLM started here)."""
    args = parse_args(argv)
    header("drop_to_ready", "bench.drop_to_ready", argv)
    model = ctx.model if ctx is not None else tiny_model()
    source = real_adapter(model, large=False)
    if ctx is not None:
        figures = run(ctx, args, source)
    else:
        with scratch(args.keep) as work, vllm_context(model, work, plugins=False) as started:
            figures = run(started, args, source)
    dump_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
