"""Watcher: turns filesystem events under the drop directory into adapter-name hints.

The watchdog observer thread does nothing but compute a `Hint` (the top two path components
below the drop directory, and whether the event was a rename into place) and hand it to the
asyncio loop with `call_soon_threadsafe`, inside a try/except that logs: an exception in a
watchdog handler would kill the observer thread (watchdog #793). Events are hints, not truth:
the daemon re-reads the folder for every hint and rescans periodically, so a lost event or an
inotify overflow only delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from lorawarm.inotify import TwoLevelInotify
from lorawarm.logs import get_logger

log = get_logger(__name__)

# Only changes. watchdog's default inotify mask also has IN_OPEN and IN_CLOSE_NOWRITE, so every
# read of the drop directory (our own inspections, digests and rescans) raised events: with
# 10,000 adapters they overflowed the kernel queue, watchdog re-walked the whole tree on each
# overflow, and the daemon took ~1 s per 100 adapters to start and a full core when idle.
WATCHED_EVENTS = (
    DirAttribEvent,  # IN_ATTRIB: a chmod/chown may make an unreadable adapter readable
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,  # IN_CLOSE_WRITE: a file was written to the end
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
)


@dataclass(frozen=True)
class Hint:
    """Something may have changed at `parts` (one or two components below the drop dir).

    `published` is True when a folder was renamed into place there, which means it is complete.
    An empty `parts` asks for a full rescan (the drop directory itself changed).
    """

    parts: tuple[str, ...]
    published: bool = False


# Distinct folders pending at once beyond which the hints collapse into one full rescan.
MAX_PENDING = 4096


class Hints:
    """The pending hints: deduplicated per folder, bounded, fed from any thread.

    A 1 GB copy written in 128 KiB pieces fires ~8,000 modify events for one folder: they are
    one entry here, and only the first hint of a batch costs a hop to the loop. Past
    `limit` distinct folders the batch becomes a full rescan (which sees every folder anyway).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, limit: int = MAX_PENDING) -> None:
        self._loop = loop
        self._limit = limit
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, ...], bool] = {}  # parts -> published
        self._rescan = False
        self._ready = asyncio.Event()

    def put(self, hint: Hint) -> None:
        """Add a hint; safe from any thread."""
        with self._lock:
            first = not self._pending and not self._rescan
            if not hint.parts:
                self._rescan = True
            else:
                self._pending[hint.parts] = self._pending.get(hint.parts, False) or hint.published
                if len(self._pending) > self._limit:
                    # A rescan finds them all; only the publishes are worth remembering, and
                    # only as many as the limit allows.
                    self._rescan = True
                    published = [p for p, pub in self._pending.items() if pub][: self._limit]
                    self._pending = dict.fromkeys(published, True)
        if first:
            # RuntimeError: the loop is closing, the daemon is shutting down.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._ready.set)

    def pending(self) -> int:
        """How many entries wait (a full rescan counts as one)."""
        with self._lock:
            return len(self._pending) + self._rescan

    async def get(self) -> list[Hint]:
        """Wait for hints and take every pending one (a full rescan first, when asked)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                pending, self._pending = self._pending, {}
                rescan, self._rescan = self._rescan, False
            hints = [Hint(parts, published) for parts, published in pending.items()]
            if rescan:
                hints.insert(0, Hint(()))
            if hints:
                return hints


def hint_for(root: Path, path: str, *, published: bool = False) -> Hint | None:
    """The hint for an event at `path`, or None when it concerns nothing we watch."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return None
    parts = rel.parts[:2]
    if not parts:
        return Hint(())
    if parts[0].startswith("."):
        return None  # dot-folders are staging areas (`.name.tmp`): not adapters
    # Only a folder renamed to exactly root/name or root/org/name is a publish.
    is_publish = published and len(rel.parts) <= 2
    return Hint(parts, published=is_publish)


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, deliver: Callable[[Hint], None]) -> None:
        self._root = root
        self._deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            for hint in self._hints(event):
                self._deliver(hint)
        except Exception:  # an escaping exception would kill the observer thread
            log.exception("watch_event_failed", fs_event=repr(event)[:200])

    def _hints(self, event: FileSystemEvent) -> Iterator[Hint]:
        if event.event_type in ("opened", "closed_no_write"):
            return
        src = os.fsdecode(event.src_path)
        if event.is_directory and event.event_type == "modified" and Path(src) == self._root:
            return  # every create/delete at the top level also "modifies" the root: noise
        hint = hint_for(self._root, src)
        if hint is not None:
            yield hint
        if isinstance(event, DirMovedEvent | FileMovedEvent):
            dest = os.fsdecode(event.dest_path)
            moved = hint_for(self._root, dest, published=isinstance(event, DirMovedEvent))
            if moved is not None:
                yield moved


