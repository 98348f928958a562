"""Download one adapter and publish it: the path the daemon's sync and the plugin's on-demand
fetch share, so both honour the same limits, staging, rename protocol and manifest.

`fetch_adapter` runs in a thread and holds the name's cross-process lock throughout: a second
caller (the other process, or a second request) waits, then finds the manifest entry equal to
the listing and downloads nothing. `Fetcher` is the plugin's side: which source has a name,
fetched once however many requests ask at the same time.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorawarm.names import is_name
from lorawarm.sources.bucket import ObjectInfo, SourceError, download, list_source, make_client
from lorawarm.sources.location import SourceUrl
from lorawarm.sources.manifest import Entry, Manifest, folder_id
from lorawarm.sources.publish import name_lock, new_staging, publish


def tokens(objects: dict[str, ObjectInfo]) -> dict[str, dict[str, Any]]:
    return {f: o.token() for f, o in objects.items()}


def fetch_adapter(
    client: Any,
    source: SourceUrl,
    name: str,
    objects: dict[str, ObjectInfo],
    *,
    drop: Path,
    state_dir: Path,
    manifest: Manifest,
    stopping: Callable[[], bool] | None = None,
) -> tuple[int, Entry | None]:
    """Download `objects` of adapter `name` into staging and publish them into `drop`.

    Returns (bytes downloaded, the manifest entry). Raises `SourceError`: `conflict` when a
    folder lorawarm did not publish holds the name (the local folder wins), or why a download
    failed; nothing is then visible in the drop directory.
    """
    with name_lock(state_dir, name):
        entry = manifest.get(name)
        current = folder_id(drop / name)
        if current is not None and (entry is None or not entry.owns(current)):
            raise SourceError(
                "conflict",
                f"{ascii(name)[:80]} exists in the drop directory and was not synced by "
                "lorawarm: the local folder wins",
            )
        wanted = tokens(objects)
        if entry is not None and entry.folder == current and entry.same_objects(wanted):
            return 0, entry  # published meanwhile by the other process
        staged = new_staging(drop)
        try:
            total = 0
            for file, obj in sorted(objects.items()):
                total += download(client, source.bucket, obj, str(staged / file), stopping)
            staged_id = folder_id(staged)
            assert staged_id is not None
            new = Entry(name, source.url, wanted, staged_id, time.time(), previous=current)
            manifest.put(new)  # before the rename: see Entry.previous
            publish(drop, staged, name)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return total, new


class Fetcher:
    """The plugin's on-demand fetch: an adapter in no local folder but in a source is
    downloaded and published, then judged by the resolver like any other folder.

    Blocking (the resolver calls it from a thread). Concurrent calls for one name fetch once:
    the later ones wait for the first and find its folder. A name no source has is remembered
    for `negative_seconds`, so a burst of requests for an unknown name costs one listing.
    """

    def __init__(
        self,
        sources: Sequence[SourceUrl],
        drop: Path,
        state_dir: Path,
        *,
        max_bytes: int,
        timeout: float = 30.0,
        concurrency: int = 4,
        negative_seconds: float = 5.0,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.sources = list(sources)
        self.drop = drop
        self.state_dir = state_dir
        self.manifest = Manifest(state_dir)
        self.max_bytes = max_bytes
        self.negative_seconds = negative_seconds
        self._factory = client_factory or (
            lambda: make_client(timeout=timeout, connections=concurrency)
        )
        self._client: Any = None
        self._lock = threading.Lock()
        self._names: dict[str, threading.Lock] = {}
        self._slots = threading.BoundedSemaphore(concurrency)
        self._missing: OrderedDict[str, float] = OrderedDict()

    def __repr__(self) -> str:
        return f"Fetcher(sources={[s.url for s in self.sources]})"

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def fetch(self, name: str) -> bool:
        """Publish `name` from the first source that has it; False when none has it.

        Raises `SourceError` when a source has it but it cannot be fetched (or a source
        cannot be listed and none had it).
        """
        if not is_name(name) or not self.sources:
            return False
        with self._lock:
            seen = self._missing.get(name)
            if seen is not None and time.monotonic() - seen < self.negative_seconds:
                return False
            lock = self._names.setdefault(name, threading.Lock())
        with lock, self._slots:
            if folder_id(self.drop / name) is not None:
                return True  # the request before this one (or the daemon) published it
            problem: SourceError | None = None
            for source in self.sources:
                try:
                    listing = list_source(
                        self.client(), source, max_bytes=self.max_bytes, name=name
                    )
                except SourceError as err:
                    problem = problem or err
                    continue
                if name in listing.skipped:
                    reason, message = listing.skipped[name]
                    raise SourceError(reason, message)
                objects = listing.adapters.get(name)
                if objects is None:
                    continue
                fetch_adapter(
                    self.client(),
                    source,
                    name,
                    objects,
                    drop=self.drop,
                    state_dir=self.state_dir,
                    manifest=self.manifest,
                )
                return True
            if problem is not None:
                raise problem
            with self._lock:
                self._missing[name] = time.monotonic()
                while len(self._missing) > 1024:
                    self._missing.popitem(last=False)
                self._names.pop(name, None)
            return False
