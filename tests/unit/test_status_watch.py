"""`lorawarm status --watch`: the table redrawn in place on a real terminal (a pty) over a
real daemon, until Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorawarm.settings import Settings
from lorawarm.status_cli import watch_status
from tests.support.daemon_proc import LorawarmProcess
from tests.unit.adapters import write_adapter

UNREACHABLE = "http://127.0.0.1:9"


class Terminal:
    """`lorawarm status ...` with its output on a pseudo-terminal, read as a person sees it."""

    def __init__(self, *argv: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lorawarm.cli", "status", *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, text: str, timeout: float = 30.0) -> str:
        """Everything printed so far, once `text` has been printed (after what was read)."""
        start = len(self.screen)
        deadline = time.monotonic() + timeout
        while text not in self.screen[start:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not shown in {timeout} s: {self.screen[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the process closed the terminal
                    break
        return self.screen

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=10)
        self.read_until("", timeout=0.5)
        os.close(self.master)
        return code


def test_watch_redraws_until_ctrl_c(tmp_path: Path) -> None:
    """`--watch` redraws the table in place (cursor home, clear) every interval, shows an
    adapter published while it runs, and Ctrl-C ends it with exit 0 and no traceback."""
    drop = tmp_path / "drop"
    drop.mkdir()
    write_adapter(drop / "watched-one")
    with LorawarmProcess(drop, tmp_path / "state", [UNREACHABLE]) as proc:
        term = Terminal("--url", proc.status_url, "--watch", "--interval", "0.3")
        term.read_until("watched-one")
        staged = write_adapter(drop / ".watched-two.tmp")
        staged.rename(drop / "watched-two")
        screen = term.read_until("watched-two")
        code = term.interrupt()
    assert code == 0
    frames = screen.split("\x1b[H\x1b[J")
    assert len(frames) >= 3
    assert all(f.startswith(f"lorawarm status {proc.status_url}") for f in frames[1:])
    assert "Ctrl-C to stop" in frames[-1]
    assert "Traceback" not in term.screen
    assert "KeyboardInterrupt" not in term.screen


def test_watch_keeps_going_while_the_daemon_is_away(tmp_path: Path) -> None:
    """A daemon that cannot be reached is said on the screen, and the watch goes on asking
    (it may be restarting) until Ctrl-C, which still exits 0."""
    term = Terminal("--url", UNREACHABLE, "--watch", "--interval", "0.2")
    screen = term.read_until("cannot read the status API")
    screen = term.read_until("cannot read the status API")
    assert term.process.poll() is None
    assert term.interrupt() == 0
    assert screen.count("\x1b[H\x1b[J") >= 2


def test_watch_interval_must_be_positive() -> None:
    """`--interval 0` is a usage error (exit 2), not a busy loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
    done = subprocess.run(
        [sys.executable, "-m", "lorawarm.cli", "status", "--watch", "--interval", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--interval" in done.stderr


def test_watch_in_process_until_sigint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`watch_status` itself: piped (not a terminal) it prints one frame after another
    without redraw sequences, and a real SIGINT ends it with 0; `--json` prints one JSON
    line per view."""
    drop = tmp_path / "drop"
    drop.mkdir()
    write_adapter(drop / "in-process")
    settings = Settings(cache_dir=drop)
    with LorawarmProcess(drop, tmp_path / "state", [UNREACHABLE]) as proc:
        for as_json in (False, True):
            timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                code = watch_status(settings, url=proc.status_url, as_json=as_json, interval=0.2)
            finally:
                timer.cancel()
            assert code == 0
            out = capsys.readouterr().out
            if as_json:
                views = [json.loads(line) for line in out.splitlines() if line]
                assert len(views) >= 2
                assert all(v["adapters"][0]["name"] == "in-process" for v in views)
            else:
                assert "\x1b[" not in out
                assert out.count(f"lorawarm status {proc.status_url}") >= 2
                assert "in-process" in out
