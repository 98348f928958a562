"""Endpoint cost: what one `GET /v1/lorawarm/server` costs, next to vLLM's own `GET /v1/models`
and `GET /health` on the same server, with adapters loaded.

The endpoint's static facts are computed once at start; each request asks the engine which
adapters it holds (`engine_client.list_loras()`, a utility call the engine core answers between
steps) and names them. This measures that per-request cost from a client's side: rounds of the
three requests in turn over one keep-alive connection, on an idle server with `--adapters`
adapters loaded, p50 and p95 of each, and the endpoint's p50 over `/v1/models`'.

    flock /tmp/lorawarm-vllm.lock .venv/bin/python -m bench.endpoint_cost [--rounds 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchContext,
    BenchError,
    dump_json,
    header,
    load_lora,
    ms,
    real_adapter,
    scratch,
    summarize,
    table,
    tiny_model,
    vllm_context,
)

ROUTES = ("/health", "/v1/models", "/v1/lorawarm/server")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.endpoint_cost")
    parser.add_argument("--rounds", type=int, default=200, help="requests per route")
    parser.add_argument("--adapters", type=int, default=4, help="adapters loaded first")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser.parse_args(argv)


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    source = real_adapter(ctx.model, large=False)
    samples: dict[str, list[float]] = {route: [] for route in ROUTES}
    with httpx.Client(timeout=30) as client:
        for i in range(args.adapters):
            load_lora(client, ctx.url, f"bench-endpoint-{i}", source)
        answer = client.get(f"{ctx.url}{ROUTES[-1]}")
        if answer.status_code != 200:
            raise BenchError(f"{ROUTES[-1]} answered HTTP {answer.status_code}: {answer.text}")
        resident = answer.json().get("resident")
        for _ in range(5):  # warm the connection and the routes
            for route in ROUTES:
                client.get(f"{ctx.url}{route}")
        for _ in range(args.rounds):
            for route in ROUTES:
                started = time.perf_counter()
                response = client.get(f"{ctx.url}{route}")
                samples[route].append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise BenchError(f"{route} answered HTTP {response.status_code}")
    stats = {route: summarize(values) for route, values in samples.items()}
    rows = [[route, stats[route].n, ms(stats[route].p50), ms(stats[route].p95)] for route in ROUTES]
    print(f"adapters loaded: {args.adapters}; resident per the endpoint: {resident}")
    print(table(["route", "n", "p50", "p95"], rows))
    ratio = stats[ROUTES[-1]].p50 / stats["/v1/models"].p50
    print(f"\n/v1/lorawarm/server p50 / /v1/models p50: {ratio:.2f}x")
    return {
        "adapters": args.adapters,
        "resident": resident,
        "routes": {route: stats[route].as_dict() for route in ROUTES},
        "ratio_p50_endpoint_over_models": ratio,
    }


def main(argv: Sequence[str] | None = None, *, ctx: BenchContext | None = None) -> int:
    """Run the benchmark on `ctx`'s server when given (it must run the lorawarm plugin), else on
    a tiny-model server with the plugin started here."""
    args = parse_args(argv)
    header("endpoint_cost", "bench.endpoint_cost", argv)
    if ctx is not None:
        figures = run(ctx, args)
    else:
        with scratch(args.keep) as work, vllm_context(tiny_model(), work, plugins=True) as started:
            figures = run(started, args)
    dump_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
