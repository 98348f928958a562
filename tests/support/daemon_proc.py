"""The real `lorawarm run` process, driven from tests only through its CLI, files and HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support.vllm_server import free_port

T = TypeVar("T")


def wait_for(
    check: Callable[[], T | None], *, timeout: float = 60.0, interval: float = 0.2, what: str = ""
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = check()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class LorawarmProcess:
    """`lorawarm run` in a subprocess with its own drop dir, state dir and status port."""

    def __init__(
        self,
        cache_dir: Path,
        state_dir: Path,
        urls: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        log_path: Path | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        """`wrapper` is a command that execs the daemon (e.g. `setpriv ... --`): same pid."""
        self.cache_dir = cache_dir
        self.state_dir = state_dir
        self.urls = list(urls)
        self.port = free_port()
        self.env_overrides = dict(env or {})
        self.args = list(args)
        self.wrapper = list(wrapper)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="lorawarm-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
        env.update(
            {
                "LORAWARM_CACHE_DIR": str(self.cache_dir),
                "LORAWARM_STATE_DIR": str(self.state_dir),
                "LORAWARM_VLLM_URLS": ",".join(self.urls),
                "LORAWARM_STATUS_PORT": str(self.port),
                "LORAWARM_SETTLE_SECONDS": "1",
                "LORAWARM_HEALTH_SECONDS": "0.5",
                "LORAWARM_MAX_BACKOFF_SECONDS": "2",
                "LORAWARM_LOG_FORMAT": "json",
                "LORAWARM_LOG_LEVEL": "debug",
            }
        )
        env.update(self.env_overrides)
        return env

    def start(self) -> LorawarmProcess:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "lorawarm.cli", "run", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"lorawarm exited early:\n{self.log_text()[-4000:]}")
            return httpx.get(f"{self.status_url}/readyz", timeout=2).status_code == 200

        wait_for(ready, timeout=timeout, what="lorawarm /readyz")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- the status API ---------------------------------------------------------------------
    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.status_url}{path}", timeout=5, **kwargs)

    def adapter(self, name: str) -> dict[str, Any] | None:
        response = self.get(f"/v1/adapters/{name}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            doc = self.adapter(name)
            return doc if doc is not None and doc["state"] == state else None

        return wait_for(check, timeout=timeout, what=f"adapter {name!r} to be {state}")

    def servers(self) -> list[dict[str, Any]]:
        servers: list[dict[str, Any]] = self.get("/v1/servers").json()["servers"]
        return servers

    def __enter__(self) -> LorawarmProcess:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def lora_models(url: str, api_key: str | None = None) -> dict[str, str]:
    """The LoRA adapters a vLLM server lists: name -> root (the path it was loaded from)."""
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    data = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"]
    return {m["id"]: m["root"] for m in data if m.get("parent")}
