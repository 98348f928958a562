"""Packaging: what the plugin's imports pull in, and the installed entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

# Modules the vLLM plugin imports: they run inside every vLLM process.
PLUGIN_SIDE = (
    "lorawarm_vllm",
    "lorawarm_vllm.endpoint",
    "lorawarm_vllm.engine_side",
    "lorawarm.inspection",
    "lorawarm.snapshot",
    "lorawarm.settings",
    "lorawarm.server_facts",
)
DAEMON_ONLY = ("watchdog", "httpx", "httpcore", "uvicorn", "starlette", "fastapi")


def imported_after(*modules: str) -> set[str]:
    """Top-level packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout))


@pytest.fixture(scope="module")
def plugin_side_imports() -> set[str]:
    return imported_after(*PLUGIN_SIDE)


def test_plugin_side_pulls_in_no_daemon_libraries(plugin_side_imports: set[str]) -> None:
    """Importing the plugin and the shared checks loads no watchdog, httpx or web server."""
    assert "lorawarm_vllm" in plugin_side_imports
    assert plugin_side_imports.isdisjoint(DAEMON_ONLY)


def test_plugin_side_imports_vllm_lazily(plugin_side_imports: set[str]) -> None:
    """Importing the plugin does not import vLLM or torch (it must import without them)."""
    assert plugin_side_imports.isdisjoint({"vllm", "torch"})


def test_validate_command_pulls_in_no_daemon_libraries() -> None:
    """The CLI module (what `lorawarm validate` runs) loads no daemon-only library either."""
    assert imported_after("lorawarm.cli").isdisjoint(DAEMON_ONLY)


def test_vllm_plugin_entry_point() -> None:
    """The `vllm.general_plugins` entry point `lorawarm` names `lorawarm_vllm:register`."""
    found = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "lorawarm"]
    assert [ep.value for ep in found] == ["lorawarm_vllm:register"]
    assert callable(found[0].load())


def test_vllm_endpoint_plugin_entry_point() -> None:
    """The `vllm.endpoint_plugins` entry point is named `lorawarm` too (so `VLLM_PLUGINS=lorawarm`
    enables it with the resolver) and builds an object with vLLM's endpoint-plugin members."""
    found = [ep for ep in entry_points(group="vllm.endpoint_plugins") if ep.name == "lorawarm"]
    assert [ep.value for ep in found] == ["lorawarm_vllm.endpoint:LorawarmEndpoint"]
    plugin = found[0].load()()
    assert plugin.name == "lorawarm"
    assert plugin.required_tasks is None
    assert callable(plugin.attach_router)
    assert callable(plugin.init_state)


def test_console_script_entry_point() -> None:
    """The `lorawarm` console script runs `lorawarm.cli:main`."""
    from lorawarm.cli import main

    found = [ep for ep in entry_points(group="console_scripts") if ep.name == "lorawarm"]
    assert [ep.value for ep in found] == ["lorawarm.cli:main"]
    assert found[0].load() is main
