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
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

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
    """Runs a watchdog observer on the drop directory, feeding hints to an asyncio queue.

    A context manager: the observer thread is stopped and joined on exit.
    """

    def __init__(
        self,
        root: Path,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Hint],
        *,
        polling: bool = False,
        poll_seconds: float = 1.0,
    ) -> None:
        self._root = root
        self._loop = loop
        self._queue = queue
        self._polling = polling
        self._poll_seconds = poll_seconds
        self._observer: BaseObserver | None = None

    def _deliver(self, hint: Hint) -> None:
        # RuntimeError: the loop is closing, the daemon is shutting down.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, hint)

    def start(self) -> None:
        observer: BaseObserver = (
            PollingObserver(timeout=self._poll_seconds) if self._polling else Observer()
        )
        observer.schedule(
            _Handler(self._root, self._deliver),
            str(self._root),
            recursive=True,
            event_filter=list(WATCHED_EVENTS),
        )
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    @property
    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def discover(root: Path) -> dict[str, Path]:
    """Every adapter folder under `root`: `name` folders and `org/name` folders.

    A top-level folder that holds no files but holds folders is an organisation (`org/name`);
    anything else at the top level is an adapter (possibly still being copied). Dot-entries
    are ignored. A symlink at the top level is never descended into: it is one adapter name,
    which inspection judges (and refuses when it leads out of the drop directory).
    """
    return {name: root / name for name in scan(root)}


def scan(root: Path) -> dict[str, list[os.DirEntry[str]] | None]:
    """`discover`'s names, each with the listing of its folder when this walk made one (a
    top-level adapter: telling it from an organisation needs its listing anyway), so that its
    fingerprint needs no second listing; None for the others."""
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


def _is_org(children: list[os.DirEntry[str]]) -> bool:
    """An organisation folder holds only folders (dot-entries aside), at least one."""
    return bool(children) and all(c.is_dir(follow_symlinks=False) for c in children)


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
