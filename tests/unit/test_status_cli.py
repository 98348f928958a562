"""`lorawarm status` as people read it: a table that is safe to print, one clear line on errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorawarm.status_cli import render
from tests.support.daemon_proc import LorawarmProcess, wait_for

UNREACHABLE = "http://127.0.0.1:9"
EVIL = "evil\x1b]0;owned\x07\x1b[2J"


def status(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
    return subprocess.run(
        [sys.executable, "-m", "lorawarm.cli", "status", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_status_table_escapes_control_characters_in_names(tmp_path: Path) -> None:
    """A folder whose name holds ESC sequences (retitle, clear screen) shows up in the real
    `lorawarm status` table as visible escapes; no control character reaches the terminal."""
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / EVIL).mkdir()
    with LorawarmProcess(drop, tmp_path / "state", [UNREACHABLE]) as proc:
        wait_for(
            lambda: [a for a in proc.get("/v1/adapters").json()["adapters"] if a["reason"]],
            what="the evil folder to be judged",
        )
        done = status("--url", proc.status_url)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert "\x07" not in done.stdout
    assert "evil\\x1b]0;owned\\x07\\x1b[2J" in done.stdout
    assert "invalid_name" in done.stdout


def test_render_escapes_every_field() -> None:
    """Names, reasons, conditions, server URLs and messages from the status API are all printed
    with their control characters escaped, and the table stays one line per adapter."""
    adapters = {
        "adapters": [
            {
                "name": "a\x1b[31m",
                "state": "failed",
                "reason": "r\x9b",
                "message": "vLLM said:\n\x1b[2J",
                "servers": [{"url": "http://v", "state": "failed", "condition": "c\x1b"}],
            }
        ]
    }
    servers = {
        "servers": [{"url": "http://v", "condition": "rejected", "message": "m\r\x1b", "loaded": 0}]
    }
    text = render(adapters, servers)
    assert "\x1b" not in text
    assert "\x9b" not in text
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[1].split() == ["a\\x1b[31m", "failed", "r\\x9b", "failed", "(c\\x1b)"]
    assert "rejected: m\\r\\x1b" in text
    assert lines[-1] == "a\\x1b[31m: vLLM said:\\n\\x1b[2J"


class _NotFound(BaseHTTPRequestHandler):
    """Any web server that is not lorawarm: 404 with an HTML page."""

    def do_GET(self) -> None:
        body = b"<html><body>Not Found</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test's output is the CLI's."""


@pytest.fixture
def other_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_status_of_a_url_that_is_not_lorawarm_is_one_clear_line(other_server: str) -> None:
    """`lorawarm status --url` at a web server that is not lorawarm prints one line saying so,
    with the HTTP status, and no library link; exit 1."""
    done = status("--url", other_server)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"lorawarm: {other_server} did not answer like a lorawarm status API "
        "(HTTP 404 on /v1/adapters)"
    ]
