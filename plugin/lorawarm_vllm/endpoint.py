"""The endpoint part of lorawarm's vLLM plugin: `GET /v1/lorawarm/server` says what this vLLM takes.

vLLM 0.26+ loads `vllm.endpoint_plugins` entries named in `VLLM_PLUGINS` into its API server
(`vllm/plugins/__init__.py load_endpoint_plugins`); ours is registered as `lorawarm`, like the
resolver, so `VLLM_PLUGINS=lorawarm` enables both. The route answers
`ServerFacts(learned_from=("plugin",), ...).to_json()` (`lorawarm.server_facts`): vLLM's own
parsed flags (`--model`, served names, `--max-lora-rank`, `--max-loras`, the effective
`--max-cpu-loras`), the model's architecture and layer count, the modules its vLLM class takes
LoRA on with their shapes, whether runtime LoRA updating and lorawarm's resolver are on, and
which adapters the engine holds in its CPU cache right now. The path is under `/v1` so that
vLLM's API key guards it like every other `/v1` route (`AuthenticationMiddleware` checks the
key for any path starting with `/v1`), and under `lorawarm/` so that it can never shadow a
route of vLLM's.

Where the facts come from, and why there:
- The LoRA modules and shapes are what vLLM's LoRA manager in the *worker* decides with; the
  model is built there, not in the API server, and which children of a model class are linear
  layers is known only once it is built. Reimplementing that from the model class and its
  config in the API server would be a second opinion that can drift from vLLM's. So the general
  plugin installs a read-only worker method (`lorawarm_vllm.engine_side`) and `init_state`
  calls it once through `engine_client.collective_rpc`, the pairing vLLM's endpoint-plugin
  interface prescribes for engine-side needs.
- Everything else is in the API server already: `args` (vLLM's parsed command line), the
  engine's `vllm_config` (the effective LoRA config: `max_cpu_loras` defaults to `max_loras`
  there) and `model_config.hf_config`.
- All of that cannot change while the server runs, so it is computed once, in `init_state`.
  `resident` can: each request asks `engine_client.list_loras()` (the int ids in the engine's
  CPU cache) and names them through the serving models' `lora_requests` (name -> LoRARequest).
  An adapter unloaded through the API but still cached in the engine has no name any more and
  is not listed.

It never raises into vLLM: a fact that cannot be had is None (not known), with one log line.
On the CPU-only render server (`engine_client` None) it answers what `args` gives. Importing
this module imports neither vLLM nor FastAPI (the resolver reads `current_facts()` from it).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from argparse import Namespace
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from lorawarm.server_facts import LearnedFrom, ModuleShape, ServerFacts, model_aliases
from lorawarm_vllm import PLUGIN_NAME, RESOLVER_NAME, LorawarmResolver
from lorawarm_vllm.engine_side import RPC_METHOD

ROUTE = "/v1/lorawarm/server"
# How long the one-time worker call and each per-request cache query may take: both are
# utility calls the engine answers between two steps, milliseconds normally.
RPC_TIMEOUT = 30.0
RESIDENT_TIMEOUT = 5.0

_log = logging.getLogger("vllm.lorawarm")

T = TypeVar("T")

# The one endpoint of this API-server process, set by `init_state` (vLLM runs it once).
_current: LorawarmEndpoint | None = None


def current_facts() -> ServerFacts | None:
    """This vLLM's facts as the endpoint learned them at start (`resident` None: it is asked per
    request); None until vLLM ran the endpoint's `init_state` in this process."""
    return None if _current is None else _current.static


