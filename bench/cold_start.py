"""Cold start: N valid adapter folders, an empty state directory, no warm limit (every valid
adapter is loaded), against one real vLLM CPU server. Side by side in one run:

- the floor: the same N `POST /v1/load_lora_adapter` calls (the same adapter folders, names of
  their own) sent back to back by a bare httpx client on one keep-alive connection;
- lorawarm: the real `lorawarm run` process started with the N folders already in its drop
  directory (files older than the settle period, as after a restart), timed from process start
  to `/readyz` and to the first `GET /v1/models` that lists all N.

Between the two phases the floor's N names are unloaded, so both start from a registry without
any of them. Neither phase is polled while it loads (a `GET /v1/models` of 10,000 names costs
vLLM's API server time the loads need): the floor's loads are done when its last POST returns,
lorawarm's when its log holds N `adapter_loaded` lines (the file is read, the daemon is not
asked); then `GET /v1/models` is asked, every 50 ms, until it lists all N, and "all listed" is
the answer that does. `GET /v1/models` is also timed without our names and with all N.

lorawarm's event-loop time per load is measured from the outside: the daemon's user + system
CPU time (`/proc/<pid>/stat`, all threads) divided by N. That is an UPPER BOUND on loop time
per load: it also holds start-up, the scan, inspection and the snapshot copies (threads), the
status API and logging. The CPU after `/readyz` divided by the loads after it is given too.

Every adapter must be loaded exactly once in each phase (vLLM's "Loaded new LoRA adapter" log
lines, distinct names), else the run fails.

    flock /tmp/lorawarm-vllm.lock .venv/bin/python -m bench.cold_start [--adapters 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import re
import secrets
import statistics
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from tests.support.vllm_server import LORA_LOADED_LOG

from bench.common import (
    BenchContext,
    BenchError,
    cpu_seconds,
    dump_json,
    header,
    load_lora,
    log_events,
    lorawarm,
    metric,
    ms,
    scratch,
    summarize,
    table,
    tiny_model,
    vllm_context,
)
from bench.scale import make_source, populate

GOAL_RATIO = 1.1
GOAL_LOOP_MS = 2.0
LOADED = re.compile(re.escape(LORA_LOADED_LOG) + r"([^']+)'")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cold_start",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapters", type=int, default=10_000, help="adapter folders (10000)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the adapters (8)")
    parser.add_argument(
        "--models-samples", type=int, default=5, help="timed GET /v1/models, empty and full (5)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="give up a phase after this (3600 s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


class LogCounter:
    """Counts the daemon's `adapter_loaded` log lines as they are written (reads only what is
    new: neither vLLM nor the daemon is asked anything)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.count = 0

    def poll(self) -> int:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return self.count
        self.offset += len(chunk)
        lines = (self.rest + chunk).split(b"\n")
        self.rest = lines.pop()
        self.count += sum(b'"event": "adapter_loaded"' in line for line in lines)
        return self.count


def wait_all_listed(
    client: httpx.Client, url: str, want: frozenset[str], started: float, timeout: float
) -> tuple[float, int]:
    """`GET /v1/models` until every name in `want` is listed: (seconds from `started` to the
    answer that lists them all, GETs it took)."""
    deadline = time.perf_counter() + timeout
    for gets in itertools.count(1):
        data = client.get(f"{url}/v1/models").json()["data"]
        if want.issubset(m["id"] for m in data):
            return time.perf_counter() - started, gets
        if time.perf_counter() > deadline:
            raise BenchError(f"not all {len(want)} listed in {url}/v1/models")
        time.sleep(0.05)
    raise AssertionError("unreachable")


def time_models(client: httpx.Client, url: str, samples: int) -> dict[str, float]:
    """Median and max seconds of `GET /v1/models` (read and parsed), and its size."""
    seconds, size = [], 0
    for _ in range(max(samples, 1)):
        started = time.perf_counter()
        response = client.get(f"{url}/v1/models")
        len(response.json()["data"])
        seconds.append(time.perf_counter() - started)
        size = len(response.content)
    return {"p50_s": statistics.median(seconds), "max_s": max(seconds), "bytes": size}


