"""The vLLM HTTP client against scripted answers (httpx.MockTransport).

The fake answers below are vLLM 0.32's, as described in VLLM_FACTS.md and read from its source
(`entrypoints/serve/lora/api_router.py`, `entrypoints/openai/models/serving.py`,
`entrypoints/serve/middleware/authenticate.py`): errors are JSONResponse bodies
`{"error": {"message", "type", "param", "code"}}`, success is a bare `Response(content=str)`
(no content type), a missing route is FastAPI's `{"detail": "Not Found"}`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from lorawarm import vllm_client
from lorawarm.vllm_client import (
    Condition,
    LoadResult,
    ModelEntry,
    UnloadResult,
    VllmClient,
    VllmError,
)
from tests.support import vllm_responses as recorded

URL = "http://vllm.test:8000"
KEY = "sk-very-secret-key-123"
PATH = "/var/lib/lorawarm/snapshots/sql/0123456789abcdef0123456789abcdef"

Handler = Callable[[httpx.Request], httpx.Response]


# --- vLLM 0.32's answers --------------------------------------------------------------------


def vllm_error(status: int, message: str, err_type: str) -> httpx.Response:
    """An ErrorResponse as vLLM's JSONResponse sends it."""
    return httpx.Response(
        status,
        json={"error": {"message": message, "type": err_type, "param": None, "code": status}},
    )


def load_ok(name: str = "sql") -> httpx.Response:
    return httpx.Response(200, content=f"Success: LoRA adapter '{name}' added successfully.")


def unload_ok(name: str = "sql") -> httpx.Response:
    return httpx.Response(200, content=f"Success: LoRA adapter '{name}' removed successfully.")


def already_loaded(name: str = "sql") -> httpx.Response:
    return vllm_error(
        400,
        f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
        "in place, set 'load_inplace' to True.",
        "InvalidUserInput",
    )


def base_model_conflict(name: str = "tiny") -> httpx.Response:
    return vllm_error(
        400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput"
    )


def no_adapter_found(name: str = "sql") -> httpx.Response:
    return vllm_error(
        404, f"Loading lora {name} failed: No adapter found for <path>", "NotFoundError"
    )


RANK_MESSAGE = "Call to add_lora method failed: LoRA rank 64 is greater than max_lora_rank 16."


def rank_too_big() -> httpx.Response:
    return vllm_error(500, RANK_MESSAGE, "InternalServerError")


ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."


def unload_unknown(name: str = "sql") -> httpx.Response:
    return vllm_error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")


def route_missing() -> httpx.Response:
    return httpx.Response(404, json={"detail": "Not Found"})


def unauthorized() -> httpx.Response:
    return httpx.Response(401, json={"error": "Unauthorized"})


def engine_dead() -> httpx.Response:
    return httpx.Response(503)


MODELS = {
    "object": "list",
    "data": [
        {
            "id": "tiny",
            "object": "model",
            "created": 1764406000,
            "owned_by": "vllm",
            "root": "/models/tiny",
            "parent": None,
            "max_model_len": 256,
            "permission": [],
        },
        {
            "id": "sql",
            "object": "model",
            "created": 1764406001,
            "owned_by": "vllm",
            "root": PATH,
            "parent": "tiny",
            "max_model_len": None,
            "permission": [],
        },
    ],
}


# --- helpers --------------------------------------------------------------------------------


class Recorder:
    """A MockTransport that answers with `handler` and keeps every request it saw."""

    def __init__(self, handler: Handler | httpx.Response) -> None:
        self.requests: list[httpx.Request] = []
        self.closed = False
        self._handler = handler

    def transport(self) -> httpx.MockTransport:
        recorder = self

        class _Transport(httpx.MockTransport):
            async def aclose(self) -> None:
                recorder.closed = True

        return _Transport(self._answer)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if isinstance(self._handler, httpx.Response):
            return self._handler
        return self._handler(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., tuple[VllmClient, Recorder]]]:
    clients: list[VllmClient] = []

    def _make(
        handler: Handler | httpx.Response, *, api_key: str | None = None, url: str = URL
    ) -> tuple[VllmClient, Recorder]:
        recorder = Recorder(handler)
        client = VllmClient(url, api_key=api_key, transport=recorder.transport(), timeout=2.0)
        clients.append(client)
        return client, recorder

    yield _make
    for client in clients:
        await client.aclose()