class LorawarmEndpoint:
    """vLLM's `EndpointPlugin` protocol: `name`, `required_tasks`, `attach_router`, `init_state`.

    `required_tasks` is None: the facts are useful on any server (a render-only server included,
    where they are what its flags say).
    """

    name = PLUGIN_NAME
    required_tasks: tuple[str, ...] | None = None

    def __init__(self) -> None:
        self.static: ServerFacts | None = None
        self._engine: Any = None
        self._state: Any = None
        self._failed: set[str] = set()

    def attach_router(self, app: Any) -> None:
        """Add `GET ROUTE` to vLLM's FastAPI app."""
        fastapi = importlib.import_module("fastapi")
        responses = importlib.import_module("fastapi.responses")
        router = fastapi.APIRouter()

        async def lorawarm_server() -> Any:
            return responses.JSONResponse((await self.facts()).to_json())

        router.add_api_route(
            ROUTE,
            lorawarm_server,
            methods=["GET"],
            summary="lorawarm: what this vLLM server takes and holds (read-only)",
        )
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        """Learn what cannot change while the server runs; never raises into vLLM."""
        global _current
        self._engine = engine_client
        self._state = state
        try:
            self.static = await self._learn(engine_client, state, args)
        except Exception as err:  # noqa: BLE001 - vLLM must start regardless
            self._once("init", "lorawarm: the server facts endpoint could not learn: %r", err)
            self.static = ServerFacts(learned_from=(LearnedFrom.PLUGIN,))
        _current = self

    async def facts(self) -> ServerFacts:
        """The static facts plus `resident` as of now."""
        static = self.static or ServerFacts(learned_from=(LearnedFrom.PLUGIN,))
        resident = await self._guard_async("resident", self._resident)
        return replace(static, resident=resident)

    # ------------------------------------------------------------------ learning

    async def _learn(self, engine: Any, state: Any, args: Namespace) -> ServerFacts:
        model = self._guard("model", lambda: _str(getattr(args, "model", None)))
        served = self._guard("served_model_names", lambda: _served_names(args)) or ()
        # vLLM puts its config into the app state on API and render servers alike (a bare State,
        # as run_batch builds, has none; the engine has it then).
        config = self._guard("vllm_config", lambda: _vllm_config(engine, state))
        lora = None if config is None else config.lora_config
        hf_text = self._guard("hf_config", lambda: _text_config(config)) if config else None
        worker = await self._guard_async("lora_modules", lambda: self._worker_facts(engine, lora))
        shapes: dict[str, ModuleShape] = {}
        modules: frozenset[str] | None = None
        if worker is not None:
            modules = frozenset(worker["lora_modules"])
            shapes = {n: ModuleShape(i, o) for n, (i, o) in worker["module_shapes"].items()}
        return ServerFacts(
            learned_from=(LearnedFrom.PLUGIN,),
            vllm_version=self._guard("vllm_version", _vllm_version),
            model=model,
            model_aliases=self._guard("model_aliases", lambda: _aliases(model, config)) or (),
            served_model_names=served,
            max_lora_rank=self._guard("max_lora_rank", lambda: _lora_value(lora, args, "rank")),
            max_loras=self._guard("max_loras", lambda: _lora_value(lora, args, "loras")),
            max_cpu_loras=self._guard("max_cpu_loras", lambda: _lora_value(lora, args, "cpu")),
            architecture=self._guard("architecture", lambda: _architecture(config)),
            num_layers=self._guard("num_layers", lambda: _num_layers(hf_text)),
            lora_modules=modules,
            module_shapes=shapes,
            runtime_lora_updating=self._guard("runtime_lora_updating", _runtime_updating),
            resolver=self._guard("resolver", _resolver_registered),
        )

    async def _worker_facts(self, engine: Any, lora: Any) -> dict[str, Any] | None:
        """The first worker's `engine_side` answer; None without an engine or without LoRA."""
        if engine is None or lora is None:
            return None
        answers = await asyncio.wait_for(
            engine.collective_rpc(RPC_METHOD, timeout=RPC_TIMEOUT), RPC_TIMEOUT + 5
        )
        answer = next((a for a in answers if a is not None), None)
        if answer is None:
            return None
        modules = answer["lora_modules"]
        shapes = answer["module_shapes"]
        if not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
            raise TypeError(f"lora_modules is {modules!r}")
        if not isinstance(shapes, dict):
            raise TypeError(f"module_shapes is {shapes!r}")
        return {
            "lora_modules": modules,
            "module_shapes": {str(n): (int(s[0]), int(s[1])) for n, s in shapes.items()},
        }

    async def _resident(self) -> frozenset[str] | None:
        """Names of the adapters in the engine's CPU cache now (no engine: not known)."""
        engine = self._engine
        if engine is None:
            return None
        config = engine.vllm_config
        if config.lora_config is None:
            return frozenset()  # LoRA is off: nothing can be in memory
        ids = await asyncio.wait_for(engine.list_loras(), RESIDENT_TIMEOUT)
        models = getattr(self._state, "openai_serving_models", None)
        requests = getattr(models, "lora_requests", None) or {}
        return frozenset(name for name, req in requests.items() if req.lora_int_id in ids)

    # ------------------------------------------------------------------ never raise

    def _guard(self, what: str, compute: Callable[[], T]) -> T | None:
        try:
            return compute()
        except Exception as err:  # noqa: BLE001 - a fact that fails is None, never vLLM's error
            self._once(what, "lorawarm: server fact %s is not known: %r", what, err)
            return None

    async def _guard_async(self, what: str, compute: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await compute()
        except Exception as err:  # noqa: BLE001 - a fact that fails is None, never vLLM's error
            self._once(what, "lorawarm: server fact %s is not known: %r", what, err)
            return None

    def _once(self, key: str, message: str, *args: object) -> None:
        """One log line per fact that failed, not one per request."""
        if key in self._failed:
            return
        self._failed.add(key)
        _log.warning(message, *args)


def _vllm_config(engine: Any, state: Any) -> Any:
    config = getattr(state, "vllm_config", None)
    if config is None and engine is not None:
        config = engine.vllm_config
    return config


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _served_names(args: Namespace) -> tuple[str, ...]:
    """`--served-model-name`, or `--model` as vLLM falls back to it (init_app_state)."""
    names = getattr(args, "served_model_name", None)
    if names is None:
        model = _str(getattr(args, "model", None))
        return () if model is None else (model,)
    if isinstance(names, str):
        return (names,)
    return tuple(str(n) for n in names)


def _aliases(model: str | None, config: Any) -> tuple[str, ...]:
    """Other names of `--model`: the engine's model path when it replaced a hub id
    (HF_HUB_OFFLINE), and the hub id of a Hugging Face cache path."""
    names: list[str] = []
    engine_model = None if config is None else _str(config.model_config.model)
    for name in (model, engine_model):
        if name is None:
            continue
        if name != model:
            names.append(name)
        names.extend(model_aliases(name))
    return tuple(dict.fromkeys(n for n in names if n != model))


def _lora_value(lora: Any, args: Namespace, which: str) -> int | None:
    """A LoRA limit from the engine's effective LoRA config; from `args` without an engine
    (render server), where `max_cpu_loras` defaults to `max_loras` as `LoRAConfig` does it.
    None when LoRA is off."""
    if lora is None:
        if not getattr(args, "enable_lora", False):
            return None
        lora = Namespace(
            max_lora_rank=args.max_lora_rank,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras or args.max_loras,
        )
    value = {"rank": lora.max_lora_rank, "loras": lora.max_loras, "cpu": lora.max_cpu_loras}[which]
    return None if value is None else int(value)


def _text_config(config: Any) -> Any:
    return config.model_config.hf_config.get_text_config()


def _architecture(config: Any) -> str | None:
    """The model class vLLM runs (`ModelConfig.architecture`), not merely the config's first."""
    return None if config is None else _str(config.model_config.architecture)


def _num_layers(hf_text: Any) -> int | None:
    value = getattr(hf_text, "num_hidden_layers", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _vllm_version() -> str | None:
    return _str(getattr(importlib.import_module("vllm"), "__version__", None))


def _runtime_updating() -> bool:
    """VLLM_ALLOW_RUNTIME_LORA_UPDATING as vLLM reads it (`vllm.envs`: "1"/"true", any case)."""
    envs = importlib.import_module("vllm.envs")
    return bool(envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING)


def _resolver_registered() -> bool:
    """Whether vLLM's resolver registry holds lorawarm's resolver."""
    registry = importlib.import_module("vllm.lora.resolver").LoRAResolverRegistry
    return isinstance(registry.resolvers.get(RESOLVER_NAME), LorawarmResolver)
