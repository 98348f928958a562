"""Where a long start-up is: `scanning 3000/10000 folders`, then `warming 12/200 adapters`.

A cold start of 10,000 folders takes seconds to scan and a minute or more to warm; without a
word meanwhile `systemctl status` shows nothing and an operator cannot tell slow from stuck.
The intake counts what its scan has looked at (`Intake.scan_progress`), the adapters' states
say how many are loaded; this module only turns those two readings into the line for
systemd's `STATUS=` and, at most every `log_every` seconds and once when a phase ends, a log
line. A phase that stalls (a server down) logs nothing more until it moves. The supervisor's
heartbeat asks it; it writes nothing but what it returns and logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from lorawarm.catalog import AdapterState
from lorawarm.logs import get_logger

log = get_logger(__name__)


def scan_line(done: int, total: int) -> str:
    return f"scanning {done}/{total} folders"


def warm_line(loaded: int, total: int) -> str:
    return f"warming {loaded}/{total} adapters"


def warm_counts(states: Iterable[AdapterState]) -> tuple[int, int]:
    """(loaded, loaded + pending): how far the adapters that are to be loaded everywhere are."""
    loaded = pending = 0
    for state in states:
        if state == AdapterState.LOADED:
            loaded += 1
        elif state == AdapterState.PENDING:
            pending += 1
    return loaded, loaded + pending


class Progress:
    """The start-up phase the daemon is in, as a line, and its throttled log."""

    def __init__(
        self, *, log_every: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log_every = log_every
        self._clock = clock
        self._phase: str | None = None
        self._logged_at = -float("inf")
        self._last: tuple[int, int] = (0, 0)
        self._started = clock()

    def line(self, scan: tuple[int, int] | None, warm: tuple[int, int] | None) -> str | None:
        """The progress line for a scan that is running (`scan`: done, total) or adapters
        being warmed (`warm`: loaded, total); None when neither is under way. Logs it."""
        if scan is not None and scan[0] < scan[1]:
            return self._report("scan", scan, scan_line(*scan))
        if warm is not None and warm[0] < warm[1]:
            return self._report("warm", warm, warm_line(*warm))
        self._finish()
        return None

    def _report(self, phase: str, counts: tuple[int, int], text: str) -> str:
        now = self._clock()
        if phase != self._phase:
            self._finish()
            self._phase, self._started, self._logged_at = phase, now, -float("inf")
        moved = counts != self._last or self._logged_at == -float("inf")
        self._last = counts
        if moved and now - self._logged_at >= self.log_every:  # a stalled phase logs nothing
            self._logged_at = now
            log.info("progress", phase=phase, done=counts[0], total=counts[1], line=text)
        return text

    def _finish(self) -> None:
        if self._phase is None:
            return
        seconds = round(self._clock() - self._started, 3)
        log.info("progress_done", phase=self._phase, total=self._last[1], seconds=seconds)
        self._phase = None
