"""The cost of polling a source: one listing of a bucket holding 1,000 and 10,000 adapters
(two objects each), and the idle CPU of `lorawarm run` with the poller running.

- listing: `lorawarm.sources.bucket.list_source` (what each poll runs) against moto's S3
  server in a process of its own on loopback: LIST requests, wall seconds and this process's
  CPU seconds per listing (median of `--repeat`);
- idle: the real `lorawarm run` with `--idle-adapters` synced adapters, CPU over `--window`
  seconds once everything is synced, at the default poll (30 s) and at 1 s, side by side with
  the same daemon and drop directory without sources (the poller's own cost is the difference).
  No vLLM runs: the daemon's vLLM URL answers nothing, identically in every series.

    .venv/bin/python -m bench.source_listing [--sizes 1000,10000] [--idle-adapters 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.daemon_proc import wait_for
from tests.support.s3 import credentials_env
from tests.unit.adapters import write_adapter

from bench.common import cpu_seconds, dump_json, header, lorawarm, running, scratch, table
from bench.source_to_ready import moto_process, s3_client
from lorawarm.sources.bucket import list_source
from lorawarm.sources.location import parse_source

UNREACHABLE = "http://127.0.0.1:9"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.source_listing", description=__doc__)
    parser.add_argument("--sizes", default="1000,10000", help="adapters per bucket (1000,10000)")
    parser.add_argument("--repeat", type=int, default=5, help="listings per size (5)")
    parser.add_argument("--idle-adapters", type=int, default=1000, help="synced adapters (1000)")
    parser.add_argument("--window", type=float, default=120.0, help="idle window, seconds (120)")
    parser.add_argument("--polls", default="30,1", help="poll intervals of the idle runs (30,1)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def fill(client: Any, bucket: str, prefix: str, n: int, folder: Path) -> None:
    files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}

    def put(i: int) -> None:
        for file, data in files.items():
            client.put_object(Bucket=bucket, Key=f"{prefix}a{i:05d}/{file}", Body=data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(n)))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    header("Source polling: listing cost and idle CPU", "bench.source_listing", argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    figures: dict[str, Any] = {}
    with scratch(args.keep) as work, moto_process(work) as endpoint:
        os.environ.update(credentials_env(endpoint))
        client = s3_client(endpoint)
        client.create_bucket(Bucket="bench")
        folder = write_adapter(work / "src", seed=1)
        rows = []
        for n in sizes:
            print(f"putting {n} adapters ({2 * n} objects) ...", flush=True)
            fill(client, "bench", f"n{n}/", n, folder)
            source = parse_source(f"s3://bench/n{n}/")
            lister = s3_client(endpoint)
            walls, cpus, requests = [], [], 0
            for _ in range(args.repeat):
                cpu0, t0 = time.process_time(), time.perf_counter()
                listing = list_source(lister, source, max_bytes=10**9)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - cpu0)
                requests = listing.requests
                assert len(listing.adapters) == n, len(listing.adapters)
            figures[f"listing {n}"] = {
                "requests": requests,
                "seconds_p50": statistics.median(walls),
                "cpu_seconds_p50": statistics.median(cpus),
            }
            rows.append(
                [
                    n,
                    2 * n,
                    requests,
                    f"{statistics.median(walls):.3f} s",
                    f"{statistics.median(cpus):.3f} s",
                ]
            )
        print()
        print(f"## One listing (median of {args.repeat})")
        print(table(["adapters", "objects", "LIST requests", "wall", "CPU (client)"], rows))

        n = args.idle_adapters
        print(f"\nputting {n} adapters for the idle runs ...", flush=True)
        fill(client, "bench", f"idle{n}/", n, folder)
        idle_rows = []
        drop, state = work / "idle-drop", work / "idle-state"
        for poll in [float(p) for p in args.polls.split(",") if p] + [0.0]:
            label = f"poll {poll:g} s" if poll else "no sources (same drop dir)"
            settings = (
                {}
                if not poll
                else {"SOURCES": f"s3://bench/idle{n}/", "SOURCE_POLL_SECONDS": str(poll)}
            )
            daemon = lorawarm(
                drop, state, [UNREACHABLE], log_path=work / f"idle-{poll}.log", **settings
            )
            daemon.env_overrides.update(credentials_env(endpoint))
            print(f"idle: {label} ...", flush=True)
            with running(daemon):
                if poll:
                    wait_for(
                        lambda d=daemon: d.get("/v1/sources").json()["sources"][0]["synced"] == n,
                        timeout=1800,
                        interval=1,
                        what="every adapter synced",
                    )
                wait_for(
                    lambda d=daemon: len(d.get("/v1/adapters").json()["adapters"]) == n,
                    timeout=1800,
                    interval=1,
                    what="every adapter in the catalog",
                )
                time.sleep(5)
                assert daemon.process is not None
                pid = daemon.process.pid
                c0, t0 = cpu_seconds(pid), time.monotonic()
                time.sleep(args.window)
                share = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
            figures[f"idle {label}"] = share
            idle_rows.append([label, n, f"{share * 100:.2f} %"])
        print()
        print(f"## Idle CPU of lorawarm run over {args.window:g} s, {n} synced adapters")
        print(table(["series", "adapters", "CPU (of one core)"], idle_rows))
    dump_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
