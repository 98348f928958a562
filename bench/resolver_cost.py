"""Resolver cost: what the lorawarm plugin adds to resolving a ~54 MB adapter, against vLLM's
built-in filesystem resolver on the same folder.

In-process (no server): both resolvers' `resolve_lora(base_model_name, lora_name)` called
directly, as vLLM calls them:

- built-in `FilesystemResolver`: reads adapter_config.json, checks peft_type and base model;
- lorawarm, first resolve of a folder: inspection (config, containment, safetensors header),
  one read of the source into a fresh snapshot (a `FICLONE` reflink and a hash of the clone
  where the filesystem shares extents, else a copy while hashing), inspection of the copy,
  rename (the fsync runs afterwards in a background thread, off the request);
  with the source in the page cache, and with the source evicted first (`posix_fadvise`);
- lorawarm, the same name again in the same process (inspection + cached snapshot);
- lorawarm in a new process with the snapshot already on disk (inspection + digest).

End to end (unless `--no-e2e`): a real vLLM CPU server with both plugins; the first completion
(one token, not streamed) naming a new adapter resolved by each, minus the same completion once
warm: the difference is what each resolver plus vLLM's load adds to a cold request.

    flock /tmp/lorawarm-vllm.lock .venv/bin/python -m bench.resolver_cost [--repeats 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchContext,
    BenchError,
    adapter_bytes,
    dump_json,
    header,
    large_model,
    ms,
    real_adapter,
    scratch,
    stream_completion,
    summarize,
    table,
    tiny_model,
    vllm_context,
)
from lorawarm import snapshot as snapshot_module
from lorawarm.inspection import Rules
from lorawarm.snapshot import SnapshotStore
from lorawarm_vllm import resolver as resolver_module
from lorawarm_vllm.resolver import LorawarmResolver


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.resolver_cost", description=__doc__)
    parser.add_argument("--repeats", type=int, default=10, help="resolves per case (10)")
    parser.add_argument("--trials", type=int, default=6, help="end-to-end adapters per way (6)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the vLLM server part")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny model and rank-8 adapters (smoke runs)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="put the in-process drop and state dirs here (e.g. on a loop-mounted XFS with "
        "reflink=1) instead of the scratch directory",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (clean pages only; no root needed)."""
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@contextlib.contextmanager
def timed_calls(targets: Mapping[str, tuple[Any, str]]) -> Iterator[dict[str, list[float]]]:
    """Temporarily wrap functions (label -> (module, attribute)) to time every call."""
    spent: dict[str, list[float]] = {label: [] for label in targets}
    originals = [
        (label, module, attr, getattr(module, attr))
        for label, (module, attr) in targets.items()
        if hasattr(module, attr)
    ]

    def wrap(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label].append(time.perf_counter() - started)

        return timed

    for label, module, attr, fn in originals:
        setattr(module, attr, wrap(label, fn))
    try:
        yield spent
    finally:
        for _, module, attr, fn in originals:
            setattr(module, attr, fn)


#: The steps of a first resolve, timed by wrapping the functions that do them.
STEPS: dict[str, tuple[Any, str]] = {
    "inspection of the drop folder": (resolver_module, "inspect_adapter"),
    # Only in trees before issue 15, which read the source twice: a digest, then the copy.
    "digest of the source before copying (earlier trees)": (snapshot_module, "_digest"),
    "copy into staging (clone + sha256, or read + sha256 + write)": (snapshot_module, "_copy"),
    "inspection of the copy": (snapshot_module, "inspect_adapter"),
}


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (`/proc/mounts`, longest mount point)."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(
                best
            ):
                best, kind = point, fstype
    return f"{kind} ({best})"


async def in_process(
    work: Path, model: Path, source: Path, repeats: int, max_rank: int
) -> dict[str, Any]:
    fs_module = importlib.import_module("vllm.plugins.lora_resolvers.filesystem_resolver")
    drop = work / "inproc-drop"
    drop.mkdir()
    name = "big"
    folder = Path(shutil.copytree(source, drop / name))
    # Digests (and verdicts) are remembered only for files whose ctime is over a second old
    # (lorawarm.snapshot.STABLE_NS): the "new process" case is a restart, long after the copy.
    await asyncio.sleep(1.2)
    base = str(model)
    rules = Rules(max_lora_rank=max_rank)
    series: dict[str, list[float]] = {}

    async def resolve(resolver: Any) -> float:
        started = time.perf_counter()
        request = await resolver.resolve_lora(base, name)
        elapsed = time.perf_counter() - started
        if request is None:
            raise BenchError(f"{resolver!r} did not resolve {folder}")
        return elapsed

    builtin = fs_module.FilesystemResolver(str(drop))
    await resolve(builtin)  # first call imports nothing more, but be fair to both
    series["built-in filesystem resolver"] = [await resolve(builtin) for _ in range(repeats)]

    breakdown: dict[str, list[float]] = {}
    first, cold, again, on_disk = [], [], [], []
    for i in range(repeats):
        for evicted in (False, True):
            state = work / f"inproc-state-{i}-{int(evicted)}"
            resolver = LorawarmResolver(drop, SnapshotStore(state), rules)
            if evicted:
                evict(folder)
            with timed_calls(STEPS) as spent:
                (cold if evicted else first).append(await resolve(resolver))
            if not evicted:
                for key, values in spent.items():
                    breakdown.setdefault(key, []).extend(values)
                again.append(await resolve(resolver))
                fresh = LorawarmResolver(drop, SnapshotStore(state), rules)
                on_disk.append(await resolve(fresh))
            shutil.rmtree(state, ignore_errors=True)
    series["lorawarm plugin, first resolve (new snapshot)"] = first
    series["lorawarm plugin, first resolve, source not in page cache"] = cold
    series["lorawarm plugin, same name again (snapshot cached)"] = again
    series["lorawarm plugin, new process, snapshot on disk"] = on_disk
    return {"series": series, "breakdown": breakdown}