def raises(exc: type[httpx.RequestError], message: str = "boom") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc(message, request=request)

    return handler


class _BrokenStream(httpx.AsyncByteStream):
    """A body that starts, then the connection is reset."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"object": "list", "da'
        raise httpx.ReadError("Connection reset by peer")


# --- health ---------------------------------------------------------------------------------


async def test_health_ok_is_a_get_without_the_key(make: Any) -> None:
    """A 200 from GET /health returns None, and /health never carries the bearer key."""
    client, rec = make(httpx.Response(200), api_key=KEY)
    assert await client.health() is None
    assert rec.last.method == "GET"
    assert rec.last.url == f"{URL}/health"
    assert "authorization" not in rec.last.headers


async def test_health_503_is_engine_dead(make: Any) -> None:
    """/health answering 503 means the engine core died."""
    client, _ = make(engine_dead())
    with pytest.raises(VllmError) as info:
        await client.health()
    assert info.value.condition is Condition.ENGINE_DEAD
    assert info.value.status == 503
    assert info.value.url == f"{URL}/health"


async def test_health_route_404_is_a_bad_response(make: Any) -> None:
    """A server without /health is not vLLM: BAD_RESPONSE, not RUNTIME_UPDATES_DISABLED."""
    client, _ = make(route_missing())
    with pytest.raises(VllmError) as info:
        await client.health()
    assert info.value.condition is Condition.BAD_RESPONSE
    assert "is this vLLM" in info.value.message


async def test_health_other_5xx_is_server_error_with_the_body(make: Any) -> None:
    """A 502 from a proxy in front of vLLM is SERVER_ERROR quoting the body."""
    client, _ = make(httpx.Response(502, text="Bad Gateway"))
    with pytest.raises(VllmError) as info:
        await client.health()
    assert info.value.condition is Condition.SERVER_ERROR
    assert info.value.message == "Bad Gateway"


async def test_health_500_with_empty_body_says_so(make: Any) -> None:
    """A 5xx without a body still gives a readable message."""
    client, _ = make(httpx.Response(500))
    with pytest.raises(VllmError) as info:
        await client.health()
    assert info.value.condition is Condition.SERVER_ERROR
    assert info.value.message == "empty body"


async def test_redirect_is_not_followed_and_is_a_bad_response(make: Any) -> None:
    """A 3xx is not vLLM's answer: it is reported, not followed."""
    client, rec = make(httpx.Response(302, headers={"location": "http://elsewhere/"}))
    with pytest.raises(VllmError) as info:
        await client.health()
    assert info.value.condition is Condition.BAD_RESPONSE
    assert info.value.message == "unexpected answer: empty body"
    assert len(rec.requests) == 1


# --- transport failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "condition"),
    [
        (httpx.ConnectError, Condition.UNREACHABLE),
        (httpx.ConnectTimeout, Condition.TIMEOUT),
        (httpx.ReadTimeout, Condition.TIMEOUT),
        (httpx.PoolTimeout, Condition.TIMEOUT),
        (httpx.RemoteProtocolError, Condition.UNREACHABLE),
        (httpx.ReadError, Condition.UNREACHABLE),
        (httpx.WriteError, Condition.UNREACHABLE),
        (httpx.DecodingError, Condition.BAD_RESPONSE),
    ],
)
async def test_transport_failures_map_to_conditions(
    make: Any, exc: type[httpx.RequestError], condition: Condition
) -> None:
    """Connect errors, resets, timeouts and undecodable bodies become VllmError, never escape."""
    client, _ = make(raises(exc, "[Errno 111] Connection refused"))
    with pytest.raises(VllmError) as info:
        await client.list_models()
    assert info.value.condition is condition
    assert info.value.status is None
    assert info.value.url == f"{URL}/v1/models"
    assert info.value.message == f"{exc.__name__}: [Errno 111] Connection refused"
    assert isinstance(info.value.__cause__, exc)


