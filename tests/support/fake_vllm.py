"""A stateful fake vLLM 0.32 API server, for `httpx.MockTransport`: only for faults a real vLLM
cannot be made to produce on demand (a dead engine, a reset connection, a restart between two
calls).

Every answer is built from what a real vLLM sent, recorded byte for byte in
`tests.support.vllm_responses` (status, Content-Type, body): the recorded names and paths are
swapped for the ones of the request, nothing else changes. The only answers not recorded there
(a real server cannot be made to give them while recording) follow vLLM's source:

- `/health` with a dead engine: `Response(status_code=503)`, empty, no Content-Type
  (`entrypoints/serve/instrumentator/health.py`);
- a load while the engine is dead: `add_lora` raises `EngineDeadError`, which
  `OpenAIServingModels.load_lora_adapter` turns into a 500 ErrorResponse carrying
  `str(EngineDeadError())` (`entrypoints/openai/models/serving.py`, `v1/engine/exceptions.py`).

What the fake keeps, as vLLM's API server does: a registry of LoRA name -> path as sent (what
`/v1/models` lists, emptied by `restart()`), one served base model, an optional API key checked
on `/v1/*` only, whether the runtime LoRA routes exist, and whether the engine is alive. A load
of a folder without `adapter_config.json` is vLLM's 404; an engine rejection (rank too big,
truncated weights...) is scripted per adapter name with `reject()`.

Scripted faults: `fail(route, times=N, response=... | raises=httpx.ConnectError ...)` makes the
next N calls to a route answer that instead (a `before` callback can change the state first, to
race a call). `reachable = False` refuses every connection.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support import vllm_responses as recorded

SERVED_MODEL_NAME = recorded.RECORD_SERVED_MODEL_NAME
MODEL_PATH = "/models/tiny-llama"
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."

ROUTES = {
    "/health": "health",
    "/v1/models": "models",
    "/v1/load_lora_adapter": "load",
    "/v1/unload_lora_adapter": "unload",
}
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")  # vLLM's AuthenticationMiddleware

_SLOT = "\x00slot\x00"


# --- vLLM's answers, from the recording --------------------------------------------------------


def _dumps(doc: object) -> str:
    """JSON exactly as starlette's JSONResponse renders it."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def _answer(status: int, content_type: str | None, body: str) -> httpx.Response:
    headers = {} if content_type is None else {"content-type": content_type}
    return httpx.Response(status, headers=headers, content=body.encode())


def _template(key: str, old: str, count: int = 1) -> tuple[int, str | None, str]:
    """A recorded answer with the `count` occurrences of `old` made slots."""
    status, content_type, body = recorded.RESPONSES[key]
    assert body.count(old) == count, f"{key}: {old!r} is not {count} times in the recording"
    return status, content_type, body.replace(old, _SLOT)


def _fill(template: tuple[int, str | None, str], value: str) -> httpx.Response:
    status, content_type, body = template
    if content_type == "application/json":
        value = _dumps(value)[1:-1]  # escaped as inside a JSON string
    return _answer(status, content_type, body.replace(_SLOT, value))


def _recorded(key: str) -> httpx.Response:
    return _answer(*recorded.RESPONSES[key])


_LOAD_OK = _template("load_success", "'a'")
_UNLOAD_OK = _template("unload_success", "'a'")
_ALREADY = _template("load_already_loaded", "'a'")
_BASE_CONFLICT = _template("load_name_is_base_model", f"'{SERVED_MODEL_NAME}'")
_NOT_FOUND = _template("load_missing_folder", "lora missing failed")
_UNLOAD_UNKNOWN = _template("unload_unknown", "'a'")
_REJECTED = _template("load_rank_too_high", "LoRA rank 32 is greater than max_lora_rank 16.")
_MISSING_FIELD = _template("load_missing_path_field", "lora_path", 2)


def sanitize_message(message: str) -> str:
    """vLLM's `sanitize_message` (entrypoints/serve/exception_handling/utils.py): paths in error
    messages become `<path>`."""
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


def load_ok(name: str) -> httpx.Response:
    """200, no Content-Type: `Success: LoRA adapter 'x' added successfully.`"""
    return _fill(_LOAD_OK, f"'{name}'")


def unload_ok(name: str) -> httpx.Response:
    """200, no Content-Type: `Success: LoRA adapter 'x' removed successfully.`"""
    return _fill(_UNLOAD_OK, f"'{name}'")


