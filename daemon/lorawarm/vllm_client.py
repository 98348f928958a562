"""An async client for ONE vLLM server's runtime LoRA API (vLLM 0.32, `--api-server-count 1`).

Four calls: `health()`, `list_models()`, `load()`, `unload()`, and `server_facts()` for
lorawarm's own plugin endpoint inside vLLM. Each either returns what vLLM said in a typed form or
raises one exception type that carries data:

    Exception
     ├── VllmError            .condition .status .message .url
     │    condition (a `Condition`, stable strings for the status API):
     │     ├── unreachable               connect error, reset mid-request, DNS
     │     ├── timeout                   connect/read/write/pool timeout
     │     ├── unauthorized              401 {"error":"Unauthorized"}: missing or wrong API key
     │     ├── runtime_updates_disabled  FastAPI's 404 {"detail":"Not Found"} on load/unload:
     │     │                             VLLM_ALLOW_RUNTIME_LORA_UPDATING is off
     │     ├── engine_dead               503, or any error carrying EngineDeadError's message
     │     │                             (a 500 from vLLM 0.18 on, a 400 up to 0.17.x)
     │     ├── rejected                  400/404/500 {"error":{"message":...}} on load/unload:
     │     │                             vLLM refused this adapter, `message` is vLLM's
     │     ├── server_error              any other 5xx
     │     └── bad_response              not what vLLM 0.32 sends (malformed or wrong shape)
     └── ValueError           a caller mistake caught before sending: a relative `lora_path`
                              (vLLM would try a Hub download), a base URL that is not http(s)

Three answers that look like errors are results: `load()` of a registered name returns
`LoadResult.ALREADY_LOADED` (the caller compares paths through `list_models()`), `unload()` of
an unknown name returns `UnloadResult.NOT_FOUND`, and `server_facts()` on a vLLM without
lorawarm's endpoint (FastAPI's route 404) returns None.

The API key goes only into the `Authorization` header of `/v1/*` requests; it is never logged,
never part of a message, URL or repr. This module does not log at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from types import TracebackType

import httpx

from lorawarm.server_facts import ServerFacts

SERVER_FACTS_ROUTE = "/v1/lorawarm/server"
"""lorawarm's plugin endpoint inside vLLM (`lorawarm_vllm.endpoint`)."""

MAX_MESSAGE_CHARS = 500
"""How much of a response body (or of vLLM's message) a `VllmError` message keeps."""

MAX_BODY_BYTES = 8 << 20
"""A vLLM answer is a few KiB; anything bigger than this is not vLLM talking."""

# vLLM turns any exception from `engine_client.add_lora` into an error answer (a 500 from 0.18
# on, a 400 BadRequestError up to 0.17.x); when the engine core has died that exception is
# EngineDeadError, whose message is fixed (vllm/v1/engine/exceptions.py). The message, not the
# status code, is what tells a dead engine from a rejected adapter.
_ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue"


class Condition(StrEnum):
    """How a server, or one adapter on it, stands: the one vocabulary of the status API.

    `ok` and `unknown` (not yet asked) describe a server; `name_taken` an adapter whose name
    the server already serves for someone else; the rest are why a call did not succeed.
    """

    OK = "ok"
    UNKNOWN = "unknown"
    NAME_TAKEN = "name_taken"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    UNAUTHORIZED = "unauthorized"
    RUNTIME_UPDATES_DISABLED = "runtime_updates_disabled"
    ENGINE_DEAD = "engine_dead"
    REJECTED = "rejected"
    SERVER_ERROR = "server_error"
    BAD_RESPONSE = "bad_response"


