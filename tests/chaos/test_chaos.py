"""Chaos: a seeded random sequence of adapter-folder operations, interleaved with SIGKILLs and
restarts of one real vLLM CPU server and of the real `lorawarm run`.

At the end the server holds exactly the warm set that the test computes on its own from the
drop directory, every invalid folder is reported with the reason inspection gives, vLLM's
`/health` was 200 whenever the server was up, and no snapshot or staging leftover remains.

The sequence of operations depends only on the seed (the test is the only writer of the drop
directory), so a failure is replayed with the seed its message prints:

    LORAWARM_CHAOS_SEED=<seed> flock /tmp/lorawarm-vllm.lock .venv/bin/pytest tests/chaos

Knobs (environment): LORAWARM_CHAOS_SEED, LORAWARM_CHAOS_OPS (300), LORAWARM_CHAOS_VLLM_RESTARTS
(2), LORAWARM_CHAOS_DAEMON_RESTARTS (2), LORAWARM_CHAOS_PAUSE (1.0: scales the pauses between
operations). The long form: LORAWARM_CHAOS_OPS=3000 LORAWARM_CHAOS_VLLM_RESTARTS=6
LORAWARM_CHAOS_DAEMON_RESTARTS=12 LORAWARM_CHAOS_PAUSE=0.4.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorawarm.inspection import CONFIG_FILE, Invalid, Result, Rules, Valid, inspect_adapter
from tests.conftest import AdapterFactory
from tests.support.daemon_proc import LorawarmProcess, lora_models
from tests.support.vllm_server import VllmServer, completion

pytestmark = pytest.mark.e2e


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


SEED = _env_int("LORAWARM_CHAOS_SEED", 20261129)
OPS = _env_int("LORAWARM_CHAOS_OPS", 300)
VLLM_RESTARTS = _env_int("LORAWARM_CHAOS_VLLM_RESTARTS", 2)
DAEMON_RESTARTS = _env_int("LORAWARM_CHAOS_DAEMON_RESTARTS", 2)
PAUSE = float(os.environ.get("LORAWARM_CHAOS_PAUSE") or 1.0)
# The CI-sized form must end within 8 minutes; the long form gets what its size needs.
TIMEOUT = 480 + int(max(OPS - 300, 0) * PAUSE * 0.7) + 150 * max(VLLM_RESTARTS - 2, 0)

MAX_RANK = 16
WARM_LIMIT = 4
FLAT = tuple(f"chaos-{i:02d}" for i in range(10))
POOL = (*FLAT, "team/alpha", "team/beta")  # two `org/name` adapters share the folder `team`
PINNED = FLAT[0]
WEIGHTS = "adapter_model.safetensors"
SOURCES = ((0, 8), (1, 8), (2, 8), (3, 8), (4, 4))  # real PEFT adapters: (seed, rank)
KINDS = {
    "create": 12,  # cp -r in place
    "publish": 12,  # cp -r to a dot-staging folder, then mv into place
    "modify": 18,  # rewrite lora_alpha, or swap the weights for another seed's
    "replace": 10,  # rm -rf, then new content
    "delete": 10,
    "corrupt": 14,  # truncate weights, break JSON, r above the max rank, weights of another rank
    "rename": 10,  # mv name_a name_b
    "request": 6,  # a 1-token completion naming a pool adapter (re-reads evicted adapters)
}
_DIGEST = re.compile(r"[0-9a-f]{32}")


class HealthWatch:
    """Polls vLLM's /health from a thread; a non-200 inside an "up" window is a violation.

    The test closes the window before it kills the server and opens it once /health answered
    200 after the restart; the epoch counter drops probes that straddle a window change.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.polls = 0
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._up = False
        self._epoch = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-health", daemon=True)

    def set_up(self, up: bool) -> None:
        with self._lock:
            self._up = up
            self._epoch += 1

    def window(self) -> tuple[bool, int]:
        with self._lock:
            return self._up, self._epoch

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                up, epoch = self.window()
                if up:
                    try:
                        answer = str(client.get(f"{self.url}/health").status_code)
                    except httpx.HTTPError as err:
                        answer = repr(err)
                    self.polls += 1
                    if answer != "200" and self.window() == (True, epoch):
                        self.violations.append(f"{time.strftime('%H:%M:%S')} /health: {answer}")
                self._stop.wait(0.2)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


