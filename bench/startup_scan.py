"""Start-up scan side by side: the daemon's first scan of N folders (cold: every snapshot made;
restart: snapshots, digests and verdicts in place), its peak RSS, and what the periodic work
costs, for this tree and an earlier one, alternating in one run. No vLLM is needed: the scan
is what `/readyz` waits for, and it talks to no server.

Each sample is a fresh Python process (`python -m bench.startup_scan --child ...`) that
imports the daemon of the tree named, builds it from settings (`vllm_urls` unreachable,
`log_level` info, JSON logs to /dev/null) and times `Intake.rescan()`; its CPU and peak RSS
come from `getrusage`. The folders are those of `bench.scale` (copies of one 131 KiB synthetic
PEFT adapter for the tiny model, backdated past the settle period).

    .venv/bin/python -m bench.startup_scan --before /tmp/before-tree [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.unit.adapters import lora_tensors, write_adapter

from bench.common import dump_json, header, scratch, table

HERE = Path(__file__).resolve().parent.parent
HIDDEN, LAYERS = 256, 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.startup_scan", description=__doc__)
    parser.add_argument("--sizes", default="1000,10000", help="folder counts (1000,10000)")
    parser.add_argument("--restarts", type=int, default=5, help="restart samples per tree (5)")
    parser.add_argument("--before", type=Path, help="an earlier source tree to compare with")
    parser.add_argument("--dir", type=Path, help="where the folders go (a filesystem to test)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--child", nargs=3, metavar=("TREE", "DROP", "STATE"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def child(tree: Path, drop: Path, state: Path) -> None:
    """One scan in this process, with the daemon of `tree`; prints one JSON line."""
    sys.path[:0] = [str(tree / "daemon"), str(tree / "plugin")]
    from lorawarm import logs
    from lorawarm.daemon import Daemon
    from lorawarm.settings import load

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    logs.configure("json", "info")
    settings = load(
        cache_dir=drop, state_dir=state, vllm_urls=["http://127.0.0.1:9"], status_port=0
    )

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    async def main() -> dict[str, float]:
        daemon = Daemon(settings)
        c0, t0 = cpu(), time.perf_counter()
        await daemon.intake.rescan()
        scan, scan_cpu = time.perf_counter() - t0, cpu() - c0
        c0 = cpu()
        await daemon.intake.rescan()  # what a periodic full rescan of the same folders costs
        full = cpu() - c0
        light = float("nan")
        if hasattr(daemon.intake, "rescan_changed"):
            await daemon.intake.rescan_changed()  # records the stamps
            c0 = cpu()
            await daemon.intake.rescan_changed()
            light = cpu() - c0
        c0 = cpu()
        keep = [r.snapshot.path for r in daemon.catalog if r.snapshot is not None]
        daemon.store.collect(keep, grace=300)
        collect = cpu() - c0
        daemon.intake.stop()
        return {
            "scan_s": scan,
            "scan_cpu_s": scan_cpu,
            "full_rescan_cpu_s": full,
            "light_rescan_cpu_s": light,
            "collect_cpu_s": collect,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    print(json.dumps(asyncio.run(main())), file=sys.stderr)


def sample(tree: Path, drop: Path, state: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.startup_scan", "--child", str(tree), str(drop), str(state)],
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": f"{tree}/daemon:{tree}/plugin:{HERE}"},
        capture_output=True,
        text=True,
        check=True,
    )
    figures: dict[str, float] = json.loads(done.stderr.strip().splitlines()[-1])
    return figures


def populate(work: Path, drop: Path, size: int) -> None:
    tensors = lora_tensors(r=8, hidden=HIDDEN, layers=LAYERS)
    source = write_adapter(work / "source", r=8, base_model="/tiny-llama", tensors=tensors)
    files = [f for f in source.iterdir() if f.is_file()]
    stamp = time.time() - 3600
    for i in range(size):
        folder = drop / f"s{size}-{i:05d}"
        folder.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, folder / f.name)
            os.utime(folder / f.name, (stamp, stamp))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    trees = [("after", HERE)]
    if args.before is not None:
        trees.insert(0, ("before", args.before.resolve()))
    results: dict[str, Any] = {"sizes": []}
    for size in (int(s) for s in args.sizes.split(",") if s):
        drop = work / f"drop-{size}"
        populate(work, drop, size)
        figures: dict[str, Any] = {"folders": size}
        for label, tree in trees:
            state = work / f"state-{size}-{label}"
            cold = sample(tree, drop, state)
            print(f"{size} folders, {label}: cold scan {cold['scan_s']:.2f} s", flush=True)
            figures[label] = {"cold": cold, "restarts": []}
        for i in range(args.restarts):  # alternating, so both see the same machine
            for label, tree in trees:
                got = sample(tree, drop, work / f"state-{size}-{label}")
                figures[label]["restarts"].append(got)
                print(f"{size} folders, {label}: restart {i + 1} scan {got['scan_s']:.2f} s")
        results["sizes"].append(figures)
    return results


def median(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def ratio(after: list[dict[str, float]], before: list[dict[str, float]], key: str) -> float:
    return median(after, key) / median(before, key)


def report(results: dict[str, Any]) -> None:
    rows = []
    for figures in results["sizes"]:
        for label in ("before", "after"):
            if label not in figures:
                continue
            cold, restarts = figures[label]["cold"], figures[label]["restarts"]
            rows.append(
                [
                    f"{figures['folders']:,}",
                    label,
                    f"{cold['scan_s']:.2f} s",
                    f"{median(restarts, 'scan_s'):.2f} s",
                    " / ".join(f"{r['scan_s']:.2f}" for r in restarts),
                    f"{median(restarts, 'full_rescan_cpu_s'):.3f} s",
                    f"{median(restarts, 'light_rescan_cpu_s'):.3f} s",
                    f"{median(restarts, 'collect_cpu_s'):.3f} s",
                    f"{max(r['peak_rss_mb'] for r in restarts):.0f} MB",
                ]
            )
    print()
    print("## Start-up scan, in process (what /readyz waits for), medians")
    print(
        table(
            [
                "folders",
                "tree",
                "cold scan",
                "restart scan, median",
                "restart samples (s)",
                "CPU of a full rescan",
                "CPU of a light rescan",
                "CPU of a collection walk",
                "peak RSS (scan process)",
            ],
            rows,
        )
    )
    ratios = []
    for figures in results["sizes"]:
        if "before" in figures:
            b, a = figures["before"], figures["after"]
            ratios.append(
                [
                    f"{figures['folders']:,}",
                    f"{a['cold']['scan_s'] / b['cold']['scan_s']:.2f}x",
                    f"{median(a['restarts'], 'scan_s') / median(b['restarts'], 'scan_s'):.2f}x",
                    f"{ratio(a['restarts'], b['restarts'], 'collect_cpu_s'):.2f}x",
                ]
            )
    if ratios:
        print()
        print("after / before, same run:")
        print(table(["folders", "cold scan", "restart scan", "collection walk"], ratios))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        tree, drop, state = (Path(p) for p in args.child)
        child(tree, drop, state)
        return 0
    header("startup_scan", "bench.startup_scan", argv)
    if args.dir is not None:
        work = Path(args.dir) / f"startup-scan-{os.getpid()}"
        work.mkdir(parents=True)
        try:
            results = run(args, work)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    else:
        with scratch(args.keep) as work:
            results = run(args, work)
    report(results)
    dump_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
