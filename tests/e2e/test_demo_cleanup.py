"""`make demo` stops what it started however it is stopped: Ctrl-C with its output piped into a
`tee` that the same Ctrl-C killed, SIGTERM, and SIGHUP (the terminal closed). vLLM runs in a
session of its own, so only the demo's clean-up can stop it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def alive_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rfind(")") + 2 :].split()
                if fields[0] != "Z" and int(fields[2]) == pgid:
                    members.append(int(entry.name))
    return members


def children(pid: int) -> dict[str, int]:
    """The live children of `pid` that the demo starts, by role: `vllm` (the API server, leader
    of its own process group) and `lorawarm` (`lorawarm run`)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                fields = stat[stat.rfind(")") + 2 :].split()
                if fields[0] != "Z" and int(fields[1]) == pid:
                    if b"vllm.entrypoints.openai.api_server" in cmdline:
                        found["vllm"] = int(entry.name)
                    elif b"lorawarm.cli run" in cmdline:
                        found["lorawarm"] = int(entry.name)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


class Demo:
    """`python -m tests.support.demo` in its own process group, as a shell runs a foreground
    job: Ctrl-C is SIGINT to that whole group (the demo and `lorawarm run`, not vLLM)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
        self.stderr = (workdir / "demo.stderr").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.demo", "--workdir", str(workdir)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )
        self.output = b""
        self.seen: dict[str, int] = {}  # every child the demo started, for the clean-up

    def pids(self) -> dict[str, int]:
        found = children(self.process.pid)
        self.seen.update(found)
        return found

    def wait_for(self, *, text: bytes = b"", pid: str = "", timeout: float) -> dict[str, int]:
        """Read the demo's output until `text` appeared and the child `pid` is running."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"demo exited early:\n{self.log()}")
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                self.output += os.read(self.process.stdout.fileno(), 65536)
            pids = self.pids()
            if text in self.output and (not pid or pid in pids):
                return pids
        raise AssertionError(f"no {text!r} / {pid!r} after {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return (
            self.output.decode(errors="replace")[-3000:]
            + (self.workdir / "demo.stderr").read_text(errors="replace")[-3000:]
        )

    def close(self) -> None:
        """Whatever happened, leave nothing running."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        # Only what is still alive: a pid that is gone may be someone else's by now.
        if "vllm" in self.seen and alive_in_group(self.seen["vllm"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.seen["vllm"], signal.SIGKILL)
        if "lorawarm" in self.seen and alive(self.seen["lorawarm"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.seen["lorawarm"], signal.SIGKILL)
        self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    running = Demo(tmp_path)
    yield running
    running.close()


def assert_all_stopped(demo: Demo, pids: dict[str, int]) -> None:
    code = demo.process.wait(90)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        alive_in_group(pids["vllm"]) or ("lorawarm" in pids and alive(pids["lorawarm"]))
    ):
        time.sleep(0.2)
    assert alive_in_group(pids["vllm"]) == [], "vLLM outlived the demo"
    if "lorawarm" in pids:
        assert not alive(pids["lorawarm"]), "lorawarm outlived the demo"
    assert code == 0, demo.log()


@pytest.mark.timeout(480)
def test_ctrl_c_with_output_piped_to_a_dead_tee_stops_vllm_and_lorawarm(demo: Demo) -> None:
    """Ctrl-C at the running demo whose stdout reader is gone (`make demo | tee`, tee killed by
    the same Ctrl-C) still stops vLLM and lorawarm, and the demo exits 0."""
    pids = demo.wait_for(text=b"Ctrl-C stops everything", pid="lorawarm", timeout=420)
    assert b"bin/lorawarm status --url" in demo.output  # a command that works, not on PATH
    assert demo.process.stdout is not None
    demo.process.stdout.close()  # the reader is gone: every later write is a broken pipe
    os.killpg(demo.process.pid, signal.SIGINT)
    assert_all_stopped(demo, pids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_while_vllm_starts_stop_vllm(demo: Demo, signum: int) -> None:
    """SIGTERM, or SIGHUP from a closed terminal, to the demo while vLLM is still starting stops
    vLLM (its own session: nobody else would) and the demo exits 0."""
    pids = demo.wait_for(text=b"starting vLLM", pid="vllm", timeout=240)
    time.sleep(3)  # vLLM is importing torch now
    assert alive_in_group(pids["vllm"]), "vLLM is not running yet"
    demo.process.send_signal(signum)
    assert_all_stopped(demo, pids)
