"""lorawarm's vLLM resolver plugin: an adapter requested before the daemon warmed it still loads.

Enable it in vLLM's environment with `VLLM_PLUGINS=lorawarm` and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=true` (vLLM asks resolvers only then), and point it at the
drop directory with `LORAWARM_CACHE_DIR` (or vLLM's own `VLLM_LORA_RESOLVER_CACHE_DIR`) and at
the daemon's `LORAWARM_STATE_DIR`. The settings are the daemon's (`lorawarm.settings`).

Importing this package stays cheap: it pulls in neither vLLM (imported inside `register()`)
nor watchdog, httpx or the web server.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

from lorawarm.server_facts import ServerFacts
from lorawarm.settings import EX_CONFIG, ConfigError, load
from lorawarm.snapshot import SnapshotStore
from lorawarm_vllm import engine_side
from lorawarm_vllm.resolver import LorawarmResolver

__all__ = ["RESOLVER_NAME", "LorawarmResolver", "PluginConfigError", "build_resolver", "register"]

PLUGIN_NAME = "lorawarm"
RESOLVER_NAME = "lorawarm"
# Under "vllm." so that lines go through vLLM's own handler and format (vllm/logger.py
# configures only the "vllm" logger, which does not propagate).
LOGGER_NAME = "vllm.lorawarm"

_log = logging.getLogger(LOGGER_NAME)


class PluginConfigError(ConfigError):
    """The plugin is enabled but its settings are unusable; the message says which and why."""


def register() -> None:
    """Register the `lorawarm` resolver with vLLM; vLLM calls this in every process it starts.

    Cheap and idempotent: settings are read from the environment each time, and a resolver with
    the same settings that is already registered is kept. On an unusable configuration it logs
    one error line and exits with 78 (EX_CONFIG): vLLM calls this function without catching
    (vllm/plugins/__init__.py `load_general_plugins`), so vLLM does not start half-working.

    Named in `VLLM_PLUGINS`, it also installs the worker-side method the endpoint part asks for
    the model's LoRA modules (`lorawarm_vllm.engine_side`).
    """
    if _named():
        _install_engine_side()
    try:
        resolver = build_resolver()
    except PluginConfigError as err:
        _log.error("%s", err)
        raise SystemExit(EX_CONFIG) from None
    if resolver is None:
        return
    # importlib, not `from vllm... import`: see LoRARequest in lorawarm_vllm.resolver.
    vllm_resolver = importlib.import_module("vllm.lora.resolver")
    registry = vllm_resolver.LoRAResolverRegistry
    # A virtual subclass, so that the resolver module never has to import vLLM.
    vllm_resolver.LoRAResolver.register(LorawarmResolver)
    current = registry.resolvers.get(RESOLVER_NAME)
    if (
        isinstance(current, LorawarmResolver)
        and current.cache_dir == resolver.cache_dir
        and current.store.root == resolver.store.root
        and current.rules == resolver.rules
        and current.policy == resolver.policy
        and repr(current.fetcher) == repr(resolver.fetcher)
    ):
        return
    registry.register_resolver(RESOLVER_NAME, resolver)
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true"):
        _log.info(
            "lorawarm: resolver registered for adapters in %s (snapshots in %s)",
            resolver.cache_dir,
            resolver.store.root,
        )
    else:
        _log.warning(
            "lorawarm: resolver registered, but VLLM_ALLOW_RUNTIME_LORA_UPDATING is not true, "
            "so vLLM will never ask it for an adapter"
        )


def build_resolver() -> LorawarmResolver | None:
    """The resolver the environment asks for; None when the plugin is merely installed.

    With `VLLM_PLUGINS` unset vLLM loads every installed plugin. The plugin is active only when
    asked for: named in `VLLM_PLUGINS`, or `LORAWARM_CACHE_DIR` set. vLLM's own
    `VLLM_LORA_RESOLVER_CACHE_DIR` alone is no such request (it configures vLLM's filesystem
    resolver), and neither is anything else: an installed, unasked plugin reads no settings and
    stays out of the way. Active, it must be usable; raises `PluginConfigError` otherwise.
    """
    if not _activated():
        _log.debug(
            "lorawarm: not named in VLLM_PLUGINS and LORAWARM_CACHE_DIR unset; "
            "resolver not registered"
        )
        return None
    try:
        settings = load()
    except ConfigError as err:
        raise PluginConfigError(_problem(str(err))) from None
    if settings.cache_dir is None:
        raise PluginConfigError(
            _problem(
                "no adapter directory is configured; set LORAWARM_CACHE_DIR (or "
                "VLLM_LORA_RESOLVER_CACHE_DIR) to the directory adapters are dropped into"
            )
        )
    cache_dir, store = _check_dirs(settings.cache_dir, settings.state_dir)
    fetcher = None
    if settings.sources:
        from lorawarm.sources.fetch import Fetcher
        from lorawarm.sources.location import parse_source

        fetcher = Fetcher(
            [parse_source(s) for s in settings.sources],
            cache_dir,
            settings.state_dir,
            max_bytes=settings.max_adapter_bytes,
            timeout=settings.source_timeout,
            concurrency=settings.source_concurrency,
        )
    return LorawarmResolver(
        cache_dir,
        store,
        settings.watched_rules(),
        policy=settings.policy(),
        facts=_endpoint_facts,
        logger=_log,
        fetcher=fetcher,
    )


def _endpoint_facts() -> ServerFacts | None:
    """This vLLM's facts as lorawarm's endpoint learned them, in this process; None where the
    endpoint part is not loaded (not imported here: it is vLLM that loads it, or not)."""
    endpoint = sys.modules.get("lorawarm_vllm.endpoint")
    facts = None if endpoint is None else endpoint.current_facts()
    return facts if isinstance(facts, ServerFacts) else None


def _activated() -> bool:
    """Whether the environment asks for this plugin (see `build_resolver`)."""
    return _named() or bool(os.environ.get("LORAWARM_CACHE_DIR", "").strip())


def _named() -> bool:
    """Whether `VLLM_PLUGINS` names this plugin: only then does vLLM load its endpoint part."""
    # Split exactly as vLLM does (vllm/plugins/__init__.py: on commas, nothing stripped), so
    # that what activates the plugin is what loads it.
    return PLUGIN_NAME in os.environ.get("VLLM_PLUGINS", "").split(",")


def _install_engine_side() -> None:
    """Install the endpoint's worker method; a vLLM without it only loses those facts."""
    try:
        engine_side.install()
    except Exception as err:  # noqa: BLE001 - a vLLM laid out otherwise must still start
        _log.warning(
            "lorawarm: cannot install the worker method of the server facts endpoint (%r); "
            "it will not report the model's LoRA modules",
            err,
        )


def _check_dirs(cache: Path, state: Path) -> tuple[Path, SnapshotStore]:
    """The absolute drop directory and a usable snapshot store, or `PluginConfigError`."""
    cache_dir = Path(os.path.abspath(cache))
    if not cache_dir.is_dir():
        what = "does not exist" if not cache_dir.exists() else "is not a directory"
        raise PluginConfigError(
            _problem(f"the adapter directory {cache_dir} (LORAWARM_CACHE_DIR) {what}")
        )
    store = SnapshotStore(state)
    try:
        store.root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PluginConfigError(
            _problem(
                f"cannot create the snapshot directory {store.root} (LORAWARM_STATE_DIR): "
                f"{err.strerror}"
            )
        ) from None
    if not os.access(store.root, os.W_OK | os.X_OK):
        raise PluginConfigError(
            _problem(f"the snapshot directory {store.root} (LORAWARM_STATE_DIR) is not writable")
        )
    return cache_dir, store


def _problem(detail: str) -> str:
    return (
        f"lorawarm vLLM plugin: {detail}. Fix the setting, or remove 'lorawarm' from VLLM_PLUGINS."
    )
