"""Scale: many adapter folders. For each size (1,000 and 10,000 folders of small real-format
adapters, copies of one synthetic PEFT-exact adapter for the tiny model, files older than the
settle period as after a restart):

- cold start: `lorawarm run` with an empty state directory, from process start to `/readyz`
  (scan + inspect + snapshot copy of every folder), and the daemon's own `ready` seconds;
- restart: the same again with the snapshots in place (scan + inspect, digests remembered, no
  copying), `--restarts` (5) times: the median counts;
- after the last restart: the CPU from ready until the start-up work is done (the reconciler
  has warmed its `--warm-limit` (8) adapters and the first snapshot collection has run); then
  idle CPU over `--idle-seconds` (60), RSS and peak RSS, from /proc/<pid>; then the CPU time of
  one full rescan (asked for with SIGHUP), what every `LORAWARM_RESYNC_SECONDS` costs.

Then a burst: 1,000 folders renamed into an empty drop directory at once (no warm limit), each
of which must be inspected exactly once (`lorawarm_inspections_total`) and loaded exactly once
(vLLM's "Loaded new LoRA adapter" log lines), one load at a time; the status API's /healthz is
polled throughout to show the event loop stays responsive.

    flock /tmp/lorawarm-vllm.lock .venv/bin/python -m bench.scale [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import statistics
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from tests.support.daemon_proc import LorawarmProcess
from tests.unit.adapters import lora_tensors, write_adapter

from bench.common import (
    BenchContext,
    BenchError,
    cpu_seconds,
    dump_json,
    header,
    listed,
    log_events,
    lorawarm,
    memory_kib,
    metric,
    ms,
    scratch,
    summarize,
    table,
    tiny_model,
    vllm_context,
)

# Issue 15's goals at 10,000 folders.
GOAL_READY_S = 3.0
GOAL_COLD_S = 15.0
GOAL_RSS_MB = 100.0
GOAL_IDLE_CPU = 0.5
# How often the daemon does what the idle window may miss: a full rescan (every fifth resync
# while inotify is healthy, lorawarm.intake.FULL_RESCAN_EVERY; the earlier tree: every resync),
# and a snapshot collection walk (every snapshot_grace_seconds, 300 by default).
FULL_RESCAN_EVERY = {"before": 1, "after": 5}
COLLECT_EVERY_S = 300.0
HIDDEN, LAYERS = 256, 2  # the tiny model's (tests.support.models.TINY_DIMS)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument(
        "--sizes", default="1000,10000", help="folder counts, comma-separated (1000,10000)"
    )
    parser.add_argument("--burst", type=int, default=1000, help="folders in the burst (1000)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window (60)")
    parser.add_argument("--warm-limit", type=int, default=8, help="LORAWARM_WARM_LIMIT (8)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the adapters (8)")
    parser.add_argument(
        "--rescan-seconds", type=float, default=10.0, help="window after the SIGHUP rescan (10)"
    )
    parser.add_argument(
        "--restarts", type=int, default=5, help="restarts timed per size; the median counts (5)"
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=60.0, help="LORAWARM_RESYNC_SECONDS (60, default)"
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="also run the daemon of this source tree (a checkout of an earlier commit: its "
        "daemon/ and plugin/ go first on PYTHONPATH) on the same folders, side by side",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def make_source(work: Path, model: Path, rank: int) -> Path:
    """One synthetic adapter, byte-compatible with what PEFT writes for the tiny model."""
    tensors = lora_tensors(r=rank, hidden=HIDDEN, layers=LAYERS)
    return write_adapter(work / "source", r=rank, base_model=str(model), tensors=tensors)


def populate(source: Path, drop: Path, names: Sequence[str], *, age: float | None) -> float:
    """Copy `source` to `drop/<name>` for every name; `age`: backdate the files by that many
    seconds (quiet already, as after a restart). Returns the seconds it took."""
    started = time.perf_counter()
    files = [f for f in source.iterdir() if f.is_file()]
    stamp = time.time() - age if age is not None else None
    for name in names:
        folder = drop / name
        folder.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, folder / f.name)
            if stamp is not None:
                os.utime(folder / f.name, (stamp, stamp))
    return time.perf_counter() - started


def time_ready(daemon: LorawarmProcess, client: httpx.Client, timeout: float = 3600) -> float:
    """Start the daemon; seconds from process start until /readyz answers 200."""
    started = time.perf_counter()
    daemon.start()
    assert daemon.process is not None
    while True:
        if daemon.process.poll() is not None:
            raise BenchError(f"lorawarm exited early:\n{daemon.log_text()[-3000:]}")
        try:
            if client.get(f"{daemon.status_url}/readyz").status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if time.perf_counter() - started > timeout:
            raise BenchError(f"lorawarm not ready after {timeout:.0f} s")
        time.sleep(0.02)


def internal_ready(daemon: LorawarmProcess) -> float:
    events = log_events(daemon, "ready")
    return float(events[-1]["seconds"]) if events else float("nan")


def wait_event(daemon: LorawarmProcess, event: str, timeout: float) -> dict[str, Any]:
    """The first log line of `event`, waiting for it up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (events := log_events(daemon, event)):
        if time.monotonic() > deadline:
            raise BenchError(f"no {event!r} in lorawarm's log after {timeout:.0f} s")
        time.sleep(0.2)
    return events[0]


