"""Source-to-ready: from the put of an adapter's last object into a bucket until vLLM lists it
in `GET /v1/models`.

Side by side in one run, against one real vLLM CPU server and moto's S3 server on loopback (a
separate process, so its CPU is not the daemon's), for a small (rank 8, tiny model) and a large
(rank 64 on every linear layer, ~54 MB) real PEFT adapter:

- lorawarm with `LORAWARM_SOURCES`, at the default poll interval (30 s) and at 1 s: publishes
  land at a random moment of the poll cycle (a random pause of 0 to one interval first);
- the floor for the transfer: a plain boto3 `download_file` of the adapter's objects (its
  transfer manager, ranged and parallel above 8 MB), then, as a second figure, that download
  followed by a bare `POST /v1/load_lora_adapter` until listed.

    flock /tmp/lorawarm-vllm.lock .venv/bin/python -m bench.source_to_ready [--count 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, credentials_env
from tests.support.vllm_server import free_port

from bench.common import (
    BenchContext,
    Summary,
    dump_json,
    header,
    large_model,
    load_lora,
    lorawarm,
    ms,
    real_adapter,
    running,
    scratch,
    summarize,
    table,
    tiny_model,
    vllm_context,
    wait_listed,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.source_to_ready", description=__doc__)
    parser.add_argument("--count", type=int, default=10, help="adapters per series (10)")
    parser.add_argument(
        "--polls", default="30,1", help="poll intervals to measure, seconds (30,1; 30 = default)"
    )
    parser.add_argument("--sizes", default="small,large", help="small,large (both)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random pauses")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


@contextlib.contextmanager
def moto_process(work: Path) -> Iterator[str]:
    """moto's S3 server in a process of its own on a free loopback port; its endpoint."""
    port = free_port()
    log = (work / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(endpoint, timeout=1)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def put_adapter(client: Any, bucket: str, key_prefix: str, folder: Path) -> None:
    """Upload the config, then the weights last; returns once the last put is acknowledged."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    files.sort(key=lambda f: f.startswith("adapter_model"))
    for file in files:
        client.upload_file(str(folder / file), bucket, f"{key_prefix}{file}")


def measure_lorawarm(
    work: Path,
    ctx: BenchContext,
    endpoint: str,
    bucket: str,
    src: Path,
    label: str,
    poll: float,
    count: int,
    rng: random.Random,
    client: Any,
    http: httpx.Client,
) -> list[float]:
    drop, state = work / f"{label}-drop", work / f"{label}-state"
    daemon = lorawarm(
        drop,
        state,
        [ctx.url],
        log_path=work / f"{label}.log",
        SOURCES=f"s3://{bucket}/{label}/",
        SOURCE_POLL_SECONDS=str(poll),
        MAX_LORA_RANK=str(ctx.max_lora_rank),
    )
    daemon.env_overrides.update(credentials_env(endpoint))
    samples = []
    with running(daemon):
        time.sleep(1.0)
        for i in range(count):
            name = f"{label}-{i:03d}"
            time.sleep(rng.uniform(0, poll))
            put_adapter(client, bucket, f"{label}/{name}/", src)
            started = time.perf_counter()
            seen = wait_listed(http, ctx.url, name, timeout=poll + 120)
            samples.append(seen - started)
    return samples


def measure_floor(
    work: Path,
    url: str,
    bucket: str,
    src: Path,
    label: str,
    count: int,
    client: Any,
    http: httpx.Client,
) -> tuple[list[float], list[float]]:
    """boto3 download_file of each object (transfer only), then + POST load until listed."""
    transfer, loaded = [], []
    for i in range(count):
        name = f"{label}-floor-{i:03d}"
        put_adapter(client, bucket, f"{label}-floor/{name}/", src)
        dest = work / "floor" / name
        dest.mkdir(parents=True)
        started = time.perf_counter()
        for file in sorted(p.name for p in src.iterdir() if p.is_file()):
            client.download_file(bucket, f"{label}-floor/{name}/{file}", str(dest / file))
        done = time.perf_counter()
        load_lora(http, url, name, dest)
        seen = wait_listed(http, url, name, timeout=60)
        transfer.append(done - started)
        loaded.append(seen - started)
    return transfer, loaded


def main(argv: Sequence[str] | None = None, ctx: BenchContext | None = None) -> int:
    """Run the benchmark; with `ctx`, against its (already running) vLLM server and model."""
    args = parse_args(argv)
    header(
        "Source-to-ready: last object put -> listed in /v1/models", "bench.source_to_ready", argv
    )
    rng = random.Random(args.seed)  # noqa: S311 - pauses, not cryptography
    polls = [float(p) for p in args.polls.split(",") if p]
    sizes = [s for s in args.sizes.split(",") if s]
    series: dict[str, Summary] = {}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(scratch(args.keep))
        endpoint = stack.enter_context(moto_process(work))
        if ctx is None:
            model = large_model() if "large" in sizes else tiny_model()
            ctx = stack.enter_context(vllm_context(model, work, plugins=False, max_lora_rank=64))
        adapters = {s: real_adapter(ctx.model, large=(s == "large")) for s in sizes}
        for s, folder in adapters.items():
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            print(f"{s} adapter: {size / 1e6:.1f} MB", flush=True)
        http = stack.enter_context(httpx.Client(timeout=60))
        client = s3_client(endpoint)
        bucket = "bench-adapters"
        client.create_bucket(Bucket=bucket)
        for size, src in adapters.items():
            print(f"{size}: floor (boto3 download_file, then POST load) ...", flush=True)
            transfer, loaded = measure_floor(
                work, ctx.url, bucket, src, size, args.count, client, http
            )
            series[f"{size}|boto3 download_file (transfer only)"] = summarize(transfer)
            series[f"{size}|boto3 download_file + POST load -> listed"] = summarize(loaded)
            for poll in polls:
                label = f"{size}-p{poll:g}".replace(".", "_")
                print(f"{size}: lorawarm, poll {poll:g} s ...", flush=True)
                samples = measure_lorawarm(
                    work,
                    ctx,
                    endpoint,
                    bucket,
                    src,
                    label,
                    poll,
                    args.count,
                    rng,
                    client,
                    http,
                )
                series[f"{size}|lorawarm, poll {poll:g} s"] = summarize(samples)
    rows = []
    for key, s in series.items():
        size, who = key.split("|")
        floor = series[f"{size}|boto3 download_file (transfer only)"]
        rows.append([size, who, s.n, ms(s.p50), ms(s.p95), f"{s.p50 / floor.p50:.1f}x"])
    print()
    print("## Source-to-ready (last object put -> listed in /v1/models)")
    print(table(["adapter", "who", "n", "p50", "p95", "p50 / transfer p50"], rows))
    dump_json(args.json, {k: v.as_dict() for k, v in series.items()})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    raise SystemExit(main())