def end_to_end(ctx: BenchContext, source: Path, trials: int) -> dict[str, list[float]]:
    """First one-token completion through each resolver, and the same request once warm."""
    out: dict[str, list[float]] = {"lorawarm plugin": [], "built-in filesystem resolver": []}
    warm: dict[str, list[float]] = {k: [] for k in out}
    with httpx.Client(timeout=600) as client:
        for trial in range(trials + 1):  # trial 0 warms the engine up
            order = list(out) if trial % 2 == 0 else list(reversed(out))
            for way in order:
                name = f"{'lw' if way.startswith('lorawarm') else 'fs'}-e2e-{trial:03d}"
                target = ctx.plugin_drop if way.startswith("lorawarm") else ctx.fs_drop
                shutil.copytree(source, target / name)
                time.sleep(0.5)
                cold = stream_completion(client, ctx.url, name, max_tokens=1).total
                hot = statistics.median(
                    stream_completion(client, ctx.url, name, max_tokens=1).total for _ in range(3)
                )
                if trial > 0:
                    out[way].append(cold - hot)
                    warm[way].append(hot)
    return {
        **{f"{k} (added)": v for k, v in out.items()},
        **{f"{k} (warm)": v for k, v in warm.items()},
    }


def run(
    ctx: BenchContext | None, work: Path, model: Path, source: Path, args: argparse.Namespace
) -> dict[str, Any]:
    size_mb = adapter_bytes(source) / 1e6
    max_rank = 64
    print(f"adapter: {source} ({size_mb:.1f} MB)", flush=True)
    where = args.work_dir if args.work_dir is not None else work
    if args.work_dir is not None:
        where = Path(tempfile.mkdtemp(prefix="lorawarm-bench-", dir=args.work_dir))
    print(f"in-process drop and state dirs on: {filesystem(where)}", flush=True)
    try:
        inproc = asyncio.run(in_process(where, model, source, args.repeats, max_rank))
    finally:
        if args.work_dir is not None:
            shutil.rmtree(where, ignore_errors=True)
    builtin = summarize(inproc["series"]["built-in filesystem resolver"])
    rows = []
    for case, samples in inproc["series"].items():
        s = summarize(samples)
        rows.append([case, s.n, ms(s.p50), ms(s.p95), f"{(s.p50 - builtin.p50) * 1000:+.1f} ms"])
    print()
    print(f"## Resolver cost in-process, {size_mb:.0f} MB adapter (`resolve_lora` only)")
    print(table(["resolver, case", "n", "p50", "p95", "p50 - built-in p50"], rows))
    print()
    print("lorawarm first resolve, where the time goes (p50 per call):")
    print(
        table(
            ["step", "p50"],
            [[k, ms(summarize(v).p50)] for k, v in inproc["breakdown"].items() if v],
        )
    )
    figures: dict[str, Any] = {
        "filesystem": filesystem(where),
        "adapter_mb": size_mb,
        "in_process": {k: summarize(v).as_dict() for k, v in inproc["series"].items()},
        "breakdown": {k: summarize(v).as_dict() for k, v in inproc["breakdown"].items()},
    }
    if ctx is not None:
        e2e = end_to_end(ctx, source, args.trials)
        rows = [
            [k, summarize(v).n, ms(summarize(v).p50), ms(summarize(v).p95)] for k, v in e2e.items()
        ]
        added_lw = summarize(e2e["lorawarm plugin (added)"]).p50
        added_fs = summarize(e2e["built-in filesystem resolver (added)"]).p50
        print()
        print("## Resolver cost end to end: first 1-token completion minus the same once warm")
        print(table(["resolver", "n", "p50", "p95"], rows))
        print()
        print(
            f"the lorawarm plugin adds {(added_lw - added_fs) * 1000:+.0f} ms (p50) to a cold "
            f"request compared with the built-in resolver ({ms(added_lw)} vs {ms(added_fs)})"
        )
        figures["end_to_end"] = {k: summarize(v).as_dict() for k, v in e2e.items()}
    return figures


def main(argv: Sequence[str] | None = None, *, ctx: BenchContext | None = None) -> int:
    """Run the benchmark (end to end on `ctx`'s server when given, else on one started here)."""
    args = parse_args(argv)
    header("resolver_cost", "bench.resolver_cost", argv)
    if ctx is not None:
        model = ctx.model
        source = real_adapter(model, large=False)
        with scratch(args.keep) as work:
            figures = run(None if args.no_e2e else ctx, work, model, source, args)
    else:
        model = tiny_model() if args.tiny else large_model()
        source = real_adapter(model, large=not args.tiny)
        with scratch(args.keep) as work:
            if args.no_e2e:
                figures = run(None, work, model, source, args)
            else:
                with vllm_context(model, work, plugins=True, max_lora_rank=64) as started:
                    figures = run(started, work, model, source, args)
    dump_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