async def test_exception_without_text_is_named_by_type(make: Any) -> None:
    """A timeout whose str() is empty (httpx often does that) is described by its type."""
    client, _ = make(raises(httpx.ReadTimeout, ""))
    with pytest.raises(VllmError) as info:
        await client.health()
    assert info.value.condition is Condition.TIMEOUT
    assert info.value.message == "ReadTimeout"


async def test_reset_mid_body_is_unreachable(make: Any) -> None:
    """A connection reset while the body streams in is UNREACHABLE, not a parse error."""
    client, _ = make(httpx.Response(200, stream=_BrokenStream()))
    with pytest.raises(VllmError) as info:
        await client.list_models()
    assert info.value.condition is Condition.UNREACHABLE
    assert "Connection reset by peer" in info.value.message


async def test_timeout_setting_reaches_every_phase(make: Any) -> None:
    """The configured timeout bounds connect, read, write and pool."""
    client, rec = make(httpx.Response(200))
    await client.health()
    assert rec.last.extensions["timeout"] == {
        "connect": 2.0,
        "read": 2.0,
        "write": 2.0,
        "pool": 2.0,
    }


async def test_oversized_body_is_a_bad_response(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A body beyond MAX_BODY_BYTES is refused instead of being read into memory."""
    monkeypatch.setattr(vllm_client, "MAX_BODY_BYTES", 64)
    client, _ = make(httpx.Response(200, json={"data": [], "pad": "x" * 100}))
    with pytest.raises(VllmError) as info:
        await client.list_models()
    assert info.value.condition is Condition.BAD_RESPONSE
    assert info.value.status == 200
    assert "larger than 64 bytes" in info.value.message


# --- list_models ----------------------------------------------------------------------------


async def test_list_models_parses_base_and_lora_entries(make: Any) -> None:
    """/v1/models gives id, root (the path as sent) and parent for each entry."""
    client, rec = make(httpx.Response(200, json=MODELS), api_key=KEY)
    models = await client.list_models()
    assert models == [
        ModelEntry(id="tiny", root="/models/tiny", parent=None),
        ModelEntry(id="sql", root=PATH, parent="tiny"),
    ]
    assert rec.last.method == "GET"
    assert rec.last.url == f"{URL}/v1/models"
    assert rec.last.headers["authorization"] == f"Bearer {KEY}"


async def test_list_models_without_key_sends_no_authorization(make: Any) -> None:
    """With no API key configured no Authorization header is sent at all."""
    client, rec = make(httpx.Response(200, json={"object": "list", "data": []}))
    assert await client.list_models() == []
    assert "authorization" not in rec.last.headers


async def test_list_models_missing_root_and_parent_are_none(make: Any) -> None:
    """Entries without root/parent keys parse with None rather than failing."""
    client, _ = make(httpx.Response(200, json={"data": [{"id": "tiny"}]}))
    assert await client.list_models() == [ModelEntry(id="tiny", root=None, parent=None)]


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not json</html>",
        b'{"data": [',
        b"\xff\xfe\xfa",
        b"[" * 100_000 + b"]" * 100_000,
        b"[]",
        b"null",
        b'{"object": "list"}',
        b'{"data": {}}',
        b'{"data": [1]}',
        b'{"data": [{"root": "/a"}]}',
        b'{"data": [{"id": 5}]}',
        b'{"data": [{"id": ""}]}',
        b'{"data": [{"id": "a", "root": 3}]}',
        b'{"data": [{"id": "a", "root": "/a", "parent": ["x"]}]}',
    ],
    ids=[
        "html",
        "truncated",
        "not-utf8",
        "deeply-nested",
        "list",
        "null",
        "no-data",
        "data-not-list",
        "entry-not-object",
        "no-id",
        "id-not-str",
        "id-empty",
        "root-not-str",
        "parent-not-str",
    ],
)
async def test_list_models_malformed_body_is_bad_response(make: Any, body: bytes) -> None:
    """Malformed JSON or JSON of the wrong shape is BAD_RESPONSE, never a crash."""
    client, _ = make(httpx.Response(200, content=body))
    with pytest.raises(VllmError) as info:
        await client.list_models()
    assert info.value.condition is Condition.BAD_RESPONSE
    assert info.value.status == 200
    assert len(info.value.message) <= vllm_client.MAX_MESSAGE_CHARS


async def test_list_models_401_is_unauthorized(make: Any) -> None:
    """401 {"error": "Unauthorized"} means the key is missing or wrong."""
    client, _ = make(unauthorized(), api_key="sk-wrong")
    with pytest.raises(VllmError) as info:
        await client.list_models()
    assert info.value.condition is Condition.UNAUTHORIZED
    assert info.value.status == 401
    assert info.value.message == "missing or wrong API key"


async def test_list_models_500_error_json_is_server_error_with_vllms_message(make: Any) -> None:
    """A 500 ErrorResponse outside load/unload is SERVER_ERROR carrying vLLM's message."""
    client, _ = make(vllm_error(500, "something broke", "InternalServerError"))
    with pytest.raises(VllmError) as info:
        await client.list_models()
    assert info.value.condition is Condition.SERVER_ERROR
    assert info.value.message == "something broke"


async def test_list_models_503_is_engine_dead(make: Any) -> None:
    """503 on any route means the engine is dead."""
    client, _ = make(engine_dead())
    with pytest.raises(VllmError) as info:
        await client.list_models()
    assert info.value.condition is Condition.ENGINE_DEAD


async def test_list_models_400_error_json_is_bad_response(make: Any) -> None:
    """An adapter-style rejection on a read-only route is not expected: BAD_RESPONSE."""
    client, _ = make(vllm_error(400, "weird", "BadRequestError"))
    with pytest.raises(VllmError) as info:
        await client.list_models()
    assert info.value.condition is Condition.BAD_RESPONSE
    assert "weird" in info.value.message


# --- load -----------------------------------------------------------------------------------


async def test_load_sends_exactly_vllms_request(make: Any) -> None:
    """load() POSTs JSON {"lora_name", "lora_path", "load_inplace": false} with the key."""
    client, rec = make(load_ok(), api_key=KEY)
    assert await client.load("sql", PATH) is LoadResult.LOADED
    request = rec.last
    assert request.method == "POST"
    assert request.url == f"{URL}/v1/load_lora_adapter"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = json.loads(request.content)
    assert body == {"lora_name": "sql", "lora_path": PATH, "load_inplace": False}
    assert list(body) == ["lora_name", "lora_path", "load_inplace"]
    assert body["load_inplace"] is False


async def test_load_without_key_sends_no_authorization(make: Any) -> None:
    """Without an API key the load request has no Authorization header."""
    client, rec = make(load_ok())
    assert await client.load("sql", PATH) is LoadResult.LOADED
    assert "authorization" not in rec.last.headers


@pytest.mark.parametrize("path", ["sql", "./sql", "snapshots/sql", "", "org/repo"])
async def test_load_refuses_a_relative_path_without_calling_vllm(make: Any, path: str) -> None:
    """A relative lora_path is a ValueError before any request (vLLM would try the Hub)."""
    client, rec = make(load_ok())
    with pytest.raises(ValueError, match="absolute"):
        await client.load("sql", path)
    assert rec.requests == []


async def test_load_200_with_unexpected_body_is_bad_response(make: Any) -> None:
    """A 200 whose body is not vLLM's `Success: ...` text is BAD_RESPONSE."""
    client, _ = make(httpx.Response(200, text="<html>captive portal</html>"))
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.BAD_RESPONSE
    assert "captive portal" in info.value.message


async def test_load_already_loaded_is_a_result(make: Any) -> None:
    """400 `already been loaded` returns ALREADY_LOADED instead of raising."""
    client, _ = make(already_loaded())
    assert await client.load("sql", PATH) is LoadResult.ALREADY_LOADED


async def test_load_base_model_name_is_rejected_with_vllms_message(make: Any) -> None:
    """Another 400 ErrorResponse is REJECTED and keeps vLLM's message."""
    client, _ = make(base_model_conflict())
    with pytest.raises(VllmError) as info:
        await client.load("tiny", PATH)
    assert info.value.condition is Condition.REJECTED
    assert info.value.status == 400
    assert info.value.message == "The lora adapter 'tiny' conflicts with a served base model."


async def test_load_adapter_404_is_rejected_not_disabled(make: Any) -> None:
    """An adapter 404 (`{"error": ...}`, no adapter found) is REJECTED."""
    client, _ = make(no_adapter_found())
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.REJECTED
    assert info.value.status == 404
    assert info.value.message == "Loading lora sql failed: No adapter found for <path>"


async def test_load_route_404_means_runtime_updates_disabled(make: Any) -> None:
    """FastAPI's 404 {"detail": "Not Found"} means VLLM_ALLOW_RUNTIME_LORA_UPDATING is off."""
    client, _ = make(route_missing())
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.RUNTIME_UPDATES_DISABLED
    assert info.value.status == 404
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in info.value.message


async def test_load_route_404_wrapped_by_vllms_handler_is_still_disabled(make: Any) -> None:
    """A routing 404 rendered as ErrorResponse (bare message "Not Found") is also DISABLED."""
    client, _ = make(vllm_error(404, "Not Found", "Not Found"))
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.RUNTIME_UPDATES_DISABLED


async def test_load_rank_too_big_is_rejected_with_vllms_message(make: Any) -> None:
    """The engine's 500 (rank above --max-lora-rank) is REJECTED with vLLM's own words."""
    client, _ = make(rank_too_big())
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.REJECTED
    assert info.value.status == 500
    assert info.value.message == RANK_MESSAGE


async def test_load_500_engine_dead_message_is_engine_dead(make: Any) -> None:
    """A 500 carrying EngineDeadError's message is ENGINE_DEAD, not a rejected adapter."""
    client, _ = make(vllm_error(500, ENGINE_DEAD_MESSAGE, "InternalServerError"))
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.ENGINE_DEAD
    assert info.value.message == ENGINE_DEAD_MESSAGE


async def test_load_400_engine_dead_of_vllm_0_17_is_engine_dead(make: Any) -> None:
    """vLLM up to 0.17.x answers a load on a dead engine with a 400 BadRequestError carrying
    EngineDeadError's message: that is ENGINE_DEAD (back the server off), not a rejection."""
    status, content_type, body = recorded.OLDER_VERSION_RESPONSES["v0_17_load_engine_dead"]
    client, _ = make(
        httpx.Response(status, headers={"content-type": str(content_type)}, content=body.encode())
    )
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.ENGINE_DEAD
    assert info.value.status == 400
    assert info.value.message == ENGINE_DEAD_MESSAGE


async def test_load_503_is_engine_dead(make: Any) -> None:
    """503 on load is ENGINE_DEAD."""
    client, _ = make(engine_dead())
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.ENGINE_DEAD
    assert info.value.message == "vLLM's engine is dead"


async def test_load_503_keeps_vllms_message_when_there_is_one(make: Any) -> None:
    """A 503 ErrorResponse keeps vLLM's message."""
    client, _ = make(vllm_error(503, "engine is gone", "ServiceUnavailableError"))
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.ENGINE_DEAD
    assert info.value.message == "engine is gone"


@pytest.mark.parametrize(
    ("response", "condition"),
    [
        (httpx.Response(400, text="not json"), Condition.BAD_RESPONSE),
        (httpx.Response(400, json={"error": "flat string"}), Condition.BAD_RESPONSE),
        (httpx.Response(400, json={"error": {"message": 42}}), Condition.BAD_RESPONSE),
        (httpx.Response(404, text="Not Found"), Condition.BAD_RESPONSE),
        (httpx.Response(404, json=["detail"]), Condition.BAD_RESPONSE),
        (httpx.Response(422, json={"detail": [{"msg": "x"}]}), Condition.BAD_RESPONSE),
        (httpx.Response(500, text="Internal Server Error"), Condition.SERVER_ERROR),
        (httpx.Response(502, json={"error": {"message": "upstream"}}), Condition.SERVER_ERROR),
    ],
    ids=[
        "400-text",
        "400-flat-error",
        "400-message-not-str",
        "404-text",
        "404-list",
        "422-detail",
        "500-text",
        "502-error-json",
    ],
)
async def test_load_malformed_errors_are_not_rejections(
    make: Any, response: httpx.Response, condition: Condition
) -> None:
    """Error bodies without vLLM's ErrorResponse shape are BAD_RESPONSE (5xx: SERVER_ERROR)."""
    client, _ = make(response)
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is condition
    assert info.value.status == response.status_code


async def test_load_401_is_unauthorized(make: Any) -> None:
    """401 on load is UNAUTHORIZED."""
    client, _ = make(unauthorized())
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.UNAUTHORIZED


async def test_long_vllm_message_is_capped(make: Any) -> None:
    """vLLM's message is kept but capped at MAX_MESSAGE_CHARS."""
    long = "Call to add_lora method failed: " + "x" * 5000
    client, _ = make(vllm_error(500, long, "InternalServerError"))
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert info.value.condition is Condition.REJECTED
    assert len(info.value.message) == vllm_client.MAX_MESSAGE_CHARS
    assert info.value.message.startswith("Call to add_lora method failed: xxx")
    assert info.value.message.endswith("…")


async def test_long_plain_body_is_capped(make: Any) -> None:
    """A huge non-JSON error body is quoted only up to MAX_MESSAGE_CHARS."""
    client, _ = make(httpx.Response(502, text="y" * 100_000))
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    assert len(info.value.message) == vllm_client.MAX_MESSAGE_CHARS


# --- unload ---------------------------------------------------------------------------------


async def test_unload_sends_only_the_name(make: Any) -> None:
    """unload() POSTs application/json {"lora_name"} with the key and returns UNLOADED."""
    client, rec = make(unload_ok(), api_key=KEY)
    assert await client.unload("sql") is UnloadResult.UNLOADED
    request = rec.last
    assert request.method == "POST"
    assert request.url == f"{URL}/v1/unload_lora_adapter"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content) == {"lora_name": "sql"}


