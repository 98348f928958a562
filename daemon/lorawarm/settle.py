"""Settle: decide when an adapter folder is complete enough to inspect.

A folder is complete when it was renamed into place (the recommended publish: copy to
`.name.tmp`, then `mv`), or when it has been quiet for the settle period. "Quiet" is judged on
a cheap fingerprint of the folder (names, sizes, mtimes, inodes of its top-level entries), so an
in-place `cp -r` that is still writing keeps the folder unsettled. Inspection afterwards checks
that the weights are whole (a safetensors header that accounts for the file's size).

Pure bookkeeping on explicit timestamps: the daemon feeds it observations and asks when to look
again, which keeps it testable without sleeping.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorawarm.inspection import MAX_ENTRIES

Fingerprint = tuple[tuple[str, int, int, int], ...]
# One entry more than inspection accepts: enough to tell that a folder is over the limit (and
# to see it come back under it), without listing or stat-ing the rest of a hostile tree.
MAX_FINGERPRINT_ENTRIES = MAX_ENTRIES + 1


def fingerprint(folder: str | Path) -> Fingerprint | None:
    """Stat data of the folder's top-level entries, or None when the folder is gone.

    At most `MAX_FINGERPRINT_ENTRIES` entries are looked at, in listing order.
    """
    try:
        with os.scandir(folder) as it:
            listing = list(itertools.islice(it, MAX_FINGERPRINT_ENTRIES))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        # Unreadable folder: report it through inspection, which gives the reason.
        return ()
    return fingerprint_of(listing)


def fingerprint_of(listing: Iterable[os.DirEntry[str]]) -> Fingerprint:
    """The fingerprint of a folder from a listing of it (`os.scandir`) already at hand; like
    `fingerprint`, it stats no more than the first `MAX_FINGERPRINT_ENTRIES` entries."""
    entries = []
    for entry in itertools.islice(listing, MAX_FINGERPRINT_ENTRIES):
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone since the listing
        entries.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(entries))


def newest_mtime(fp: Fingerprint) -> float:
    """Wall-clock seconds of the newest entry (0 for an empty folder)."""
    return max((e[2] for e in fp), default=0) / 1e9


@dataclass
class _Watch:
    fp: Fingerprint
    changed_at: float
    published: bool = False


@dataclass
class Settler:
    """Tracks folders that are not yet settled.

    `observe()` returns True when the folder is ready to inspect now; otherwise `due()` says
    when to look again. Times are monotonic seconds; `wall` is the wall clock of the same
    instant, used to tell that a folder found at start-up has been quiet for long already.
    """

    settle_seconds: float
    _watches: dict[str, _Watch] = field(default_factory=dict)

    def observe(
        self, name: str, fp: Fingerprint, *, now: float, wall: float, published: bool = False
    ) -> bool:
        watch = self._watches.get(name)
        if watch is None or watch.fp != fp:
            # A folder whose files are already older than the settle period (found at start-up
            # or by a rescan) is quiet already; a fresh change starts the clock now.
            age = wall - newest_mtime(fp)
            start = now - age if watch is None and fp and age >= 0 else now
            watch = _Watch(fp=fp, changed_at=start, published=published)
            self._watches[name] = watch
        elif published:
            watch.published = True
        if watch.published or now - watch.changed_at >= self.settle_seconds:
            del self._watches[name]
            return True
        return False

    def due(self, name: str) -> float | None:
        """Monotonic time at which `name` will have been quiet long enough, if it is tracked."""
        watch = self._watches.get(name)
        return None if watch is None else watch.changed_at + self.settle_seconds

    def forget(self, name: str) -> None:
        self._watches.pop(name, None)
