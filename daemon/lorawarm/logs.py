"""Logging: structlog everywhere, JSON lines for journald, a readable console on a terminal.

Standard-library loggers (httpx, uvicorn, watchdog) are routed through the same processors, so
every line has one shape. Secrets never reach a log: settings hold them as `SecretStr`.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from lorawarm.terminal import printable

LogFormat = Literal["auto", "json", "console"]


def configure(fmt: LogFormat = "auto", level: str = "info") -> None:
    """Configure structlog and the stdlib root logger; safe to call more than once."""
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    numeric = logging.getLevelName(level.upper())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor
    last: list[structlog.types.Processor] = []
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        # Tracebacks as text first, so that their lines are escaped like every other value.
        last = [structlog.processors.format_exc_info, escape_controls]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last, renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Chatty libraries: their per-request lines add nothing to ours.
    for noisy in ("httpx", "httpcore", "watchdog", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def escape_controls(
    logger: object, method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """A processor for the console: control characters in string values (an adapter name with
    ESC, a vLLM message) become visible escapes instead of reaching the terminal. Values that
    are not strings are shown by their repr, which escapes them already."""
    return {
        key: printable(value, keep_lines=key in ("exception", "stack"))
        if isinstance(value, str)
        else value
        for key, value in event_dict.items()
    }


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named like a stdlib one."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