def vllm_loads(ctx: BenchContext, prefix: str) -> tuple[int, int]:
    """vLLM's "Loaded new LoRA adapter" lines this run for names starting with `prefix`:
    (lines, distinct names)."""
    names = [
        m.group(1)
        for line in ctx.server.log_text().splitlines()
        if (m := LOADED.search(line)) and m.group(1).startswith(prefix)
    ]
    return len(names), len(set(names))


def tenths(samples: Sequence[float]) -> tuple[float, float]:
    """Medians of the first and the last tenth of a series (how it changes as N grows)."""
    k = max(len(samples) // 10, 1)
    if not samples:
        return float("nan"), float("nan")
    return statistics.median(samples[:k]), statistics.median(samples[-k:])


def measure_floor(
    ctx: BenchContext, args: argparse.Namespace, folders: Sequence[Path], tag: str
) -> dict[str, Any]:
    names = [f"{tag}-floor-{i:05d}" for i in range(len(folders))]
    latencies: list[float] = []
    with httpx.Client(timeout=120) as client:
        print(f"floor: {len(names)} POST /v1/load_lora_adapter back to back ...", flush=True)
        cpu0 = time.thread_time()
        started = time.perf_counter()
        for name, folder in zip(names, folders, strict=True):
            t = time.perf_counter()
            load_lora(client, ctx.url, name, folder)
            latencies.append(time.perf_counter() - t)
        last_post = time.perf_counter() - started
        client_cpu = time.thread_time() - cpu0
        all_listed, gets = wait_all_listed(client, ctx.url, frozenset(names), started, args.timeout)
        print(f"floor: all {len(names)} listed after {all_listed:.2f} s", flush=True)
        models_full = time_models(client, ctx.url, args.models_samples)
        lines, distinct = vllm_loads(ctx, f"{tag}-floor-")
        print(f"floor: unloading the {len(names)} names ...", flush=True)
        t = time.perf_counter()
        for name in names:
            response = client.post(f"{ctx.url}/v1/unload_lora_adapter", json={"lora_name": name})
            if response.status_code != 200:
                raise BenchError(f"unloading {name}: HTTP {response.status_code} {response.text}")
        unload_s = time.perf_counter() - t
        left = [m["id"] for m in client.get(f"{ctx.url}/v1/models").json()["data"]]
        if any(n.startswith(f"{tag}-floor-") for n in left):
            raise BenchError("floor names still listed after unloading them")
    return {
        "last_post_s": last_post,
        "all_listed_s": all_listed,
        "confirm_gets": gets,
        "post": summarize(latencies).as_dict(),
        "post_first_last_tenth_s": tenths(latencies),
        "client_cpu_s": client_cpu,
        "models_full": models_full,
        "vllm_load_lines": lines,
        "vllm_distinct": distinct,
        "unload_s": unload_s,
    }


def measure_lorawarm(
    ctx: BenchContext, args: argparse.Namespace, drop: Path, names: Sequence[str], tag: str
) -> dict[str, Any]:
    state = ctx.work / "state"
    log_path = ctx.work / "lorawarm.log"
    n = len(names)
    # No warm limit means every adapter here, whatever the server's memory: where lorawarm's
    # resolver runs, the default warm set would be its max_cpu_loras.
    daemon = lorawarm(drop, state, [ctx.url], log_path=log_path, WARM_LIMIT=str(n))
    counter = LogCounter(log_path)
    print(f"lorawarm: cold start on {n} folders ...", flush=True)
    with httpx.Client(timeout=120) as client:
        wall0 = time.time()
        started = time.perf_counter()
        daemon.start()
        assert daemon.process is not None
        pid = daemon.process.pid
        try:
            ready: float | None = None
            cpu_ready = float("nan")
            loaded_at_ready = 0
            # Until /readyz: ask it every 50 ms (as a supervisor would); then only read the log.
            while ready is None or counter.poll() < n:
                if daemon.process.poll() is not None:
                    raise BenchError(f"lorawarm exited early:\n{daemon.log_text()[-3000:]}")
                if ready is None:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{daemon.status_url}/readyz").status_code == 200:
                            ready = time.perf_counter() - started
                            cpu_ready = cpu_seconds(pid)
                            loaded_at_ready = counter.poll()
                            print(f"lorawarm: /readyz after {ready:.2f} s", flush=True)
                if time.perf_counter() - started > args.timeout:
                    raise BenchError(f"lorawarm: {counter.count}/{n} loaded after the timeout")
                time.sleep(0.05)
            all_listed, gets = wait_all_listed(
                client, ctx.url, frozenset(names), started, args.timeout
            )
            cpu_all = cpu_seconds(pid)
            print(f"lorawarm: all {n} listed after {all_listed:.2f} s", flush=True)
            models_full = time_models(client, ctx.url, args.models_samples)
            time.sleep(3.0)  # anything loaded twice would show up now
            loads_total = metric(daemon, "lorawarm_loads_total")
            servers = daemon.servers()
            loaded = log_events(daemon, "adapter_loaded")
        finally:
            daemon.stop()
            daemon.kill()
    lines, distinct = vllm_loads(ctx, f"{tag}-cold-")
    stamps = sorted(datetime.fromisoformat(e["timestamp"]).timestamp() for e in loaded)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    after_ready = len(stamps) - loaded_at_ready
    return {
        "ready_s": ready,
        "all_listed_s": all_listed,
        "confirm_gets": gets,
        "first_load_s": stamps[0] - wall0 if stamps else float("nan"),
        "last_load_s": stamps[-1] - wall0 if stamps else float("nan"),
        "load_gap": summarize(gaps).as_dict(),
        "load_gap_first_last_tenth_s": tenths(gaps),
        "cpu_ready_s": cpu_ready,
        "cpu_all_listed_s": cpu_all,
        "loads_after_ready": after_ready,
        "cpu_per_load_s": cpu_all / n,
        "cpu_per_load_after_ready_s": (cpu_all - cpu_ready) / after_ready
        if after_ready
        else float("nan"),
        "models_full": models_full,
        "lorawarm_loads_total": loads_total,
        "server_loaded": servers[0]["loaded"] if servers else None,
        "vllm_load_lines": lines,
        "vllm_distinct": distinct,
    }


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    n = args.adapters
    tag = f"cs{secrets.token_hex(2)}"  # names of their own, also on a server shared with tests
    source = make_source(ctx.work, ctx.model, args.rank)
    size_kb = sum(f.stat().st_size for f in source.iterdir()) / 1024
    drop = ctx.work / "drop"
    drop.mkdir(parents=True, exist_ok=True)
    names = [f"{tag}-cold-{i:05d}" for i in range(n)]
    print(f"writing {n} folders of a rank-{args.rank} adapter ({size_kb:.0f} KiB) ...", flush=True)
    populate_s = populate(source, drop, names, age=3600)
    print(f"written in {populate_s:.1f} s", flush=True)
    with httpx.Client(timeout=120) as client:
        models_empty = time_models(client, ctx.url, args.models_samples)
    floor = measure_floor(ctx, args, [drop / name for name in names], tag)
    warm = measure_lorawarm(ctx, args, drop, names, tag)
    results: dict[str, Any] = {
        "adapters": n,
        "adapter_kib": size_kb,
        "populate_s": populate_s,
        "models_empty": models_empty,
        "floor": floor,
        "lorawarm": warm,
        "ratio_all_listed": warm["all_listed_s"] / floor["all_listed_s"],
        "ratio_last_load": warm["last_load_s"] / floor["last_post_s"],
    }
    results["loaded_once"] = (
        floor["vllm_load_lines"] == floor["vllm_distinct"] == n
        and warm["vllm_load_lines"] == warm["vllm_distinct"] == n
        and warm["lorawarm_loads_total"] == n
    )
    report(results)
    if not results["loaded_once"]:
        raise BenchError("an adapter was not loaded exactly once (see the counts above)")
    return results


def report(r: dict[str, Any]) -> None:
    f, w, n = r["floor"], r["lorawarm"], r["adapters"]
    print()
    print(f"## Cold start of {n:,} adapters ({r['adapter_kib']:.0f} KiB each, no warm limit)")
    print(
        table(
            [
                "who",
                "n",
                "start -> /readyz",
                "-> first load",
                "-> last load",
                "-> all listed in /v1/models",
                "loads/s",
                "per load p50 (first / last tenth)",
                "CPU per load",
            ],
            [
                [
                    "floor: bare httpx POST /v1/load_lora_adapter",
                    n,
                    "-",
                    "-",
                    f"{f['last_post_s']:.2f} s (last POST returned)",
                    f"{f['all_listed_s']:.2f} s",
                    f"{n / f['all_listed_s']:.1f}",
                    f"{ms(f['post']['p50'])} POST ({ms(f['post_first_last_tenth_s'][0])} / "
                    f"{ms(f['post_first_last_tenth_s'][1])})",
                    f"{ms(f['client_cpu_s'] / n)} (client thread)",
                ],
                [
                    "lorawarm run, empty state dir",
                    n,
                    f"{w['ready_s']:.2f} s",
                    f"{w['first_load_s']:.2f} s",
                    f"{w['last_load_s']:.2f} s (adapter_loaded)",
                    f"{w['all_listed_s']:.2f} s",
                    f"{n / w['all_listed_s']:.1f}",
                    f"{ms(w['load_gap']['p50'])} between loads "
                    f"({ms(w['load_gap_first_last_tenth_s'][0])} / "
                    f"{ms(w['load_gap_first_last_tenth_s'][1])})",
                    f"{ms(w['cpu_per_load_s'])} (daemon, all threads: upper bound)",
                ],
            ],
        )
    )
    print()
    ratio = r["ratio_all_listed"]
    print(
        f"lorawarm / floor, start -> all listed: **{ratio:.2f}x** (last load / last POST: "
        f"{r['ratio_last_load']:.2f}x); goal <= {GOAL_RATIO}x: "
        f"{'met' if ratio <= GOAL_RATIO else 'MISSED'}"
    )
    loop_ms = w["cpu_per_load_s"] * 1000
    print(
        f"lorawarm CPU per load (upper bound on event-loop time per load): {loop_ms:.2f} ms "
        f"({w['cpu_all_listed_s']:.1f} s of CPU, {w['cpu_ready_s']:.1f} s of it before /readyz; "
        f"after /readyz {w['cpu_per_load_after_ready_s'] * 1000:.2f} ms per load over "
        f"{w['loads_after_ready']} loads); goal < {GOAL_LOOP_MS:g} ms: "
        f"{'met' if loop_ms < GOAL_LOOP_MS else 'MISSED'}"
    )
    e, ff, wf = r["models_empty"], f["models_full"], w["models_full"]
    print(
        f"GET /v1/models p50 (max): without our names {ms(e['p50_s'])} ({ms(e['max_s'])}), "
        f"{e['bytes']:,} bytes; with the floor's {n:,} {ms(ff['p50_s'])} ({ms(ff['max_s'])}), "
        f"{ff['bytes']:,} bytes; with lorawarm's {n:,} {ms(wf['p50_s'])} ({ms(wf['max_s'])}), "
        f"{wf['bytes']:,} bytes"
    )
    print(
        f"writing the folders took {r['populate_s']:.1f} s; unloading the floor's {n:,} names "
        f"{f['unload_s']:.1f} s"
    )
    print()
    print(
        f"vLLM 'Loaded new LoRA adapter' lines (distinct names): floor {f['vllm_load_lines']} "
        f"({f['vllm_distinct']}), lorawarm {w['vllm_load_lines']} ({w['vllm_distinct']}); "
        f"lorawarm_loads_total {w['lorawarm_loads_total']:.0f}; /v1/servers loaded "
        f"{w['server_loaded']}"
    )
    print(f"every adapter loaded exactly once in each phase: {'yes' if r['loaded_once'] else 'NO'}")


def main(argv: Sequence[str] | None = None, *, ctx: BenchContext | None = None) -> int:
    """Run the benchmark (on `ctx`'s server when given, else on a vLLM started here)."""
    args = parse_args(argv)
    header("cold start", "bench.cold_start", argv)
    if ctx is not None:
        with scratch(args.keep, prefix="lorawarm-cold-") as work:
            figures = run(dataclasses.replace(ctx, work=work), args)
    else:
        model = tiny_model()
        with scratch(args.keep) as work, vllm_context(model, work, plugins=False) as started:
            figures = run(started, args)
    dump_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
