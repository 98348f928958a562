"""Keep warm what fits: N valid adapters against one real vLLM CPU server with lorawarm's
plugin on and `--max-cpu-loras C`, side by side in one run:

- before: every valid adapter pre-warmed (what lorawarm did before it learned the server's
  memory; reproduced here with `LORAWARM_WARM_LIMIT=N`);
- after: the default, capacity-aware warm set (the server's `max_cpu_loras`, learned from the
  plugin's endpoint; the resolver serves the rest on demand).

Each phase starts from a vLLM registry without our names and an empty state directory, and is
measured until lorawarm's warm set is loaded: the loads vLLM ran (its "Loaded new LoRA adapter"
lines: each one stalls token generation), the adapters listed in `/v1/models`, the time from
process start to the last load, and how many of the loaded adapters the engine still holds
(the endpoint's `resident`: loading past C evicted the rest).

    flock /tmp/lorawarm-vllm.lock .venv/bin/python -m bench.capacity \
        [--adapters 200] [--cpu-loras 8]
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tests.support.vllm_server import LORA_LOADED_LOG

from bench.common import (
    BenchError,
    dump_json,
    header,
    listed,
    lorawarm,
    real_adapter,
    running,
    scratch,
    table,
    tiny_model,
    vllm_context,
)

ENDPOINT = "/v1/lorawarm/server"


def phase(
    ctx: Any, work: Path, source: Path, n: int, *, warm_limit: int | None, label: str
) -> dict[str, Any]:
    drop, state = ctx.plugin_drop, ctx.plugin_state  # the plugin's: it serves the cold ones
    shutil.rmtree(state / "snapshots", ignore_errors=True)
    for i in range(n):
        shutil.copytree(source, drop / f"cap-{i:04d}")
    settings = {} if warm_limit is None else {"warm_limit": str(warm_limit)}
    before = ctx.server.count_log(LORA_LOADED_LOG)
    daemon = lorawarm(drop, state, [ctx.url], log_path=work / f"{label}.log", **settings)
    started = time.monotonic()
    with httpx.Client(timeout=60) as client, running(daemon):
        want = n if warm_limit is not None else None
        last = -1
        stable_since = time.monotonic()
        while True:  # until the number loaded stops moving for 5 s (or reaches `want`)
            loads = ctx.server.count_log(LORA_LOADED_LOG) - before
            if loads != last:
                last, stable_since = loads, time.monotonic()
            if (want is not None and loads >= want) or time.monotonic() - stable_since > 5:
                break
            if time.monotonic() - started > 1800:
                raise BenchError(f"{label}: still loading after 30 min ({loads} loads)")
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        ours = [name for name in listed(client, ctx.url) if name.startswith("cap-")]
        facts = client.get(f"{ctx.url}{ENDPOINT}").json()
        resident = [name for name in facts.get("resident") or [] if name.startswith("cap-")]
        for name in ours:  # the next phase starts from a registry without our names
            client.post(f"{ctx.url}/v1/unload_lora_adapter", json={"lora_name": name})
    for folder in drop.iterdir():
        shutil.rmtree(folder)
    return {
        "loads": last,
        "listed": len(ours),
        "resident": len(resident),
        "seconds_to_last_load": round(elapsed - 5 if want is None else elapsed, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--cpu-loras", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    header("capacity-aware warm set", "bench.capacity", argv)
    with scratch() as work:
        model = tiny_model()
        source = real_adapter(model, large=False)
        cpu = args.cpu_loras
        with vllm_context(
            model,
            work,
            plugins=True,
            extra_args=["--max-loras", str(min(cpu, 4)), "--max-cpu-loras", str(cpu)],
        ) as ctx:
            before = phase(
                ctx, work, source, args.adapters, warm_limit=args.adapters, label="before"
            )
            after = phase(ctx, work, source, args.adapters, warm_limit=None, label="after")
    rows = [
        [label, f["loads"], f["listed"], f["resident"], f["seconds_to_last_load"]]
        for label, f in (("before: every adapter", before), ("after: what fits", after))
    ]
    print(
        table(
            ["warm set", "loads (stalls)", "listed", "resident", "s to last load"],
            rows,
        )
    )
    if after["loads"]:
        print(f"loads before/after: {before['loads'] / after['loads']:.1f}x")
    dump_json(
        args.json, {"adapters": args.adapters, "cpu_loras": cpu, "before": before, "after": after}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