async def test_unload_unknown_name_is_not_found(make: Any) -> None:
    """404 `cannot be found` returns NOT_FOUND instead of raising."""
    client, _ = make(unload_unknown())
    assert await client.unload("sql") is UnloadResult.NOT_FOUND


async def test_unload_route_404_means_runtime_updates_disabled(make: Any) -> None:
    """FastAPI's route 404 on unload is RUNTIME_UPDATES_DISABLED, not NOT_FOUND."""
    client, _ = make(route_missing())
    with pytest.raises(VllmError) as info:
        await client.unload("sql")
    assert info.value.condition is Condition.RUNTIME_UPDATES_DISABLED


async def test_unload_200_with_unexpected_body_is_bad_response(make: Any) -> None:
    """A 200 on unload without vLLM's `Success: ...` text is BAD_RESPONSE."""
    client, _ = make(httpx.Response(200, json={"ok": True}))
    with pytest.raises(VllmError) as info:
        await client.unload("sql")
    assert info.value.condition is Condition.BAD_RESPONSE


async def test_unload_other_400_is_rejected(make: Any) -> None:
    """Another ErrorResponse on unload (e.g. empty name) is REJECTED with vLLM's message."""
    message = "'lora_name' needs to be provided to unload a LoRA adapter."
    client, _ = make(vllm_error(400, message, "InvalidUserInput"))
    with pytest.raises(VllmError) as info:
        await client.unload("")
    assert info.value.condition is Condition.REJECTED
    assert info.value.message == message