def already_loaded(name: str) -> httpx.Response:
    """400 InvalidUserInput: the name is registered and `load_inplace` is false."""
    return _fill(_ALREADY, f"'{name}'")


def base_model_conflict(name: str) -> httpx.Response:
    """400 InvalidUserInput: the name is a served base model's."""
    return _fill(_BASE_CONFLICT, f"'{name}'")


def no_adapter_found(name: str) -> httpx.Response:
    """404 NotFoundError: the folder or its adapter_config.json is missing (path sanitised)."""
    return _fill(_NOT_FOUND, f"lora {name} failed")


def unload_unknown(name: str) -> httpx.Response:
    """404 NotFoundError: unload of a name that is not registered."""
    return _fill(_UNLOAD_UNKNOWN, f"'{name}'")


def rejected(engine_message: str) -> httpx.Response:
    """500 InternalServerError: the engine refused the adapter (its worker's message, quoted)."""
    return _fill(_REJECTED, sanitize_message(engine_message))


def missing_field(field_name: str) -> httpx.Response:
    """400 Bad Request: a required field of a one-field load request is missing (as recorded:
    pydantic's message quotes the request as `<dict of 1 items>`)."""
    return _fill(_MISSING_FIELD, field_name)


def engine_dead_on_load() -> httpx.Response:
    """500 InternalServerError carrying EngineDeadError's message (not recordable: from source)."""
    status, content_type, _ = _REJECTED
    doc = {
        "error": {
            "message": ENGINE_DEAD_MESSAGE,
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    return _answer(status, content_type, _dumps(doc))


def health_ok() -> httpx.Response:
    return _recorded("health")


def health_dead() -> httpx.Response:
    """503, empty, no Content-Type: `Response(status_code=503)` (not recordable: from source)."""
    return _answer(503, None, "")


def unauthorized() -> httpx.Response:
    """401 `{"error":"Unauthorized"}` from vLLM's AuthenticationMiddleware."""
    return _recorded("auth_models_missing_key")


def route_missing() -> httpx.Response:
    """FastAPI's own 404 `{"detail":"Not Found"}`: the runtime LoRA routes are not mounted."""
    return _recorded("noruntime_load")


def not_json() -> httpx.Response:
    """400: a load/unload whose Content-Type is not application/json."""
    return _recorded("load_not_json")


def _permission() -> dict[str, Any]:
    return {
        "id": f"modelperm-{uuid.uuid4().hex[:16]}",
        "object": "model_permission",
        "created": int(time.time()),
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


def model_card(
    model_id: str, root: str, parent: str | None, max_model_len: int | None
) -> dict[str, Any]:
    """One `/v1/models` entry as vLLM's ModelCard dumps it."""
    return {
        "id": model_id,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [_permission()],
    }


# --- the fake server ---------------------------------------------------------------------------


@dataclass
class Fault:
    """What the next call to a route does instead of the normal answer."""

    response: httpx.Response | None = None
    raises: type[httpx.TransportError] | None = None
    before: Callable[[], None] | None = None


@dataclass(frozen=True)
class Call:
    """One request the fake received: its route, the adapter name and path, the status sent
    (None when the call raised a transport error)."""

    route: str
    name: str | None
    path: str | None
    status: int | None


def _default_adapter_exists(path: str) -> bool:
    return os.path.isabs(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


@dataclass
class FakeVllm:
    """One vLLM API server (`--api-server-count 1`), as far as lorawarm talks to it."""

    served_model_name: str = SERVED_MODEL_NAME
    model_path: str = MODEL_PATH
    max_model_len: int = 256
    api_key: str | None = None
    runtime_updates: bool = True
    engine_alive: bool = True
    reachable: bool = True
    adapter_exists: Callable[[str], bool] = _default_adapter_exists
    registry: dict[str, str] = field(default_factory=dict)
    rejections: dict[str, str] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _faults: dict[str, deque[Fault]] = field(default_factory=dict)

    # -- scripting ---------------------------------------------------------------------------
    def fail(
        self,
        route: str,
        *,
        times: int = 1,
        response: httpx.Response | None = None,
        raises: type[httpx.TransportError] | None = None,
        before: Callable[[], None] | None = None,
    ) -> None:
        """The next `times` calls to `route` (health, models, load, unload) answer `response`,
        raise `raises`, or (with neither) answer normally after `before` ran."""
        assert route in ROUTES.values(), route
        queue = self._faults.setdefault(route, deque())
        queue.extend(Fault(response, raises, before) for _ in range(times))

    def reject(self, name: str, engine_message: str) -> None:
        """Loads of `name` fail in the engine with `engine_message` until `accept(name)`."""
        self.rejections[name] = engine_message

    def accept(self, name: str) -> None:
        self.rejections.pop(name, None)

    def restart(self) -> None:
        """A vLLM restart: nothing loaded at runtime survives, the engine is fresh."""
        self.registry.clear()
        self.engine_alive = True
        self.reachable = True

    def ops(self, *routes: str) -> list[tuple[str, str | None, str | None]]:
        """(route, name, path) of every load/unload call received (or of `routes`)."""
        wanted = routes or ("load", "unload")
        return [(c.route, c.name, c.path) for c in self.calls if c.route in wanted]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    # -- answering ---------------------------------------------------------------------------
    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        route = ROUTES.get(path, path)
        payload = self._payload(request)
        name = payload.get("lora_name") if isinstance(payload, dict) else None
        lora_path = payload.get("lora_path") if isinstance(payload, dict) else None
        try:
            response = self._respond(request, route, path, payload)
        except httpx.TransportError:
            self.calls.append(Call(route, name, lora_path, None))
            raise
        self.calls.append(Call(route, name, lora_path, response.status_code))
        return response

    @staticmethod
    def _payload(request: httpx.Request) -> object:
        if not request.content:
            return None
        try:
            return json.loads(request.content)
        except ValueError:
            return None

    def _respond(
        self, request: httpx.Request, route: str, path: str, payload: object
    ) -> httpx.Response:
        if not self.reachable:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        queue = self._faults.get(route)
        if queue:
            fault = queue.popleft()
            if fault.before is not None:
                fault.before()
            if fault.raises is not None:
                raise fault.raises(f"scripted {fault.raises.__name__}", request=request)
            if fault.response is not None:
                r = fault.response
                return httpx.Response(r.status_code, headers=r.headers, content=r.content)
        if (
            path.startswith(GUARDED_PREFIX)
            and self.api_key is not None
            and not self._authorized(request)
        ):
            return unauthorized()
        if route == "health":
            return health_ok() if self.engine_alive else health_dead()
        if route == "models":
            return self._models()
        if route in ("load", "unload") and self.runtime_updates:
            content_type = request.headers.get("content-type", "").lower().split(";")[0]
            if content_type != "application/json" or not isinstance(payload, dict):
                return not_json()
            return self._load(payload) if route == "load" else self._unload(payload)
        return route_missing()

    def _authorized(self, request: httpx.Request) -> bool:
        header: str = request.headers.get("authorization", "")
        scheme, _, param = header.partition(" ")
        return scheme.lower() == "bearer" and param == self.api_key

    def _models(self) -> httpx.Response:
        data = [
            model_card(self.served_model_name, self.model_path, None, self.max_model_len),
            *(
                model_card(name, root, self.served_model_name, None)
                for name, root in self.registry.items()
            ),
        ]
        return _answer(200, "application/json", _dumps({"object": "list", "data": data}))

    def _load(self, payload: dict[str, Any]) -> httpx.Response:
        for required in ("lora_name", "lora_path"):
            if required not in payload:
                return missing_field(required)
        name, path = str(payload["lora_name"]), str(payload["lora_path"])
        if name == self.served_model_name:
            return base_model_conflict(name)
        if not payload.get("load_inplace") and name in self.registry:
            return already_loaded(name)
        if not self.engine_alive:
            return engine_dead_on_load()
        if not self.adapter_exists(path):
            return no_adapter_found(name)
        if name in self.rejections:
            return rejected(self.rejections[name])
        self.registry[name] = path
        return load_ok(name)

    def _unload(self, payload: dict[str, Any]) -> httpx.Response:
        name = str(payload.get("lora_name", ""))
        if name not in self.registry:
            return unload_unknown(name)
        del self.registry[name]
        return unload_ok(name)


__all__ = [
    "ENGINE_DEAD_MESSAGE",
    "MODEL_PATH",
    "SERVED_MODEL_NAME",
    "Call",
    "FakeVllm",
    "Fault",
    "already_loaded",
    "base_model_conflict",
    "engine_dead_on_load",
    "health_dead",
    "health_ok",
    "load_ok",
    "missing_field",
    "model_card",
    "no_adapter_found",
    "not_json",
    "rejected",
    "route_missing",
    "sanitize_message",
    "unauthorized",
    "unload_ok",
    "unload_unknown",
]