class Watcher:
    """Watches the drop directory, feeding hints to an asyncio queue: the two-level inotify
    watch (`lorawarm.inotify`), or watchdog's polling observer (network filesystems).

    A context manager: the observer thread is stopped and joined on exit.
    """

    def __init__(
        self,
        root: Path,
        hints: Hints,
        *,
        polling: bool = False,
        poll_seconds: float = 1.0,
    ) -> None:
        self._root = root
        self._hints = hints
        self.polling = polling
        self._poll_seconds = poll_seconds
        self._observer: BaseObserver | None = None
        self._inotify: TwoLevelInotify | None = None

    def start(self) -> None:
        """Start the observer thread. Raises OSError when the kernel refuses (inotify:
        ENOSPC for the watch limit, EMFILE for the instance limit); nothing is left running."""
        if not self.polling:
            inotify = TwoLevelInotify(self._root, self._deliver)
            inotify.start()
            self._inotify = inotify
            return
        observer: BaseObserver = PollingObserver(timeout=self._poll_seconds)
        observer.schedule(
            _Handler(self._root, self._hints.put),
            str(self._root),
            recursive=True,
            event_filter=list(WATCHED_EVENTS),
        )
        observer.daemon = True
        try:
            observer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                observer.stop()
            raise
        self._observer = observer

    def _deliver(self, parts: tuple[str, ...], is_dir: bool, published: bool) -> None:
        """An inotify event at `parts` below the root, as a hint (in the reader thread)."""
        del is_dir  # the hint is the same for files and folders
        hint = (
            Hint(())
            if not parts
            else hint_for(self._root, os.path.join(self._root, *parts), published=published)
        )
        if hint is not None:
            self._hints.put(hint)

    def stop(self) -> None:
        if self._inotify is not None:
            self._inotify.stop()
            self._inotify = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    @property
    def alive(self) -> bool:
        if self._inotify is not None:
            return self._inotify.is_alive()
        return self._observer is not None and self._observer.is_alive()

    @property
    def overflows(self) -> int:
        """Kernel queue overflows so far (events lost): each asks for a full rescan."""
        return self._inotify.overflows if self._inotify is not None else 0

    @property
    def trusted(self) -> bool:
        """True while every change reaches us as an event: inotify running with every
        folder watched. Then the periodic rescan may look only where directories changed."""
        return (
            self._inotify is not None
            and self._inotify.is_alive()
            and self._inotify.missed_watches == 0
        )

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scan(root: Path) -> dict[str, list[os.DirEntry[str]] | None]:
    """Every adapter folder under `root`: `name` folders and `org/name` folders, each with the
    listing of its folder when this walk made one (a top-level adapter: telling it from an
    organisation needs its listing anyway), so that its fingerprint needs no second listing;
    None for the others.

    A top-level folder that holds no files but holds folders is an organisation (`org/name`),
    unless those folders are all a trainer's `checkpoint-N` folders (then it is one adapter
    folder, judged as such); anything else at the top level is an adapter (possibly still
    being copied). Dot-entries are ignored. A symlink at the top level is never descended
    into: it is one adapter name, which inspection judges (and refuses when it leads out of
    the drop directory).
    """
    found: dict[str, list[os.DirEntry[str]] | None] = {}
    for top in _dirs(root):
        listing = None if top.is_symlink() else _listing(top.path)
        children = [e for e in listing or () if not e.name.startswith(".")]
        if _is_org(children):
            for child in children:
                found[f"{top.name}/{child.name}"] = None
        else:
            found[top.name] = listing
    return found


