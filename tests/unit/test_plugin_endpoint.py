"""The plugin's endpoint part where a real vLLM API server cannot show it: the CPU-only render
server (no engine) and an engine whose every call fails. `args` is parsed by vLLM's own parser."""

from __future__ import annotations

import asyncio
import importlib
import logging
import subprocess
import sys
import warnings
from argparse import Namespace
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.datastructures import State

from lorawarm.server_facts import LearnedFrom, ServerFacts
from lorawarm_vllm.endpoint import ROUTE, LorawarmEndpoint, current_facts


def vllm_args(*argv: str) -> Namespace:
    """vLLM's parsed command line, as its API server hands it to `init_state`."""
    with warnings.catch_warnings():
        # Importing vLLM's CLI imports torch, whose import-time deprecation warnings pytest
        # would turn into errors; they are not this test's business.
        warnings.simplefilter("ignore")
        cli_args = importlib.import_module("vllm.entrypoints.launchers.cli_args")
        argparse_utils = importlib.import_module("vllm.utils.argparse_utils")
    parser = cli_args.make_arg_parser(argparse_utils.FlexibleArgumentParser())
    parsed: Namespace = parser.parse_args(list(argv))
    return parsed


ARGS = ("--model", "/models/tiny", "--served-model-name", "tiny", "chat", "--enable-lora")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def plugin_log() -> Iterator[Records]:
    """What the endpoint logs (its logger is under vLLM's, which does not propagate)."""
    handler = Records()
    logger = logging.getLogger("vllm.lorawarm")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def started(engine: Any, args: Namespace) -> LorawarmEndpoint:
    plugin = LorawarmEndpoint()
    asyncio.run(plugin.init_state(engine, State(), args))
    return plugin


def route_answer(plugin: LorawarmEndpoint) -> Any:
    app = FastAPI()
    plugin.attach_router(app)
    with TestClient(app) as client:
        response = client.get(ROUTE)
    assert response.status_code == 200
    return response.json()


def test_render_server_answers_what_its_flags_say() -> None:
    """Without an engine (vLLM's render server) the route answers --model, the served names and
    the LoRA limits from the flags (--max-cpu-loras defaulting to --max-loras, as vLLM does);
    what only the engine knows is None."""
    plugin = started(None, vllm_args(*ARGS, "--max-lora-rank", "8", "--max-loras", "2"))
    facts = ServerFacts.from_json(route_answer(plugin))
    assert facts.learned_from == (LearnedFrom.PLUGIN,)
    assert facts.model == "/models/tiny"
    assert facts.served_model_names == ("tiny", "chat")
    assert (facts.max_lora_rank, facts.max_loras, facts.max_cpu_loras) == (8, 2, 2)
    assert facts.lora_modules is None
    assert facts.resident is None
    assert facts.architecture is None
    assert current_facts() == plugin.static


def test_render_server_without_lora_reports_no_limits() -> None:
    """Without --enable-lora the LoRA limits vLLM's parser defaults are not limits of anything."""
    facts = ServerFacts.from_json(route_answer(started(None, vllm_args("--model", "/m"))))
    assert facts.served_model_names == ("/m",)
    assert (facts.max_lora_rank, facts.max_loras, facts.max_cpu_loras) == (None, None, None)


class BrokenEngine:
    """An engine client every part of which fails, as a dying or foreign vLLM might."""

    @property
    def vllm_config(self) -> Any:
        raise RuntimeError("config gone")

    async def collective_rpc(self, method: str, **options: Any) -> Any:
        raise NotImplementedError(f"Method {method!r} is not implemented.")

    async def list_loras(self) -> set[int]:
        raise RuntimeError("EngineCore encountered an issue")


def test_failing_engine_never_raises_and_logs_each_fact_once(plugin_log: Records) -> None:
    """Every engine call failing leaves vLLM running: the route still answers what `args`
    gives, the failed facts are None, and each failure is one log line, not one per request."""
    plugin = started(BrokenEngine(), vllm_args(*ARGS))
    first = route_answer(plugin)
    second = route_answer(plugin)
    assert first == second
    assert first["model"] == "/models/tiny"
    assert first["served_model_names"] == ["tiny", "chat"]
    assert first["resident"] is None
    assert first["architecture"] is None
    assert len(plugin_log.lines) == len(set(plugin_log.lines))
    assert any("vllm_config" in line and "config gone" in line for line in plugin_log.lines)
    assert any("resident" in line for line in plugin_log.lines)


def test_current_facts_is_none_before_init_state() -> None:
    """The resolver's accessor says "not known" until vLLM ran `init_state` in the process."""
    code = "from lorawarm_vllm.endpoint import current_facts; print(current_facts())"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "None"
