"""The plugin as vLLM finds it: the installed entry point, vLLM's own plugin loader, and what
importing the plugin drags in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import lorawarm_vllm
from lorawarm.settings import EX_CONFIG

# What the plugin must never import: the daemon's watcher, HTTP client and web server, and
# vLLM itself at import time (vLLM imports torch; the plugin is imported in every vLLM process).
FORBIDDEN = ("watchdog", "httpx", "uvicorn", "starlette", "fastapi", "vllm", "torch")
ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter of this venv, from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def plugin_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    return {
        "VLLM_PLUGINS": "lorawarm",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
        "LORAWARM_CACHE_DIR": str(drop),
        "LORAWARM_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


def test_entry_point_is_installed() -> None:
    """The installed distribution exposes `lorawarm = lorawarm_vllm:register` in vLLM's
    general plugins group."""
    found = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "lorawarm"]
    assert len(found) == 1
    assert found[0].value == "lorawarm_vllm:register"
    assert found[0].dist is not None
    assert found[0].dist.name == "lorawarm"
    assert found[0].load() is lorawarm_vllm.register


@pytest.mark.parametrize("module", ["lorawarm_vllm", "lorawarm_vllm.resolver"])
def test_import_pulls_in_nothing_heavy(module: str) -> None:
    """Importing the plugin imports none of watchdog, httpx, uvicorn, starlette, fastapi, vLLM
    or torch."""
    result = run_python(
        f"""
        import json, sys
        import {module}
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
        """
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_vllm_loader_registers_the_resolver_and_tolerates_a_second_call(tmp_path: Path) -> None:
    """Loaded by vLLM's own plugin loader with VLLM_PLUGINS=lorawarm, register() can be called
    twice and leaves one `lorawarm` resolver in vLLM's registry."""
    result = run_python(
        """
        import json
        from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group
        from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

        plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
        plugins["lorawarm"]()
        first = LoRAResolverRegistry.get_resolver("lorawarm")
        plugins["lorawarm"]()
        print(json.dumps({
            "plugins": sorted(plugins),
            "resolvers": sorted(LoRAResolverRegistry.get_supported_resolvers()),
            "same": LoRAResolverRegistry.get_resolver("lorawarm") is first,
            "is_lora_resolver": isinstance(first, LoRAResolver),
        }))
        """,
        plugin_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {
        "plugins": ["lorawarm"],
        "resolvers": ["lorawarm"],
        "same": True,
        "is_lora_resolver": True,
    }
    assert "already registered" not in result.stdout + result.stderr


def test_bad_configuration_stops_vllm_with_one_line(tmp_path: Path) -> None:
    """With the drop dir missing, vLLM's plugin loading exits with 78 and prints one line
    that names the setting, and no traceback."""
    env = plugin_env(tmp_path, LORAWARM_CACHE_DIR=str(tmp_path / "missing"))
    result = run_python(
        """
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        print("vLLM would have started")
        """,
        env,
    )
    assert result.returncode == EX_CONFIG
    assert "vLLM would have started" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if "lorawarm" in line]
    assert len(lines) == 1
    assert "LORAWARM_CACHE_DIR" in lines[0]
    assert "does not exist" in lines[0]
    assert "Traceback" not in result.stderr