def wait_loaded(daemon: LorawarmProcess, client: httpx.Client, count: int, timeout: float) -> float:
    """Wait until the daemon's (only) server reports `count` adapters loaded; return seconds."""
    started = time.perf_counter()
    while True:
        servers = client.get(f"{daemon.status_url}/v1/servers").json()["servers"]
        if servers and servers[0]["loaded"] >= count and servers[0]["condition"] == "ok":
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise BenchError(f"{count} adapters not loaded after {timeout:.0f} s: {servers}")
        time.sleep(0.1)


def code_env(tree: Path | None) -> dict[str, str]:
    """The environment that makes `lorawarm run` use the daemon of `tree` (None: this one)."""
    if tree is None:
        return {}
    tree = tree.resolve()
    here = Path(__file__).resolve().parent.parent
    return {"PYTHONPATH": f"{tree}/daemon:{tree}/plugin:{here}"}


def measure_size(
    ctx: BenchContext, args: argparse.Namespace, source: Path, size: int, client: httpx.Client
) -> list[dict[str, Any]]:
    """Every phase at `size` folders, for this tree and (with --before) the earlier one."""
    base = ctx.work / f"size-{size}"
    drop = base / "drop"
    drop.mkdir(parents=True)
    names = [f"s{size}-{i:05d}" for i in range(size)]
    print(f"{size} folders: writing ...", flush=True)
    setup = populate(source, drop, names, age=3600)
    codes: list[tuple[str, Path | None]] = [("after", None)]
    if args.before is not None:
        codes.insert(0, ("before", args.before))
    results = []
    for label, tree in codes:
        results.append(measure_code(ctx, args, base, drop, size, client, setup, label, tree))
        # The next tree's daemon has snapshots of its own: the names this one loaded would be
        # taken (by another snapshot directory) and left alone.
        unload_all(client, ctx.url)
    return results


def unload_all(client: httpx.Client, url: str) -> None:
    """Unload every LoRA adapter the server lists."""
    for name in listed(client, url):
        client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name})