async def test_unload_401_is_unauthorized(make: Any) -> None:
    """401 on unload is UNAUTHORIZED."""
    client, _ = make(unauthorized())
    with pytest.raises(VllmError) as info:
        await client.unload("sql")
    assert info.value.condition is Condition.UNAUTHORIZED


# --- secrets, errors, construction ----------------------------------------------------------


async def test_api_key_never_appears_in_errors_or_reprs(make: Any) -> None:
    """The API key is in no error message, str, repr or traceback args, nor the client's repr."""
    client, _ = make(unauthorized(), api_key=KEY)
    with pytest.raises(VllmError) as info:
        await client.load("sql", PATH)
    err = info.value
    for text in (str(err), repr(err), err.message, str(err.url), repr(err.args), repr(client)):
        assert KEY not in text
    assert repr(client) == f"VllmClient('{URL}', api_key='set')"


async def test_api_key_echoed_by_a_server_is_redacted(make: Any) -> None:
    """Should anything echo the key back in a body, the message shows *** instead."""
    client, _ = make(
        httpx.Response(502, text=f"bad header Authorization: Bearer {KEY}"), api_key=KEY
    )
    with pytest.raises(VllmError) as info:
        await client.health()
    assert KEY not in info.value.message
    assert info.value.message == "bad header Authorization: Bearer ***"


