"""The resolver vLLM asks about an adapter name nobody has loaded yet.

It answers exactly as the daemon would: the same name rules and containment (`lorawarm.names`),
the same inspection (`lorawarm.inspection`), the same snapshot store (`lorawarm.snapshot`). vLLM
is handed the absolute path of an immutable snapshot, never the drop folder, so a user deleting
or rewriting the folder later cannot kill the engine when it re-reads an evicted adapter
(vllm#5105); the daemon later finds that snapshot in `/v1/models` and adopts it.

The class takes plain arguments and reads no environment (`register()` does that). It does not
import vLLM at module import time: `LoRARequest` is imported when the first answer is built, and
`register()` declares the class a virtual subclass of vLLM's `LoRAResolver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from lorawarm.fit import FitPolicy, judge
from lorawarm.inspection import FileStat, Invalid, Rules, inspect_adapter
from lorawarm.names import BadName, check_name, folder_for
from lorawarm.server_facts import ServerFacts, model_aliases
from lorawarm.snapshot import Snapshot, SnapshotError, SnapshotStore

# vllm.lora.request.LoRARequest. vLLM is imported through importlib, here and in `register()`:
# vLLM ships py.typed, and letting mypy follow it means minutes of analysing vLLM and torch.
LoRARequest: TypeAlias = Any

# How many (name, reason) pairs are remembered for "log once": names come from requests, so the
# memory is bounded.
MAX_REMEMBERED = 1024


class SourceFetch(Protocol):
    """The on-demand fetch from object storage (`lorawarm.sources.fetch.Fetcher`): publish a
    name some source has into the drop directory; False when none has it. Raises an error with
    `condition` and `message` (`SourceError`) when it cannot."""

    def fetch(self, name: str) -> bool: ...


class LorawarmResolver:
    """Resolves an adapter name to a validated, immutable snapshot of its drop folder.

    `cache_dir` is the drop directory, `store` the snapshot store shared with the daemon,
    `rules` the server-independent inspection rules. What depends on the server is judged as
    the daemon judges it (`lorawarm.fit.judge` with `policy`, the operator's overrides) against
    this vLLM's facts: `facts()` gives them where lorawarm's endpoint learned them in this
    process; without it, what each call says (`base_model_name` is vLLM's `--model`).
    """

    def __init__(
        self,
        cache_dir: Path,
        store: SnapshotStore,
        rules: Rules,
        *,
        policy: FitPolicy | None = None,
        facts: Callable[[], ServerFacts | None] | None = None,
        logger: logging.Logger | None = None,
        fetcher: SourceFetch | None = None,
    ) -> None:
        self.cache_dir = Path(os.path.abspath(cache_dir))
        self.fetcher = fetcher
        self.store = store
        self.rules = rules
        self.policy = policy or FitPolicy()
        self._facts = facts
        self.log = logger or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._reported: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._snapshots: dict[str, tuple[tuple[FileStat, ...], Snapshot]] = {}

    def __repr__(self) -> str:
        return f"LorawarmResolver(cache_dir='{self.cache_dir}', snapshots='{self.store.root}')"

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """vLLM's resolver interface: a `LoRARequest` for a valid adapter, else None.

        Never raises (vLLM turns a resolver exception into a 500): anything unexpected is logged
        and answered with None, which vLLM reports as a 404.
        """
        try:
            snapshot = await asyncio.to_thread(self.resolve_snapshot, base_model_name, lora_name)
            if snapshot is None:
                return None
            return _lora_request(lora_name, snapshot)
        except Exception:
            self.log.exception(
                "lorawarm: resolving adapter %s failed unexpectedly; answering 'not found'",
                _shown(lora_name),
            )
            return None

    def resolve_snapshot(self, base_model_name: str, lora_name: str) -> Snapshot | None:
        """The blocking part of `resolve_lora`: inspect, then create or reuse the snapshot."""
        folder = folder_for(self.cache_dir, lora_name)
        if folder is None:
            self._report_bad_name(lora_name)
            return None
        if not os.path.lexists(folder) and not self._fetch(lora_name):
            # Not ours: another resolver may know it, and vLLM answers 404 otherwise.
            self.log.debug("lorawarm: no adapter folder for %s", _shown(lora_name))
            return None
        rules = self.rules
        result = inspect_adapter(folder, root=self.cache_dir, rules=rules, name=lora_name)
        if isinstance(result, Invalid):
            self._report(lora_name, result.reason, result.message)
            return None
        fit = judge(result, self.facts_for(base_model_name), self.policy)
        if not fit.ok:
            assert fit.reason is not None  # a misfit always says why
            self._report(lora_name, fit.reason, fit.message)
            return None
        with self._lock:
            known = self._snapshots.get(lora_name)
        if known is not None and known[0] == result.fingerprint and known[1].path.is_dir():
            _touch(known[1])
            return known[1]
        try:
            # Not durable here: fsync would be on the request's path (~100 ms for 54 MB on a
            # virtio disk). It is synced in the background; until its marker is written, any
            # later user verifies its bytes first (see lorawarm.snapshot).
            snapshot = self.store.create(result, rules, durable=False)
        except SnapshotError as err:
            self._report(lora_name, err.reason, err.message)
            return None
        threading.Thread(
            target=self.store.sync, args=([snapshot],), name="lorawarm-sync", daemon=True
        ).start()
        _touch(snapshot)
        with self._lock:
            self._snapshots[lora_name] = (result.fingerprint, snapshot)
            for key in [k for k in self._reported if k[0] == lora_name]:
                del self._reported[key]
        self.log.info(
            "lorawarm: adapter %s is valid (rank %d); vLLM loads its snapshot %s",
            _shown(lora_name),
            result.rank,
            snapshot.path,
        )
        for warning in fit.warnings:  # with the snapshot made: once per content, not per call
            self._note(lora_name, str(warning.code), warning.message)
        return snapshot

    def facts_for(self, base_model_name: str) -> ServerFacts:
        """This vLLM's facts: the endpoint's, else what a call tells (its `--model`)."""
        learned = self._facts() if self._facts is not None else None
        if learned is not None:
            return learned
        return ServerFacts(model=base_model_name, model_aliases=model_aliases(base_model_name))

    def _fetch(self, lora_name: str) -> bool:
        """Not found locally -> try the sources: True when a source published the folder."""
        if self.fetcher is None:
            return False
        try:
            return self.fetcher.fetch(lora_name)
        except Exception as err:  # noqa: BLE001 - a failed fetch is "not found", logged once
            condition = str(getattr(err, "condition", type(err).__name__))
            self._report(lora_name, f"source_{condition}", str(getattr(err, "message", err)))
            return False

    def _report_bad_name(self, lora_name: str) -> None:
        try:
            check_name(lora_name)
        except BadName as bad:
            self._report(lora_name, bad.reason, bad.message)
        else:
            # The name is well-formed, so only a symlink can lead it out: the daemon's reason.
            self._report(
                lora_name,
                "symlink_escape",
                f"adapter {ascii(lora_name)[:80]} passes through a symlink that leads outside "
                f"{self.cache_dir} (or to it); copy the adapter in instead",
            )

    def _report(self, lora_name: str, reason: str, message: str) -> None:
        """Log why `lora_name` is not served, once per (name, reason)."""
        if not self._first(lora_name, reason):
            return
        self.log.warning(
            "lorawarm: adapter %s is not served (%s): %s",
            _shown(lora_name),
            reason,
            message,
        )

    def _note(self, lora_name: str, code: str, message: str) -> None:
        """Log a warning about an adapter that is served, once per (name, code)."""
        if self._first(lora_name, code):
            self.log.warning("lorawarm: adapter %s (%s): %s", _shown(lora_name), code, message)

    def _first(self, lora_name: str, reason: str) -> bool:
        """Whether (name, reason) is new: remembered, with the oldest forgotten past a bound."""
        key = (lora_name, str(reason))
        with self._lock:
            if key in self._reported:
                self._reported.move_to_end(key)
                return False
            self._reported[key] = None
            while len(self._reported) > MAX_REMEMBERED:
                self._reported.popitem(last=False)
        return True


def _shown(name: str) -> str:
    """A requested name as it may appear in a log line: ASCII-escaped and bounded."""
    return ascii(name)[:200]


def _touch(snapshot: Snapshot) -> None:
    """Mark a reused snapshot as just handed out: the daemon never collects a snapshot whose
    ctime is recent, and vLLM has not listed this one yet. Best effort (another user's
    snapshot cannot be touched)."""
    with contextlib.suppress(OSError):
        os.utime(snapshot.path)


def _lora_request(lora_name: str, snapshot: Snapshot) -> LoRARequest:
    request_type = importlib.import_module("vllm.lora.request").LoRARequest
    # vLLM overwrites the id with its own counter; it only has to be >= 1 here.
    return request_type(
        lora_name=lora_name,
        lora_int_id=int(snapshot.digest[:15], 16) + 1,
        lora_path=str(snapshot.path),
    )