def measure_code(
    ctx: BenchContext,
    args: argparse.Namespace,
    base: Path,
    drop: Path,
    size: int,
    client: httpx.Client,
    setup: float,
    label: str,
    tree: Path | None,
) -> dict[str, Any]:
    state = base / f"state-{label}"
    figures: dict[str, Any] = {"folders": size, "populate_s": setup, "code": label}
    settings = {"WARM_LIMIT": str(args.warm_limit), "RESYNC_SECONDS": str(args.resync_seconds)}
    restarts = max(args.restarts, 1)
    phases = ["cold"] + ["restart"] * restarts
    samples: dict[str, list[tuple[float, float]]] = {"cold": [], "restart": []}
    for run, phase in enumerate(phases):
        last = run == len(phases) - 1
        daemon = lorawarm(
            drop, state, [ctx.url], log_path=base / f"{label}-{phase}-{run}.log", **settings
        )
        daemon.env_overrides.update(code_env(tree))
        try:
            ready = time_ready(daemon, client)
            samples[phase].append((ready, internal_ready(daemon)))
            ready, internal = (statistics.median(x) for x in zip(*samples[phase], strict=True))
            figures[f"{phase}_ready_s"], figures[f"{phase}_ready_internal_s"] = ready, internal
            figures[f"{phase}_ready_samples_s"] = [round(r, 3) for r, _ in samples[phase]]
            assert daemon.process is not None
            pid = daemon.process.pid
            figures[f"{phase}_rss_at_ready_mb"] = memory_kib(pid)["VmRSS"] / 1024
            print(
                f"{size} folders, {label}, {phase}: ready after {samples[phase][-1][0]:.2f} s "
                f"(daemon's scan {samples[phase][-1][1]:.2f} s)",
                flush=True,
            )
            if last:
                cpu_ready = cpu_seconds(pid)
                warmup = wait_loaded(daemon, client, min(args.warm_limit, size), timeout=300)
                figures["warmup_s"] = warmup
                # The start-up collection (every snapshot on disk walked once, after the first
                # listing) is start-up work: the idle window opens once it has finished.
                collected = wait_event(daemon, "snapshots_collected", timeout=300)
                figures["startup_collect_s"] = float(collected["seconds"])
                figures["startup_cpu_s"] = cpu_seconds(pid) - cpu_ready
                print(
                    f"{size} folders: from ready to quiet {figures['startup_cpu_s']:.2f} s of CPU "
                    f"(warm-up of {min(args.warm_limit, size)}, and the start-up collection, "
                    f"{figures['startup_collect_s']:.2f} s)",
                    flush=True,
                )
                counts = client.get(f"{daemon.status_url}/v1/adapters").json()["counts"]
                figures["counts"] = counts
                cpu0, t0 = cpu_seconds(pid), time.monotonic()
                time.sleep(args.idle_seconds)
                cpu1, t1 = cpu_seconds(pid), time.monotonic()
                figures["idle_cpu_percent"] = (cpu1 - cpu0) / (t1 - t0) * 100
                mem = memory_kib(pid)
                figures["rss_mb"] = mem["VmRSS"] / 1024
                figures["peak_rss_mb"] = mem["VmHWM"] / 1024
                print(
                    f"{size} folders: idle CPU {figures['idle_cpu_percent']:.2f} % over "
                    f"{t1 - t0:.0f} s, RSS {figures['rss_mb']:.0f} MB "
                    f"(peak {figures['peak_rss_mb']:.0f} MB); states {counts}",
                    flush=True,
                )
                # What one periodic rescan costs (SIGHUP asks for one): idle CPU is about
                # this over resync_seconds, plus the health probes.
                cpu0 = cpu_seconds(pid)
                os.kill(pid, signal.SIGHUP)
                time.sleep(args.rescan_seconds)
                figures["rescan_cpu_s"] = cpu_seconds(pid) - cpu0
                print(
                    f"{size} folders: CPU in the {args.rescan_seconds:g} s after a SIGHUP rescan "
                    f"{figures['rescan_cpu_s']:.2f} s",
                    flush=True,
                )
        finally:
            daemon.stop()
            daemon.kill()
    return figures