class VllmError(Exception):
    """A call to vLLM did not succeed; `condition` says why, `message` says it for humans.

    `status` is the HTTP status when vLLM answered at all, `url` the URL that was called.
    """

    def __init__(
        self,
        condition: Condition,
        message: str,
        status: int | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(condition, message, status, url)
        self.condition = condition
        self.status = status
        self.message = message
        self.url = url

    def __str__(self) -> str:
        where = " ".join(
            part
            for part in (
                self.url or "",
                f"HTTP {self.status}" if self.status is not None else "",
            )
            if part
        )
        return f"{self.condition}: {self.message}" + (f" ({where})" if where else "")

    def __repr__(self) -> str:
        return (
            f"VllmError({self.condition.value!r}, {self.message!r}, "
            f"status={self.status!r}, url={self.url!r})"
        )


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One entry of `/v1/models`: for a LoRA, `root` is the path it was loaded from exactly as
    sent and `parent` the base model's served name; for a base model `parent` is None."""

    id: str
    root: str | None
    parent: str | None


class LoadResult(StrEnum):
    """What a successful `load()` found."""

    LOADED = "loaded"
    ALREADY_LOADED = "already_loaded"


class UnloadResult(StrEnum):
    """What a successful `unload()` found."""

    UNLOADED = "unloaded"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    url: str


class VllmClient:
    """Talks to one vLLM server at `base_url` (e.g. `http://127.0.0.1:8000`).

    `timeout` bounds each phase (connect, read, write, pool) of every request. `transport` is
    for tests (`httpx.MockTransport`). Use as an async context manager or call `aclose()`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = httpx.URL(base_url.strip().rstrip("/"))
        if url.userinfo:
            # Credentials in the URL would end up in every error message and log line.
            raise ValueError("vLLM URL must not contain credentials; use the API key setting")
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"vLLM URL must be http(s)://host[:port], got {base_url!r}")
        self.base_url = str(url)
        self._api_key = api_key or None
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        key = "'set'" if self._api_key else "None"
        return f"VllmClient({self.base_url!r}, api_key={key})"

    async def __aenter__(self) -> VllmClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def health(self) -> None:
        """Return if the server and its engine are alive; raise `VllmError` otherwise."""
        answer = await self._send("GET", "/health")
        if answer.status != 200:
            raise self._error(answer, adapter_route=False)

    async def list_models(self) -> list[ModelEntry]:
        """Everything the API server has registered: base models and LoRA adapters.

        This is vLLM's registry, not what is resident in the engine's caches.
        """
        answer = await self._send("GET", "/v1/models")
        if answer.status != 200:
            raise self._error(answer, adapter_route=False)
        body = _json(answer.body)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise self._bad(answer, "/v1/models did not answer {'data': [...]}")
        models = []
        for item in data:
            entry = _model_entry(item)
            if entry is None:
                raise self._bad(answer, f"/v1/models has a malformed entry: {item!r}")
            models.append(entry)
        return models

    async def server_facts(self) -> ServerFacts | None:
        """What lorawarm's endpoint inside vLLM reports; None when the endpoint is absent (the
        plugin is not in `VLLM_PLUGINS`, or a vLLM before 0.26 without endpoint plugins).

        An answer that is not a `ServerFacts` document is `bad_response`; 401 stays
        `unauthorized` (vLLM checks the key before it looks for a route).
        """
        answer = await self._send("GET", SERVER_FACTS_ROUTE)
        if answer.status == 404 and _is_route_404(answer.body):
            return None
        if answer.status != 200:
            raise self._error(answer, adapter_route=False)
        try:
            return ServerFacts.from_json(_json(answer.body))
        except ValueError as err:
            message = f"{SERVER_FACTS_ROUTE} is not lorawarm's answer: {err}"
            raise self._bad(answer, message) from None

    async def load(self, name: str, path: str) -> LoadResult:
        """Register adapter `name` from the absolute directory `path` and read it into the engine.

        `ALREADY_LOADED` means the name was registered before, from a path this call does not
        know: compare with `list_models()`. Never loads in place (vllm#33791).
        """
        if not PurePosixPath(path).is_absolute():
            # A relative path that does not exist makes vLLM try a Hugging Face Hub download.
            raise ValueError(f"lora_path must be absolute, got {path!r}")
        answer = await self._send(
            "POST",
            "/v1/load_lora_adapter",
            payload={"lora_name": name, "lora_path": path, "load_inplace": False},
        )
        if answer.status == 200:
            if not answer.body.startswith(b"Success"):
                raise self._bad(answer, f"unexpected success body: {self._body(answer)}")
            return LoadResult.LOADED
        if answer.status == 400 and "already been loaded" in (_vllm_message(answer.body) or ""):
            return LoadResult.ALREADY_LOADED
        raise self._error(answer, adapter_route=True)

    async def unload(self, name: str) -> UnloadResult:
        """Forget adapter `name` in the API server (engine memory is freed only by eviction)."""
        answer = await self._send("POST", "/v1/unload_lora_adapter", payload={"lora_name": name})
        if answer.status == 200:
            if not answer.body.startswith(b"Success"):
                raise self._bad(answer, f"unexpected success body: {self._body(answer)}")
            return UnloadResult.UNLOADED
        if answer.status == 404 and "cannot be found" in (_vllm_message(answer.body) or ""):
            return UnloadResult.NOT_FOUND
        raise self._error(answer, adapter_route=True)

    async def _send(self, method: str, path: str, *, payload: object = None) -> _Answer:
        """One request; transport failures become `VllmError`, the body is read in full."""
        headers: dict[str, str] = {}
        if self._api_key and path.startswith("/v1/"):
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = self.base_url + path
        try:
            async with self._http.stream(method, path, json=payload, headers=headers) as response:
                url = str(response.request.url)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise VllmError(
                            Condition.BAD_RESPONSE,
                            f"response larger than {MAX_BODY_BYTES} bytes",
                            status=response.status_code,
                            url=url,
                        )
                return _Answer(response.status_code, bytes(body), url)
        except httpx.TimeoutException as err:
            raise VllmError(Condition.TIMEOUT, self._describe(err), url=url) from err
        except httpx.DecodingError as err:
            raise VllmError(Condition.BAD_RESPONSE, self._describe(err), url=url) from err
        except httpx.TransportError as err:
            # ConnectError, ReadError, WriteError, RemoteProtocolError (reset mid-request)...
            raise VllmError(Condition.UNREACHABLE, self._describe(err), url=url) from err

    def _describe(self, err: Exception) -> str:
        text = str(err)
        return self._quote(f"{type(err).__name__}: {text}" if text else type(err).__name__)

    def _quote(self, text: str) -> str:
        """Someone else's words, made fit for a message: key redacted, then length capped."""
        # Belt and braces: nothing sends the key back, but we quote bodies we do not control.
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _cap(text.strip())

    def _body(self, answer: _Answer) -> str:
        return self._quote(answer.body.decode("utf-8", "replace")) or "empty body"

    def _bad(self, answer: _Answer, message: str) -> VllmError:
        return VllmError(
            Condition.BAD_RESPONSE, self._quote(message), status=answer.status, url=answer.url
        )

    def _error(self, answer: _Answer, *, adapter_route: bool) -> VllmError:
        """Classify a non-success answer; `adapter_route` is True for load/unload."""
        status, body = answer.status, answer.body
        message = _vllm_message(body)
        if message is not None:
            message = self._quote(message)
        if status == 401:
            condition, text = Condition.UNAUTHORIZED, "missing or wrong API key"
        elif status == 503:
            condition, text = Condition.ENGINE_DEAD, message or "vLLM's engine is dead"
        elif status == 404 and _is_route_404(body):
            if adapter_route:
                condition = Condition.RUNTIME_UPDATES_DISABLED
                text = (
                    "the runtime LoRA routes do not exist: start vLLM with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"
                )
            else:
                condition, text = Condition.BAD_RESPONSE, "route not found: is this vLLM?"
        elif message is not None and _ENGINE_DEAD_MESSAGE in message:
            condition, text = Condition.ENGINE_DEAD, message
        elif adapter_route and status in (400, 404, 500) and message is not None:
            condition, text = Condition.REJECTED, message
        elif status >= 500:
            condition, text = Condition.SERVER_ERROR, message or self._body(answer)
        else:
            condition = Condition.BAD_RESPONSE
            text = _cap(f"unexpected answer: {self._body(answer)}")
        return VllmError(condition, text, status=status, url=answer.url)


def _cap(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 1] + "…"


def _json(body: bytes) -> object:
    """Parsed JSON, or None when the body is not JSON (None is never a valid vLLM answer)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        return None


def _vllm_message(body: bytes) -> str | None:
    """vLLM's message from `{"error": {"message": ...}}`, or None for any other body."""
    parsed = _json(body)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


def _is_route_404(body: bytes) -> bool:
    """FastAPI's own 404 for a path with no route, as opposed to vLLM's adapter 404."""
    parsed = _json(body)
    if not isinstance(parsed, dict):
        return False
    if "detail" in parsed and "error" not in parsed:
        return True
    # Should vLLM's HTTPException handler ever wrap the routing 404 too, its message is the bare
    # status phrase, which no adapter 404 uses ("... No adapter found ...", "... cannot be found.").
    return _vllm_message(body) == "Not Found"


def _model_entry(item: object) -> ModelEntry | None:
    if not isinstance(item, dict):
        return None
    model_id, root, parent = item.get("id"), item.get("root"), item.get("parent")
    if not isinstance(model_id, str) or not model_id:
        return None
    if not (root is None or isinstance(root, str)) or not (
        parent is None or isinstance(parent, str)
    ):
        return None
    return ModelEntry(id=model_id, root=root, parent=parent)
