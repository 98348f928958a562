"""Logging: JSON lines for journald, a console on a terminal, stdlib loggers in the same shape."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from lorawarm.logs import configure, get_logger

NOISY = ("httpx", "httpcore", "watchdog", "uvicorn.access")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave the root logger and structlog as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in NOISY}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)
    structlog.reset_defaults()


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """In JSON mode one event is one JSON line with event, level, logger, UTC time and fields."""
    configure("json", "info")
    get_logger("lorawarm.test").info("adapter_validated", adapter="x", reason=None)
    [line] = lines(capsys)
    doc = json.loads(line)
    assert doc["event"] == "adapter_validated"
    assert (doc["level"], doc["logger"], doc["adapter"]) == ("info", "lorawarm.test", "x")
    assert doc["timestamp"].endswith("Z")


def test_auto_is_json_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """`auto` writes JSON when stdout is not a terminal (journald, a pipe)."""
    configure("auto")
    get_logger("t").info("hello")
    assert json.loads(lines(capsys)[0])["event"] == "hello"


def test_stdlib_loggers_are_routed(capsys: pytest.CaptureFixture[str]) -> None:
    """Standard-library loggers come out as the same JSON lines; chatty ones only from WARNING."""
    configure("json", "debug")
    logging.getLogger("somelib").info("plain %s", "stdlib")
    logging.getLogger("httpx").info("one line per request")
    logging.getLogger("httpx").warning("connection refused")
    docs = [json.loads(line) for line in lines(capsys)]
    assert [(d["event"], d["logger"]) for d in docs] == [
        ("plain stdlib", "somelib"),
        ("connection refused", "httpx"),
    ]


def test_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    """Events below the configured level are dropped."""
    configure("json", "warning")
    log = get_logger("t")
    log.info("dropped")
    log.warning("kept")
    assert [json.loads(line)["event"] for line in lines(capsys)] == ["kept"]


def test_exceptions_are_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A logged exception stays inside its one JSON line, traceback included."""
    configure("json")
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("t").exception("load_failed")
    [line] = lines(capsys)
    doc = json.loads(line)
    assert doc["event"] == "load_failed"
    assert "ValueError: boom" in doc["exception"]


def test_console_format(capsys: pytest.CaptureFixture[str]) -> None:
    """The console format is readable text, not JSON, and carries the event and fields."""
    configure("console", "info")
    get_logger("t").info("adapter_loaded", adapter="x")
    [line] = lines(capsys)
    assert "adapter_loaded" in line
    assert "adapter=x" in line
    assert not line.startswith("{")


def test_configure_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    """Configuring again replaces the handler instead of doubling every line."""
    configure("json")
    configure("json")
    get_logger("t").info("once")
    assert len(lines(capsys)) == 1


def test_console_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    """In the console format an adapter name or message holding ESC (or another control
    character) is printed as a visible escape, never as a raw terminal control sequence."""
    configure("console", "info")
    get_logger("t").warning("adapter_invalid", adapter="evil\x1b]0;pwned\x07", message="a\nb")
    logging.getLogger("somelib").warning("stdlib %s", "x\x1b[2Jy\u202ez")
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\u202e" not in out
    assert "adapter=evil\\x1b]0;pwned\\x07" in out
    assert "message=a\\nb" in out
    assert "stdlib x\\x1b[2Jy\\u202ez" in out
    assert len(out.splitlines()) == 2


def test_console_traceback_keeps_its_lines_but_escapes_controls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A logged exception whose message holds ESC keeps its traceback lines on the console,
    with the ESC escaped."""
    configure("console")
    try:
        raise ValueError("bad name \x1b[31mred")
    except ValueError:
        get_logger("t").exception("load_failed")
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "ValueError: bad name \\x1b[31mred" in out
    assert "Traceback (most recent call last):" in out.splitlines()[1:]


def test_json_lines_escape_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    """JSON lines carry a control character escaped by JSON and decode back to the same name."""
    configure("json")
    get_logger("t").info("adapter_seen", adapter="evil\x1b[2J")
    [line] = lines(capsys)
    assert "\x1b" not in line
    assert json.loads(line)["adapter"] == "evil\x1b[2J"