def measure_burst(
    ctx: BenchContext, args: argparse.Namespace, source: Path, client: httpx.Client
) -> dict[str, Any]:
    base = ctx.work / "burst"
    drop, state = base / "drop", base / "state"
    staging = drop / ".burst-staging"
    staging.mkdir(parents=True)
    names = [f"burst-{i:04d}" for i in range(args.burst)]
    populate(source, staging, names, age=None)
    # Every adapter, whatever the server's memory: where lorawarm's resolver runs, the default
    # warm set would be its max_cpu_loras.
    daemon = lorawarm(
        drop, state, [ctx.url], log_path=base / "lorawarm.log", WARM_LIMIT=str(len(names))
    )
    loads_before = ctx.server.count_lora_loads()
    health: list[float] = []
    try:
        time_ready(daemon, client)
        print(f"burst: renaming {args.burst} folders into place at once ...", flush=True)
        started = time.perf_counter()
        for name in names:
            os.rename(staging / name, drop / name)
        renamed = time.perf_counter() - started
        first_seen: float | None = None
        want = set(names)
        next_list = 0.0
        while True:
            t = time.perf_counter()
            client.get(f"{daemon.status_url}/healthz")
            health.append(time.perf_counter() - t)
            if t >= next_list:
                got = want & set(listed(client, ctx.url))
                if got and first_seen is None:
                    first_seen = time.perf_counter() - started
                if got == want:
                    break
                next_list = t + 0.25
            if time.perf_counter() - started > 1800:
                raise BenchError(f"burst: {len(got)}/{len(want)} listed after 1800 s")
            time.sleep(0.02)
        all_listed = time.perf_counter() - started
        time.sleep(3.0)  # anything loaded twice would show up now
        inspected = metric(daemon, "lorawarm_inspections_total")
        loads_metric = metric(daemon, "lorawarm_loads_total")
        loaded_events = log_events(daemon, "adapter_loaded")
        valid_events = log_events(daemon, "adapter_valid")
    finally:
        daemon.stop()
        daemon.kill()
    vllm_loads = ctx.server.count_lora_loads() - loads_before
    stamps = sorted(datetime.fromisoformat(e["timestamp"]).timestamp() for e in loaded_events)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    per_adapter = {e["adapter"] for e in valid_events}
    return {
        "burst": args.burst,
        "rename_s": renamed,
        "first_listed_s": first_seen,
        "all_listed_s": all_listed,
        "loads_per_s": args.burst / all_listed,
        "load_gap_p50_s": statistics.median(gaps) if gaps else float("nan"),
        "inspections": inspected,
        "lorawarm_loads": loads_metric,
        "vllm_loads": vllm_loads,
        "adapter_valid_lines": len(valid_events),
        "distinct_valid": len(per_adapter),
        "healthz": summarize(health).as_dict(),
    }


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    source = make_source(ctx.work, ctx.model, args.rank)
    size_kb = sum(f.stat().st_size for f in source.iterdir()) / 1024
    print(f"adapter: rank {args.rank}, {size_kb:.0f} KiB (config + safetensors)", flush=True)
    results: dict[str, Any] = {"sizes": [], "adapter_kib": size_kb}
    with httpx.Client(timeout=60) as client:
        for size in sizes:
            results["sizes"].extend(measure_size(ctx, args, source, size, client))
        if args.burst:
            results["burst"] = measure_burst(ctx, args, source, client)
    report(args, results)
    return results


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    print()
    print(
        f"## Scale ({results['adapter_kib']:.0f} KiB adapters, warm limit {args.warm_limit}, "
        f"resync every {args.resync_seconds:g} s)"
    )
    rows = []
    for s in results["sizes"]:
        rows.append(
            [
                f"{s['folders']:,}",
                s["code"],
                f"{s['cold_ready_s']:.2f} s ({s['cold_ready_internal_s']:.2f} s)",
                f"{s['restart_ready_s']:.2f} s ({s['restart_ready_internal_s']:.2f} s)",
                " / ".join(f"{r:.2f}" for r in s["restart_ready_samples_s"]),
                f"{s['rss_mb']:.0f} MB",
                f"{s['peak_rss_mb']:.0f} MB",
                f"{s['startup_cpu_s']:.2f} s",
                f"{s['idle_cpu_percent']:.2f} %",
                f"{s['rescan_cpu_s']:.2f} s",
            ]
        )
    print(
        table(
            [
                "folders",
                "code",
                "cold start -> /readyz (daemon's scan), snapshots copied",
                "restart -> /readyz (daemon's scan), snapshots in place, median",
                "restart samples (s)",
                "RSS",
                "peak RSS",
                "CPU from ready to quiet (warm-up, start-up collection)",
                f"idle CPU ({args.idle_seconds:g} s)",
                f"CPU of one rescan (SIGHUP, {args.rescan_seconds:g} s window)",
            ],
            rows,
        )
    )
    for s in results["sizes"]:
        # Steady state: the idle window, plus the full rescans it did not hold, plus one
        # collection walk (its wall time, in a thread: about its CPU) per COLLECT_EVERY_S.
        every = FULL_RESCAN_EVERY.get(s["code"], 1) * args.resync_seconds
        missing = s["rescan_cpu_s"] / every * 100 if every > args.idle_seconds else 0.0
        s["steady_cpu_percent"] = (
            s["idle_cpu_percent"] + missing + s["startup_collect_s"] / COLLECT_EVERY_S * 100
        )
    print()
    print("steady-state CPU estimate (idle window + full rescans outside it + collections):")
    print(
        table(
            ["folders", "code", "idle window", "steady state"],
            [
                [
                    f"{s['folders']:,}",
                    s["code"],
                    f"{s['idle_cpu_percent']:.2f} %",
                    f"{s['steady_cpu_percent']:.2f} %",
                ]
                for s in results["sizes"]
            ],
        )
    )
    pairs = {}
    for s in results["sizes"]:
        pairs.setdefault(s["folders"], {})[s["code"]] = s
    ratio_rows = []
    for folders, by_code in pairs.items():
        if {"before", "after"} <= by_code.keys():
            b, a = by_code["before"], by_code["after"]
            ratio_rows.append(
                [
                    f"{folders:,}",
                    *(
                        f"{a[k]:.2f} / {b[k]:.2f} = {a[k] / b[k]:.2f}x" if b[k] else "-"
                        for k in (
                            "cold_ready_s",
                            "restart_ready_s",
                            "steady_cpu_percent",
                            "peak_rss_mb",
                            "rescan_cpu_s",
                        )
                    ),
                ]
            )
    if ratio_rows:
        print()
        print("after / before, same run:")
        print(
            table(
                ["folders", "cold start", "restart", "steady CPU %", "peak RSS MB", "full rescan"],
                ratio_rows,
            )
        )
    afters = [s for s in results["sizes"] if s["code"] == "after"]
    big = max(afters, key=lambda s: s["folders"]) if afters else None
    if big is not None:
        verdict = {True: "met", False: "MISSED"}
        print()
        print(
            f"goals at {big['folders']:,} folders: restart < {GOAL_READY_S:g} s: "
            f"{big['restart_ready_s']:.2f} s -> {verdict[big['restart_ready_s'] < GOAL_READY_S]}; "
            f"cold start < {GOAL_COLD_S:g} s: {big['cold_ready_s']:.2f} s -> "
            f"{verdict[big['cold_ready_s'] < GOAL_COLD_S]}; idle < {GOAL_IDLE_CPU:g} %: "
            f"{big['steady_cpu_percent']:.2f} % -> "
            f"{verdict[big['steady_cpu_percent'] < GOAL_IDLE_CPU]}; peak RSS < {GOAL_RSS_MB:g} MB: "
            f"{big['peak_rss_mb']:.0f} MB -> {verdict[big['peak_rss_mb'] < GOAL_RSS_MB]}"
        )
    b = results.get("burst")
    if b:
        print()
        print(f"## Burst: {b['burst']:,} folders renamed into place at once")
        print(
            table(
                ["figure", "value"],
                [
                    ["renames took", ms(b["rename_s"])],
                    ["first adapter listed after", f"{b['first_listed_s']:.2f} s"],
                    ["all listed after", f"{b['all_listed_s']:.1f} s"],
                    ["loads per second (one at a time)", f"{b['loads_per_s']:.1f}"],
                    ["gap between loads p50", ms(b["load_gap_p50_s"])],
                    ["lorawarm_inspections_total", f"{b['inspections']:.0f}"],
                    [
                        "adapter_valid log lines (distinct)",
                        f"{b['adapter_valid_lines']} ({b['distinct_valid']})",
                    ],
                    ["lorawarm_loads_total", f"{b['lorawarm_loads']:.0f}"],
                    ["vLLM 'Loaded new LoRA adapter' lines", b["vllm_loads"]],
                    [
                        "/healthz during the burst p50 / p95 / max",
                        f"{ms(b['healthz']['p50'])} / {ms(b['healthz']['p95'])} / "
                        f"{ms(b['healthz']['max'])}",
                    ],
                ],
            )
        )
        once = b["inspections"] == b["burst"] == b["vllm_loads"] == b["distinct_valid"]
        print()
        print(f"each inspected and loaded exactly once: {'yes' if once else 'NO'}")


def main(argv: Sequence[str] | None = None, *, ctx: BenchContext | None = None) -> int:
    """Run the benchmark (on `ctx`'s server when given, else on a vLLM started here)."""
    args = parse_args(argv)
    header("scale", "bench.scale", argv)
    if ctx is not None:
        figures = run(ctx, args)
    else:
        model = tiny_model()
        with scratch(args.keep) as work, vllm_context(model, work, plugins=False) as started:
            figures = run(started, args)
    dump_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
