"""The fake vLLM over HTTP (tests/support/fake_vllm_http.py) itself: answers byte for byte as
recorded from vLLM 0.32 when no fault is scripted, each scripted fault as documented, and no
thread left behind."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from tests.support import vllm_responses as recorded
from tests.support.daemon_proc import wait_for
from tests.support.fake_vllm import FakeVllm
from tests.support.fake_vllm_http import BAD_GATEWAY, FakeVllmHttp
from tests.unit.adapters import write_adapter


def triple(response: httpx.Response) -> tuple[int, str | None, str]:
    """(status, content-type or None, body) as the recording keeps them."""
    return response.status_code, response.headers.get("content-type"), response.text


def test_answers_are_the_recorded_ones_byte_for_byte(tmp_path: Path) -> None:
    """Without faults the status, content-type (none where vLLM sends none) and body are vLLM's
    recorded answers, framed as uvicorn frames them."""
    adapter = write_adapter(tmp_path / "a")
    with FakeVllmHttp() as server, httpx.Client(base_url=server.url) as client:
        health = client.get("/health")
        assert triple(health) == recorded.RESPONSES["health"]
        assert health.headers["server"] == "uvicorn"
        assert "date" in health.headers
        load = {"lora_name": "a", "lora_path": str(adapter)}
        assert (
            triple(client.post("/v1/load_lora_adapter", json=load))
            == (recorded.RESPONSES["load_success"])
        )
        assert (
            triple(client.post("/v1/load_lora_adapter", json=load))
            == (recorded.RESPONSES["load_already_loaded"])
        )
        missing = {"lora_name": "missing", "lora_path": str(tmp_path / "does-not-exist")}
        assert (
            triple(client.post("/v1/load_lora_adapter", json=missing))
            == (recorded.RESPONSES["load_missing_folder"])
        )
        assert (
            triple(client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}))
            == (recorded.RESPONSES["unload_success"])
        )
        assert (
            triple(client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}))
            == (recorded.RESPONSES["unload_unknown"])
        )
    with (
        FakeVllmHttp(FakeVllm(runtime_updates=False, api_key="k")) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert triple(client.get("/v1/models")) == recorded.RESPONSES["auth_models_missing_key"]
        keyed = {"Authorization": "Bearer k"}
        assert (
            triple(client.post("/v1/load_lora_adapter", json={"lora_name": "a"}, headers=keyed))
            == recorded.RESPONSES["noruntime_load"]
        )


def test_scripted_faults_happen_as_documented() -> None:
    """A burst answers N times then stops, a malformed answer lasts until cleared, a reset
    closes the connection unanswered, and a FakeVllm transport fault is a reset too."""
    with FakeVllmHttp() as server, httpx.Client(base_url=server.url) as client:
        server.burst(502, "models", "load", times=2)
        assert triple(client.get("/v1/models")) == (
            BAD_GATEWAY[0],
            "text/html",
            BAD_GATEWAY[2].decode(),
        )
        assert client.get("/health").status_code == 200  # not a route of the burst
        assert client.get("/v1/models").status_code == 502
        assert client.get("/v1/models").status_code == 200

        server.answer("models", status=200, body=b"nope", content_type="text/plain")
        assert [client.get("/v1/models").text for _ in range(3)] == ["nope"] * 3
        server.clear()
        assert client.get("/v1/models").json()["object"] == "list"

        server.reset("health", times=1)
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            client.get("/health")
        assert server.requests("health")[-1].outcome == "reset"
        with server.lock:
            server.fake.reachable = False
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            client.get("/health")
        with server.lock:
            server.fake.reachable = True
        assert client.get("/health").status_code == 200


def test_a_delay_past_the_client_timeout_is_carried_out_and_the_leaving_client_seen(
    tmp_path: Path,
) -> None:
    """A delayed load times the client out; the fake notes the client leaving and still
    registers the adapter when its time comes, as vLLM does."""
    adapter = write_adapter(tmp_path / "a")
    with FakeVllmHttp() as server, httpx.Client(base_url=server.url) as client:
        server.delay("load", seconds=1.0, times=1)
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                "/v1/load_lora_adapter",
                json={"lora_name": "a", "lora_path": str(adapter)},
                timeout=0.2,
            )
        seen = server.requests("load")[0]
        wait_for(lambda: seen.outcome == "answered", timeout=10, what="the delayed load done")
        assert seen.client_gone is not None
        assert server.registry() == {"a": str(adapter)}


def test_leaves_no_thread_behind_even_with_a_request_waiting() -> None:
    """Leaving the block stops the server with a request still waiting on a long delay: the
    client sees the connection close, and no thread is left."""
    before = {t.ident for t in threading.enumerate()}
    errors: list[BaseException] = []
    with FakeVllmHttp() as server:
        server.delay("health", seconds=60)

        def call() -> None:
            try:
                httpx.get(f"{server.url}/health", timeout=120)
            except httpx.HTTPError as err:
                errors.append(err)

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: server.requests("health"), what="the request received")
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1
    assert {t.ident for t in threading.enumerate()} <= before