@dataclass
class Chaos:
    """The random operations on the drop directory, and the kills and restarts."""

    rng: random.Random
    drop: Path
    sources: dict[tuple[int, int], Path]
    server: VllmServer
    daemon: LorawarmProcess
    health: HealthWatch
    log: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    vllm_startups: list[float] = field(default_factory=list)
    request_errors: list[str] = field(default_factory=list)
    daemon_restarts: int = 0
    _vllm_thread: threading.Thread | None = None
    _vllm_error: BaseException | None = None

    # -- the filesystem operations -----------------------------------------------------------
    def present(self, name: str) -> bool:
        return (self.drop / name).is_dir()

    def step(self, index: int) -> None:
        rng = self.rng
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        present = [n for n in POOL if self.present(n)]
        absent = [n for n in POOL if n not in present]
        if kind in ("create", "publish", "rename") and not absent:
            kind = "delete"
        if kind not in ("create", "publish", "request") and not present:
            kind = "create"
        name = rng.choice(
            POOL if kind == "request" else absent if kind in ("create", "publish") else present
        )
        detail = getattr(self, f"_{kind}")(name)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.log.append(f"{index:5d} {time.monotonic():.2f} {kind} {name} {detail}")

    def _source(self) -> tuple[tuple[int, int], Path]:
        key = self.rng.choice(SOURCES)
        return key, self.sources[key]

    def _cp(self, src: Path, dest: Path) -> None:
        dest.parent.mkdir(exist_ok=True)
        subprocess.run(["cp", "-r", str(src), str(dest)], check=True)

    def _tidy(self, name: str) -> None:
        """After an `org/name` left: remove the emptied org folder, or (sometimes) leave it."""
        parent = (self.drop / name).parent
        if parent != self.drop and not any(parent.iterdir()) and self.rng.random() < 0.7:
            parent.rmdir()

    def _create(self, name: str) -> str:
        key, src = self._source()
        self._cp(src, self.drop / name)
        return f"source={key}"

    def _publish(self, name: str) -> str:
        key, src = self._source()
        staging = self.drop / f".{name.replace('/', '-')}.tmp"
        self._cp(src, staging)
        (self.drop / name).parent.mkdir(exist_ok=True)
        staging.rename(self.drop / name)
        return f"source={key}"

    def _config(self, name: str) -> dict[str, Any]:
        """The folder's config, or (when it is broken) a good one from a source."""
        try:
            data = json.loads((self.drop / name / CONFIG_FILE).read_text())
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = json.loads((self.sources[SOURCES[0]] / CONFIG_FILE).read_text())
        return data

    def _write_config(self, name: str, data: dict[str, Any]) -> None:
        # In place (truncate, then write), as an editor without atomic saves does.
        (self.drop / name / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")

    def _modify(self, name: str) -> str:
        if self.rng.random() < 0.5:
            data = self._config(name)
            data["lora_alpha"] = self.rng.choice([8, 16, 24, 32, 64])
            self._write_config(name, data)
            return f"lora_alpha={data['lora_alpha']}"
        key = self.rng.choice([k for k in SOURCES if k[1] == 8])
        shutil.copyfile(self.sources[key] / WEIGHTS, self.drop / name / WEIGHTS)
        return f"weights={key}"

    def _replace(self, name: str) -> str:
        shutil.rmtree(self.drop / name)
        key, src = self._source()
        self._cp(src, self.drop / name)
        return f"source={key}"

    def _delete(self, name: str) -> str:
        shutil.rmtree(self.drop / name)
        self._tidy(name)
        return ""

    def _corrupt(self, name: str) -> str:
        how = self.rng.choice(["truncate", "json", "rank", "rank_mismatch"])
        weights = self.drop / name / WEIGHTS
        if how == "truncate":
            size = weights.stat().st_size
            keep = self.rng.randint(0, max(size - 1, 0))
            os.truncate(weights, keep)
            return f"truncate={keep}"
        if how == "json":
            text = (self.drop / name / CONFIG_FILE).read_text()
            keep = self.rng.randint(1, max(len(text) - 3, 1))
            (self.drop / name / CONFIG_FILE).write_text(text[:keep])
            return f"json={keep}"
        if how == "rank":
            data = self._config(name)
            data["r"] = MAX_RANK * 2
            self._write_config(name, data)
            return f"r={data['r']}"
        shutil.copyfile(self.sources[SOURCES[-1]] / WEIGHTS, weights)
        return "weights=rank4"

    def _rename(self, name: str) -> str:
        target = self.rng.choice([n for n in POOL if not self.present(n)])
        (self.drop / target).parent.mkdir(exist_ok=True)
        (self.drop / name).rename(self.drop / target)
        self._tidy(name)
        return f"-> {target}"

    def _request(self, name: str) -> str:
        up, epoch = self.health.window()
        if not up:
            return "vllm down"
        try:
            response = completion(self.server.url, name, "Hello", max_tokens=1, timeout=30)
        except httpx.HTTPError as err:
            answer = repr(err)
        else:
            answer = str(response.status_code)
            if response.status_code < 500:
                return answer
        if self.health.window() == (True, epoch):
            self.request_errors.append(f"completion {name}: {answer}")
        return answer

    # -- kills and restarts -----------------------------------------------------------------
    def kill_vllm(self) -> None:
        self.await_vllm()  # a restart still under way finishes first
        self.health.set_up(False)
        self.server.kill()
        self.server.start()
        self._vllm_thread = threading.Thread(target=self._wait_vllm, name="chaos-vllm-start")
        self._vllm_thread.start()
        self.log.append(f"      {time.monotonic():.2f} vllm SIGKILL + start")

    def _wait_vllm(self) -> None:
        try:
            self.vllm_startups.append(self.server.wait_healthy(timeout=300))
            self.health.set_up(True)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread by await_vllm
            self._vllm_error = err

    def await_vllm(self, *, check: bool = True) -> None:
        if self._vllm_thread is not None:
            self._vllm_thread.join()
            self._vllm_thread = None
        if check and self._vllm_error is not None:
            raise AssertionError(f"vLLM did not come back: {self._vllm_error}")

    def kill_daemon(self) -> None:
        self.daemon.kill()
        self.log.append(f"      {time.monotonic():.2f} lorawarm SIGKILL")

    def start_daemon(self) -> None:
        self.daemon.start()
        self.daemon_restarts += 1
        self.log.append(f"      {time.monotonic():.2f} lorawarm start")

    def pause(self) -> None:
        # Bursts of back-to-back operations, then quiet spells longer than the settle period.
        if self.rng.random() < 0.7:
            time.sleep(self.rng.uniform(0, 0.05) * PAUSE)
        else:
            time.sleep(self.rng.uniform(0.3, 3.0) * PAUSE)


def _schedule(rng: random.Random, count: int, low: float, high: float) -> list[int]:
    """`count` operation indices, one in the [low, high) part of each of `count` equal spans."""
    span = OPS / max(count, 1)
    return [int(span * (i + rng.uniform(low, high))) for i in range(count)]


def _folders(drop: Path) -> dict[str, Path]:
    """The adapter folders in the drop directory: `name`, and `org/name` inside a folder that
    holds nothing but folders; dot-entries are staging, not adapters."""
    found: dict[str, Path] = {}
    for top in sorted(drop.iterdir()):
        if top.name.startswith(".") or not top.is_dir():
            continue
        children = [c for c in top.iterdir() if not c.name.startswith(".")]
        if children and all(c.is_dir() and not c.is_symlink() for c in children):
            found.update({f"{top.name}/{c.name}": c for c in children})
        else:
            found[top.name] = top
    return found


def _newest_first(results: dict[str, Result]) -> list[str]:
    """The valid folders in warm order: pinned first, then newest by file mtime (ties by
    name)."""
    valid = {n: r for n, r in results.items() if isinstance(r, Valid)}
    order = [PINNED] if PINNED in valid else []
    order += sorted(
        (n for n in valid if n not in order),
        key=lambda n: (-valid[n].newest_mtime_ns / 1e9, n),
    )
    return order


def _snapshot_dirs(state: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, _files in os.walk(state / "snapshots"):
        dirnames[:] = [d for d in dirnames if d != ".staging"]
        found.update(os.path.join(dirpath, d) for d in dirnames if _DIGEST.fullmatch(d))
    return found


def _stale_ok(name: str, result: Invalid, doc: dict[str, Any], rules: Rules) -> bool:
    """An invalid folder whose last valid version stays served: the status says why the new
    content is not (inspection's reason) and the snapshot it serves is itself valid."""
    if doc["snapshot_path"] is None or doc["pending_reason"] != str(result.reason):
        return False
    snap = Path(doc["snapshot_path"])
    return isinstance(
        inspect_adapter(snap, root=snap.parents[1 + name.count("/")], rules=rules, name=name), Valid
    )


def _problems(
    expected: dict[str, Result], daemon: LorawarmProcess, server: VllmServer, rules: Rules
) -> tuple[list[str], list[str]]:
    """Every way the daemon's and the server's state differ from the expected end state, and
    the names the server should hold.

    A folder that is invalid now may still be served at its last valid version (the daemon saw
    one since it last started): then where it sits in the warm order is not known from the drop
    directory, so the check is that the warm set is full, holds the pinned adapter, and holds
    the valid folders as a prefix of their own newest-first order.
    """
    problems: list[str] = []
    docs = {a["name"]: a for a in daemon.get("/v1/adapters").json()["adapters"]}
    if set(docs) != set(expected):
        problems.append(
            f"status lists {sorted(set(docs) - set(expected))} that are not in the drop dir and "
            f"misses {sorted(set(expected) - set(docs))}"
        )
    stale: set[str] = set()
    for name, result in sorted(expected.items()):
        doc = docs.get(name)
        if doc is None:
            continue
        if isinstance(result, Invalid):
            if _stale_ok(name, result, doc, rules):
                stale.add(name)
            elif (doc["state"], doc["reason"]) != ("invalid", str(result.reason)):
                problems.append(
                    f"{name}: status {doc['state']}/{doc['reason']}/{doc['pending_reason']}, "
                    f"inspection says invalid/{result.reason}"
                )
            continue
        snap = doc["snapshot_path"]
        if snap is None:
            problems.append(f"{name}: status {doc['state']}/{doc['reason']}, no snapshot")
            continue
        for file in (CONFIG_FILE, result.weights):
            try:
                same = (Path(snap) / file).read_bytes() == (result.path / file).read_bytes()
            except OSError as err:
                same, file = False, f"{file} ({err.strerror})"
            if not same:
                problems.append(f"{name}: snapshot {snap} {file} differs from the drop dir")
    loaded = lora_models(server.url)
    order = _newest_first(expected)
    servable = len(order) + len(stale)
    if len(loaded) != min(WARM_LIMIT, servable):
        problems.append(f"/v1/models LoRAs {sorted(loaded)}: expected {min(WARM_LIMIT, servable)}")
    if order and order[0] == PINNED and PINNED not in loaded:
        problems.append(f"the pinned {PINNED} is not loaded: {sorted(loaded)}")
    held = [n for n in order if n in loaded]
    if held != order[: len(held)]:
        problems.append(f"valid folders loaded {held} are not the newest of {order}")
    for name in sorted(set(loaded) - set(order) - stale):
        problems.append(f"{name} is loaded but neither valid nor served at a valid version")
    for name in sorted(set(order) | stale):
        doc = docs.get(name)
        if doc is None:
            continue
        want = "loaded" if name in loaded else "cold"
        if doc["state"] != want:
            problems.append(f"{name}: status {doc['state']}, expected {want}")
        if name in loaded and loaded[name] != doc["snapshot_path"]:
            problems.append(f"{name}: loaded from {loaded[name]}, status {doc['snapshot_path']}")
    referenced = {d["snapshot_path"] for d in docs.values() if d["snapshot_path"]}
    referenced |= set(loaded.values())
    stray = sorted(_snapshot_dirs(daemon.state_dir) - referenced)
    if stray:
        problems.append(f"unreferenced snapshots left: {stray}")
    staging = daemon.state_dir / "snapshots" / ".staging"
    if staging.is_dir() and any(staging.iterdir()):
        problems.append(f"staging not empty: {sorted(p.name for p in staging.iterdir())}")
    return problems, sorted(loaded)


@pytest.fixture
def sources(adapters: AdapterFactory) -> dict[tuple[int, int], Path]:
    return {(seed, r): adapters.source(seed=seed, r=r) for seed, r in SOURCES}


@pytest.fixture
def server(tiny_model: Path, tmp_path: Path) -> Iterator[VllmServer]:
    vllm = VllmServer(
        tiny_model,
        extra_args=["--max-loras", "2", "--max-cpu-loras", "4"],
        log_path=tmp_path / "vllm.log",
    )
    try:
        yield vllm
    finally:
        vllm.kill()


@pytest.mark.timeout(TIMEOUT)
def test_chaos(
    tmp_path: Path,
    tiny_model: Path,
    sources: dict[tuple[int, int], Path],
    server: VllmServer,
) -> None:
    """A seeded random mix of folder operations and kills ends in exactly the expected state."""
    started = time.monotonic()
    rng = random.Random(SEED)  # noqa: S311 - a reproducible test sequence, not cryptography
    drop, state = tmp_path / "drop", tmp_path / "state"
    drop.mkdir()
    env = {
        "LORAWARM_SETTLE_SECONDS": "0.5",
        "LORAWARM_HEALTH_SECONDS": "0.5",
        "LORAWARM_MAX_BACKOFF_SECONDS": "2",
        "LORAWARM_RESYNC_SECONDS": "2",
        "LORAWARM_SNAPSHOT_GRACE_SECONDS": "0",
        "LORAWARM_WARM_LIMIT": str(WARM_LIMIT),
        "LORAWARM_PINNED": PINNED,
        "LORAWARM_MAX_LORA_RANK": str(MAX_RANK),
        "LORAWARM_BASE_MODEL": str(tiny_model),
        "LORAWARM_LOG_LEVEL": "info",
    }
    rules = Rules(max_lora_rank=MAX_RANK, base_model=str(tiny_model))
    daemon = LorawarmProcess(drop, state, [server.url], env=env, log_path=tmp_path / "lw.log")
    replay = (
        f"chaos seed {SEED} (replay: LORAWARM_CHAOS_SEED={SEED} LORAWARM_CHAOS_OPS={OPS} "
        f"LORAWARM_CHAOS_VLLM_RESTARTS={VLLM_RESTARTS} "
        f"LORAWARM_CHAOS_DAEMON_RESTARTS={DAEMON_RESTARTS} LORAWARM_CHAOS_PAUSE={PAUSE}); "
        f"ops log {tmp_path / 'ops.log'}, lorawarm log {daemon.log_path}, "
        f"vLLM log {server.log_path}"
    )
    vllm_kills = set(_schedule(rng, VLLM_RESTARTS, 0.2, 0.6))
    daemon_kills = {i: i + rng.randint(0, 8) for i in _schedule(rng, DAEMON_RESTARTS, 0.05, 0.85)}
    daemon_starts = set(daemon_kills.values())

    print(replay)  # shown with the captured output of a failure, a timeout included
    with HealthWatch(server.url) as health:
        chaos = Chaos(rng, drop, sources, server, daemon, health)
        try:
            server.start()
            chaos.vllm_startups.append(server.wait_healthy(timeout=300))
            health.set_up(True)
            daemon.start()
            daemon.wait_ready()
            for index in range(OPS):
                if index in vllm_kills:
                    chaos.kill_vllm()
                if index in daemon_kills:
                    chaos.kill_daemon()
                if index in daemon_starts:
                    chaos.start_daemon()
                if daemon.process is not None and daemon.process.poll() not in (None, -9):
                    raise AssertionError(f"lorawarm exited by itself: {daemon.process.returncode}")
                chaos.step(index)
                chaos.pause()
            ops_done = time.monotonic()
            chaos.await_vllm()
            if daemon.process is None or daemon.process.poll() is not None:
                chaos.start_daemon()
            daemon.wait_ready()

            time.sleep(1.0)  # past the settle period: the drop directory is final now
            folders = _folders(drop)
            expected = {
                n: inspect_adapter(p, root=drop, rules=rules, name=n) for n, p in folders.items()
            }
            deadline = time.monotonic() + 120
            stable_since: float | None = None
            while True:
                problems, warm = _problems(expected, daemon, server, rules)
                now = time.monotonic()
                if problems:
                    stable_since = None
                elif stable_since is None:
                    stable_since = now
                elif now - stable_since >= 4:  # two resync periods without a change
                    break
                if now > deadline:
                    raise AssertionError("no convergence: " + "; ".join(problems))
                time.sleep(0.5)
            converged = time.monotonic()

            assert daemon.process is not None
            assert daemon.process.poll() is None, "lorawarm exited"
            crashes = [
                line
                for line in daemon.log_text().splitlines()
                if any(
                    k in line
                    for k in ("task_crashed", "hint_failed", "adapter_intake_failed", "Traceback")
                )
            ]
            assert not crashes, f"lorawarm logged crashes: {crashes[:5]}"
            assert not health.violations, f"/health failed while up: {health.violations}"
            assert not chaos.request_errors, f"5xx completions: {chaos.request_errors}"
            assert health.polls > 0
            assert len(chaos.vllm_startups) == 1 + VLLM_RESTARTS
            assert chaos.daemon_restarts >= DAEMON_RESTARTS
            counts = daemon.get("/v1/adapters").json()["counts"]
            print(
                f"\nchaos seed {SEED}: {OPS} ops {dict(sorted(chaos.counts.items()))}, "
                f"{VLLM_RESTARTS} vLLM kills (startups {[round(s) for s in chaos.vllm_startups]} s)"
                f", {chaos.daemon_restarts} lorawarm kills, {health.polls} /health probes; "
                f"final {len(expected)} folders, states {counts}, loaded {warm}; "
                f"ops {ops_done - started:.0f} s, converged after {converged - ops_done:.0f} s, "
                f"total {time.monotonic() - started:.0f} s"
            )
        except Exception as err:
            raise AssertionError(f"{replay}\n{type(err).__name__}: {err}") from err
        finally:
            (tmp_path / "ops.log").write_text("\n".join(chaos.log) + "\n")
            daemon.kill()
            server.kill()
            chaos.await_vllm(check=False)