# What the light rescan compares per folder: a directory's mtime and ctime move whenever an
# entry in it is created, removed or renamed (and ctime on a chmod), its inode when it is
# replaced.
Stamp = tuple[int, int, int, int]


def dir_stamps(root: Path, orgs: set[str]) -> dict[str, Stamp]:
    """`lstat` data of every visible entry of `root` and of every folder inside the `orgs`
    folders: a listing of the root, one of each org, and one `lstat` per entry; no listing of
    adapter folders. Two calls differ where a directory changed (see `Stamp`)."""
    stamps: dict[str, Stamp] = {}
    base = os.fspath(root)
    for entry in _entries(root):
        if entry.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            stamps[entry.name] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
            if entry.name in orgs:
                for child in _entries(Path(f"{base}/{entry.name}")):
                    if child.name.startswith("."):
                        continue
                    with contextlib.suppress(OSError):
                        c = child.stat(follow_symlinks=False)
                        stamps[f"{entry.name}/{child.name}"] = (
                            c.st_ino,
                            c.st_mtime_ns,
                            c.st_ctime_ns,
                            c.st_mode,
                        )
    return stamps


def changed_stamps(before: dict[str, Stamp], after: dict[str, Stamp]) -> list[str]:
    """Keys (`name`, `org`, `org/name`) that appeared, went, or whose stamp differs."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def resolve_hint(root: Path, hint: Hint) -> list[str] | None:
    """The adapter names a hint concerns; None asks for a full rescan."""
    if not hint.parts:
        return None
    top = hint.parts[0]
    folder = root / top
    if folder.is_dir() and not folder.is_symlink():
        children = _visible(folder)
        if _is_org(children):
            if len(hint.parts) == 2 and not hint.parts[1].startswith("."):
                return [f"{top}/{hint.parts[1]}"]
            return [f"{top}/{c.name}" for c in children]
    names = [top]
    # An org that just lost its last adapter: its former child is named, so that its record
    # goes. Anything that still exists there is content of the adapter `top`, not an adapter
    # of its own (naming it would make a phantom `top/sub` record).
    if len(hint.parts) == 2 and not os.path.lexists(folder / hint.parts[1]):
        names.append(f"{top}/{hint.parts[1]}")
    return names


def is_org(folder: Path) -> bool:
    """True when `folder` (directly under the drop directory) holds `org/name` adapters: it is
    an organisation then, not an adapter of its own (even if it was one while it was empty)."""
    return not folder.is_symlink() and _is_org(_visible(folder))


_CHECKPOINT = re.compile(r"checkpoint-[0-9]+")


def _is_org(children: list[os.DirEntry[str]]) -> bool:
    """An organisation folder holds only folders (dot-entries aside), at least one, and not
    only a trainer's `checkpoint-N` folders: a training run's output folder is no org whose
    checkpoints would each be served as `name/checkpoint-N`."""
    return (
        bool(children)
        and all(c.is_dir(follow_symlinks=False) for c in children)
        and not all(_CHECKPOINT.fullmatch(c.name) for c in children)
    )


def _visible(path: Path) -> list[os.DirEntry[str]]:
    return [e for e in _entries(path) if not e.name.startswith(".")]


def _dirs(root: Path) -> list[os.DirEntry[str]]:
    return [
        e for e in _entries(root) if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)
    ]


def _entries(path: Path) -> list[os.DirEntry[str]]:
    return _listing(path) or []


def _listing(path: str | Path) -> list[os.DirEntry[str]] | None:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return None
