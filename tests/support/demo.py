"""`make demo`: a real vLLM CPU server with the lorawarm plugin, the real `lorawarm run`, and two
adapters dropped in (one valid, one broken); shows the status table and a completion through
the warmed adapter, then keeps both running until Ctrl-C.

`--check` runs the same steps, asserts what they show and exits (the test suite runs it, so the
demo cannot rot). Everything lives in `.demo/` (or `--workdir`); nothing is downloaded.

Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) all stop lorawarm and vLLM, at any
step. vLLM runs in a session of its own, so nothing but this clean-up stops it; the clean-up
therefore never depends on printing (with `make demo | tee log`, Ctrl-C kills `tee` too, and
every later write to stdout fails).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tests.support.daemon_proc import LorawarmProcess, lora_models
from tests.support.models import make_adapter, make_tiny_model
from tests.support.vllm_server import VllmServer, completion

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop(BaseException):
    """A stop signal arrived (raised from the signal handler, so that every step unwinds into
    the clean-up, a wait for vLLM's start included). A BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way swallows it."""


def _on_signal(signum: int, frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def _print(text: str, *, file: TextIO | None = None) -> None:
    """Print, or nothing once the reader is gone: a failed write must never stop the demo from
    cleaning up, and later writes (and Python's final flush) must not fail again."""
    stream = sys.stdout if file is None else file
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):  # BrokenPipeError, or a stream already closed
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def _say(text: str) -> None:
    _print(f"\n== {text}")


def run_demo(workdir: Path, *, check: bool) -> int:
    """The demo's steps; returns its exit code. Stops cleanly on Ctrl-C, SIGTERM and SIGHUP."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    try:
        return _run_demo(workdir.resolve(), check=check)
    except Stop:
        return 0


def _run_demo(workdir: Path, *, check: bool) -> int:
    drop, state, sources = workdir / "drop", workdir / "state", workdir / "sources"
    for folder in (drop, state):
        shutil.rmtree(folder, ignore_errors=True)
    drop.mkdir(parents=True)

    _say("making a tiny random Llama and two real PEFT adapters (no download)")
    model = make_tiny_model(workdir / "model")
    good_src = sources / "good"
    broken_src = sources / "broken"
    if not (good_src / "adapter_config.json").exists():
        make_adapter(model, good_src, r=8, seed=1)
    if not (broken_src / "adapter_config.json").exists():
        make_adapter(model, broken_src, r=32, seed=2)  # above the server's --max-lora-rank 16

    plugin_env = {
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(drop),
        "LORAWARM_CACHE_DIR": str(drop),
        "LORAWARM_STATE_DIR": str(state),
    }
    server = VllmServer(model, plugins=["lorawarm"], env=plugin_env, log_path=workdir / "vllm.log")
    _say(f"starting vLLM (CPU) with the lorawarm plugin at {server.url}; log: {server.log_path}")
    daemon: LorawarmProcess | None = None
    try:
        server.start()
        seconds = server.wait_healthy()
        _print(f"vLLM healthy after {seconds:.0f} s")
        daemon = LorawarmProcess(
            drop,
            state,
            [server.url],
            env={"LORAWARM_LOG_LEVEL": "info"},
            log_path=workdir / "lorawarm.log",
        )
        _say(f"starting `lorawarm run`; status API at {daemon.status_url}")
        daemon.start()
        daemon.wait_ready()

        _say("publishing demo-good (cp to .demo-good.tmp, then mv) and demo-broken (rank 32)")
        shutil.copytree(good_src, drop / ".demo-good.tmp")
        (drop / ".demo-good.tmp").rename(drop / "demo-good")
        shutil.copytree(broken_src, drop / ".demo-broken.tmp")
        (drop / ".demo-broken.tmp").rename(drop / "demo-broken")
        good = daemon.wait_state("demo-good", "loaded")
        # Judged by what the server takes (its --max-lora-rank 16, learned from the plugin).
        broken = daemon.wait_state("demo-broken", "incompatible")

        _say("lorawarm status")
        table = subprocess.run(
            [sys.executable, "-m", "lorawarm.cli", "status", "--url", daemon.status_url],
            capture_output=True,
            text=True,
            check=False,
        )
        _print(table.stdout.rstrip("\n"))

        _say(
            "a completion through the pre-warmed adapter demo-good (model and adapter are random "
            "weights: the text is gibberish; what shows is that the adapter answered at once)"
        )
        response = completion(server.url, "demo-good", "Once upon a time", max_tokens=8)
        _print(f"HTTP {response.status_code}: {json.dumps(response.json()['choices'][0]['text'])}")

        if check:
            problems = []
            if table.returncode != 0 or "demo-good" not in table.stdout:
                problems.append(f"status table: exit {table.returncode}: {table.stderr}")
            if broken["reason"] != "rank_too_large":
                problems.append(f"demo-broken reason is {broken['reason']}")
            if lora_models(server.url).get("demo-good") != good["snapshot_path"]:
                problems.append("demo-good is not loaded from its snapshot")
            if "demo-broken" in lora_models(server.url):
                problems.append("demo-broken reached vLLM")
            if response.status_code != 200:
                problems.append(f"completion answered {response.status_code}")
            for problem in problems:
                _print(f"CHECK FAILED: {problem}", file=sys.stderr)
            _print("\ndemo check: " + ("FAILED" if problems else "ok"))
            return 1 if problems else 0

        _say(
            f"both are running: try `{_lorawarm_script()} status --url {daemon.status_url}`, or "
            f"drop more adapters into {drop}; Ctrl-C stops everything"
        )
        while server.running:
            time.sleep(1.0)  # a stop signal raises Stop out of here
        _print("vLLM exited; stopping", file=sys.stderr)
        return 1
    finally:
        # Nothing may interrupt the clean-up: vLLM, in its own session, outlives the demo.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        _say("cleaning up")
        try:
            if daemon is not None:
                daemon.stop()
        finally:
            server.stop()
        _print("stopped lorawarm and vLLM")


def _lorawarm_script() -> str:
    """The `lorawarm` script next to this interpreter (`.venv/bin/lorawarm`), which is not on
    PATH for someone who ran `make demo`."""
    script = Path(sys.executable).parent / "lorawarm"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else str(script)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--check", action="store_true", help="assert the steps, then exit")
    args = parser.parse_args(argv)
    return run_demo(args.workdir, check=args.check)


if __name__ == "__main__":
    sys.exit(main())
