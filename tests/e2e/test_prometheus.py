"""A real Prometheus (Debian's `prometheus`) scraping a running `lorawarm run` through its
bearer token, with the shipped alerting rules loaded."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import AdapterFactory
from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.support.vllm_server import free_port

pytestmark = pytest.mark.e2e

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "lorawarm-alerts.yml"
TOKEN = "scrape-token-0123456789"


class Prometheus:
    """`prometheus` on a free loopback port with its own config and data directory."""

    def __init__(self, workdir: Path, target: str, token_file: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "lorawarm",
                    "static_configs": [{"targets": [target]}],
                    "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                }
            ],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.data = workdir / "data"
        self.log = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(self._ready, timeout=60, what="prometheus /-/ready")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, **params: str) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> dict[str, float]:
        """An instant query: one value per series, keyed by its labels (sorted, as text)."""
        result = self.api("query", query=promql)["result"]
        return {
            ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1])
            for r in result
        }


@pytest.fixture
def daemon(tmp_path: Path, adapters: AdapterFactory) -> Iterator[LorawarmProcess]:
    """lorawarm with a status token, one valid and one invalid (truncated) adapter, and a
    vLLM URL nobody answers at (a server that is down)."""
    drop = tmp_path / "drop"
    drop.mkdir()
    adapters.copy_to(drop / "prom-good", seed=1)
    broken = adapters.copy_to(drop / "prom-broken", seed=2)
    weights = broken / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # invalid whatever the server
    down = f"http://127.0.0.1:{free_port()}"
    env = {"LORAWARM_STATUS_TOKEN": TOKEN}
    proc = LorawarmProcess(drop, tmp_path / "state", [down], env=env).start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        wait_for(lambda: proc.get("/readyz", headers=auth).status_code == 200, what="ready")
        yield proc
    finally:
        proc.stop()


def test_prometheus_scrapes_lorawarm_and_evaluates_the_alerts(
    daemon: LorawarmProcess, tmp_path: Path
) -> None:
    """Prometheus scrapes lorawarm with the token, its HTTP API answers lorawarm's series
    (the invalid adapter, the down server), and the shipped rules evaluate them: the server-
    down alert is pending for that server."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    target = f"127.0.0.1:{daemon.port}"
    server = daemon.urls[0]
    with Prometheus(tmp_path, target, token_file) as prom:
        up = wait_for(lambda: prom.query('up{job="lorawarm"}'), timeout=60, what="a scrape")
        assert list(up.values()) == [1.0], up
        invalid = wait_for(
            lambda: prom.query('lorawarm_adapters{state="invalid"}'), what="lorawarm_adapters"
        )
        assert list(invalid.values()) == [1.0]
        down = prom.query("lorawarm_server_up")
        assert down == {
            f"__name__=lorawarm_server_up,instance={target},job=lorawarm,server={server}": 0.0
        }

        def pending() -> list[dict[str, Any]]:
            alerts = prom.api("alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "LorawarmServerDown"]

        alerts = wait_for(pending, timeout=30, what="LorawarmServerDown pending")
        assert [(a["state"], a["labels"]["server"]) for a in alerts] == [("pending", server)]
        groups = prom.api("rules")["groups"]
        assert {r["health"] for g in groups for r in g["rules"]} == {"ok"}