async def test_client_repr_without_key(make: Any) -> None:
    """The client's repr names the server and that no key is set."""
    client, _ = make(httpx.Response(200))
    assert repr(client) == f"VllmClient('{URL}', api_key=None)"


def test_error_str_repr_and_pickle() -> None:
    """VllmError renders condition, message, URL and status, and survives pickling."""
    err = VllmError(Condition.REJECTED, "no", status=400, url=f"{URL}/v1/load_lora_adapter")
    assert str(err) == f"rejected: no ({URL}/v1/load_lora_adapter HTTP 400)"
    assert repr(err) == (
        f"VllmError('rejected', 'no', status=400, url='{URL}/v1/load_lora_adapter')"
    )
    copy = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own bytes
    assert (copy.condition, copy.message, copy.status, copy.url) == (
        err.condition,
        err.message,
        err.status,
        err.url,
    )
    assert str(VllmError(Condition.TIMEOUT, "slow")) == "timeout: slow"
    assert str(VllmError(Condition.TIMEOUT, "slow", url=URL)) == f"timeout: slow ({URL})"


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("http://vllm.test:8000/", "http://vllm.test:8000"),
        ("  http://vllm.test:8000//  ", "http://vllm.test:8000"),
        ("HTTPS://VLLM.test", "https://vllm.test"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
async def test_base_url_is_normalised(make: Any, given: str, normalised: str) -> None:
    """base_url loses trailing slashes and surrounding blanks."""
    client, _ = make(httpx.Response(200), url=given)
    assert client.base_url == normalised


async def test_base_url_path_prefix_is_kept(make: Any) -> None:
    """A vLLM behind a path prefix is called under that prefix."""
    client, rec = make(httpx.Response(200, json={"data": []}), url="http://proxy.test/vllm/")
    await client.list_models()
    assert rec.last.url == "http://proxy.test/vllm/v1/models"


@pytest.mark.parametrize(
    "url",
    [
        "vllm.test:8000",
        "http://",
        "ftp://vllm.test",
        "",
        "http://user:pw@vllm.test",
        "ftp://user:pw@vllm.test",
    ],
)
def test_bad_base_url_is_refused(url: str) -> None:
    """A URL that is not http(s)://host, or that carries credentials, is a ValueError."""
    with pytest.raises(ValueError, match="vLLM URL") as info:
        VllmClient(url)
    assert "pw" not in str(info.value)


async def test_async_context_manager_closes_the_transport() -> None:
    """Leaving `async with` closes the connection pool."""
    rec = Recorder(httpx.Response(200))
    async with VllmClient(URL, transport=rec.transport()) as client:
        await client.health()
        assert not rec.closed
    assert rec.closed
