"""The daemon: wires watcher -> settle -> inspect -> catalog -> snapshot -> reconcilers -> status.

Everything runs on one asyncio loop. The watchdog thread only hands hints to the loop; blocking
work (inspection, snapshot copies) runs in `asyncio.to_thread`. Signals only set flags:
SIGTERM/SIGINT stop (a second SIGINT exits at once), SIGHUP rescans the drop directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

from lorawarm.catalog import AdapterRecord, Catalog
from lorawarm.inspection import Invalid, Result, inspect_adapter
from lorawarm.logs import configure, get_logger
from lorawarm.metrics import Metrics
from lorawarm.notify import Notifier
from lorawarm.reconcile import ServerReconciler, ServerStatus
from lorawarm.settings import EX_CONFIG, Settings
from lorawarm.settle import Fingerprint, Settler, fingerprint, fingerprint_of
from lorawarm.snapshot import Snapshot, SnapshotError, SnapshotStore
from lorawarm.status import create_app
from lorawarm.vllm_client import VllmClient
from lorawarm.watcher import Hint, Watcher, is_org, resolve_hint, scan

log = get_logger(__name__)

SHUTDOWN_DEADLINE = 10.0
# Folders inspected and snapshotted per thread call during a rescan.
RESCAN_BATCH = 64

# What `Daemon._check` found: the inspection, then the snapshot (or why there is none).
Checked = tuple[Result, Snapshot | SnapshotError | None]


class _StatusServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Daemon:
    """One lorawarm process: owns the catalog, the watcher, the reconcilers and the status API."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        if settings.cache_dir is None:
            raise ValueError("cache_dir is required to run the daemon")
        self.settings = settings
        self.root = Path(os.path.abspath(settings.cache_dir))
        self.rules = settings.rules()
        self.store = SnapshotStore(settings.state_dir)
        self.catalog = Catalog(pinned=settings.pinned, warm_limit=settings.warm_limit)
        self.metrics = metrics or Metrics()
        self.settler = Settler(settings.settle_seconds)
        self.notifier = notifier or Notifier()
        key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
        self.reconcilers = [
            ServerReconciler(
                VllmClient(url, api_key=key, timeout=settings.request_timeout),
                self.catalog,
                self.store,
                self.metrics,
                resync_seconds=settings.resync_seconds,
                health_seconds=settings.health_seconds,
                max_backoff=settings.max_backoff_seconds,
                on_change=self._server_changed,
            )
            for url in settings.vllm_urls
        ]
        self._ready = False
        self._queue: asyncio.Queue[Hint] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._gc_due = False
        # Collection runs in its own task as soon as it is due (waiting for the next hint put
        # it into the first resync after a start, up to a minute late), never during a rescan
        # or a refresh: those may be about to reuse a snapshot that looks unreferenced.
        self._gc_wake = asyncio.Event()
        self._fs_lock = asyncio.Lock()
        self._loaded: frozenset[str] = frozenset()  # snapshot paths loaded at the last sync
        self._all_listed = False  # every server had been listed at the last sync
        self._collect_after = 0.0  # monotonic time of the next periodic collection
        self._status_dirty = True
        self._interrupts = 0
        self._watcher: Watcher | None = None
        self._root_id: tuple[int, int] | None = None
        self.drop_dir_ok = True
        self._drop_dir_probe: asyncio.Task[None] | None = None
        self.status_port: int | None = None

    # -- StatusSource -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def server_urls(self) -> list[str]:
        return [r.url for r in self.reconcilers]

    def server_statuses(self) -> Sequence[ServerStatus]:
        return [r.status for r in self.reconcilers]

    # -- lifecycle --------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def _on_sigint(self) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            log.warning("second_interrupt_exiting_now")
            os._exit(130)
        self.request_stop()

    async def run(self) -> int:
        """Run until asked to stop; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self._on_sigint),
            (signal.SIGHUP, self.rescan_soon),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)

        server, server_task = self._start_status_server()
        tasks: list[asyncio.Task[None]] = []
        try:
            started = time.monotonic()
            await self.rescan()
            self._ready = True
            log.info(
                "ready",
                adapters=len(self.catalog),
                seconds=round(time.monotonic() - started, 3),
                status=f"http://{self.settings.status_host}:{self.status_port}",
            )
            tasks = [
                asyncio.create_task(r.run(), name=f"reconcile {r.url}") for r in self.reconcilers
            ]
            tasks.append(asyncio.create_task(self._consume(), name="hints"))
            tasks.append(asyncio.create_task(self._collector(), name="collect"))
            tasks.append(asyncio.create_task(self._resync_loop(), name="resync"))
            tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
            self.notifier.ready(self.summary())
            for r in self.reconcilers:
                r.wake()
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("task_crashed", task=task.get_name(), error=repr(task.exception()))
            stop.cancel()
        finally:
            log.info("stopping")
            self.notifier.stopping()
            if self._watcher is not None:
                self._watcher.stop()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=SHUTDOWN_DEADLINE)
            for r in self.reconcilers:
                await r.client.aclose()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server_task, timeout=5)
            if self._drop_dir_probe is not None:
                self._drop_dir_probe.cancel()
            for timer in self._timers.values():
                timer.cancel()
        log.info("stopped")
        return 0

    def summary(self) -> str:
        """One line for systemd's STATUS=: adapters by state, servers that are ok."""
        urls = self.server_urls
        counts: dict[str, int] = {}
        for record in self.catalog:
            state = record.state(urls)
            counts[state] = counts.get(state, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
        ok = sum(1 for r in self.reconcilers if r.status.condition == "ok")
        return f"adapters: {parts}; servers ok: {ok}/{len(self.reconcilers)}"

    async def _heartbeat(self) -> None:
        """WATCHDOG=1 from the event loop itself (a wedged loop stops the pings and systemd
        restarts us), and STATUS= whenever the summary changes."""
        every = self.notifier.watchdog_seconds
        interval = min(every / 2, 5.0) if every else 5.0
        last = ""
        while True:
            if every:
                self.notifier.watchdog()
            if self._status_dirty:  # summary() visits every adapter: ~50 ms at 10,000
                self._status_dirty = False
                line = self.summary()
                if line != last:
                    self.notifier.status(line)
                    last = line
            await asyncio.sleep(interval)

    def _start_status_server(self) -> tuple[uvicorn.Server, asyncio.Task[None]]:
        host, port = self.settings.status_host, self.settings.status_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is
        # IPPROTO_TCP, and without it every keep-alive answer waited ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        self.status_port = sock.getsockname()[1]
        token = self.settings.status_token
        app = create_app(self, token=token.get_secret_value() if token else None)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        server = _StatusServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="status")
        return server, task

    # -- the drop directory -----------------------------------------------------------------
    def rescan_soon(self) -> None:
        self._queue.put_nowait(Hint(()))

    def _watch_drop_dir(self) -> bool:
        """(Re)start the observer when the drop directory is new, replaced or the observer died.

        Returns False while the drop directory is missing. A missing drop directory (deleted,
        an unmounted network filesystem) is not taken to mean "every adapter was deleted":
        the catalog and the servers are left as they are until it is back.
        """
        try:
            st = self.root.stat()
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            if self.drop_dir_ok:
                log.error("drop_dir_missing", path=str(self.root))
                self.drop_dir_ok = False
                self._drop_dir_probe = asyncio.get_running_loop().create_task(
                    self._await_drop_dir(), name="drop dir probe"
                )
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            return False
        if not self.drop_dir_ok:
            log.info("drop_dir_back", path=str(self.root))
            self.drop_dir_ok = True
        root_id = (st.st_dev, st.st_ino)
        if self._watcher is None or not self._watcher.alive or root_id != self._root_id:
            if self._watcher is not None:
                self._watcher.stop()
            self._watcher = Watcher(
                self.root,
                asyncio.get_running_loop(),
                self._queue,
                polling=self.settings.polling,
                poll_seconds=self.settings.poll_seconds,
            )
            self._watcher.start()
            self._root_id = root_id
        return True

    async def rescan(self, published: frozenset[str] = frozenset()) -> None:
        """Re-read the whole drop directory (level-triggered: catches any lost event)."""
        if not self._watch_drop_dir():
            return
        found = await asyncio.to_thread(scan, self.root)
        for name in sorted(self.catalog.names() - set(found)):
            await self.refresh(name)
        # Batched: one thread call reads every fingerprint, and the folders due for inspection
        # are inspected and snapshotted RESCAN_BATCH per thread call. One by one, the thread
        # hand-offs (four per folder) took most of the time of a scan of thousands of folders.
        names = sorted(found)
        fps = await asyncio.to_thread(_read_fingerprints, self.root, names, found)
        del found  # 10,000 listings are megabytes: not kept through the inspections
        due = [
            (record, fp)
            for name, fp in zip(names, fps, strict=True)
            if (record := self._observe(name, fp, published=name in published)) is not None
        ]
        for start in range(0, len(due), RESCAN_BATCH):
            batch = due[start : start + RESCAN_BATCH]
            checked = await asyncio.to_thread(self._check_all, [r for r, _ in batch])
            for (record, fp), outcome in zip(batch, checked, strict=True):
                await self._inspect(record, fp, outcome)
        if time.monotonic() >= self._collect_after:
            self._collect_soon()  # unreferenced snapshots past their grace period

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.rescan_soon()

    async def _await_drop_dir(self) -> None:
        """While the drop directory is missing, look for it every second."""
        # Polling on purpose: nothing can notify us of a directory that does not exist yet.
        while True:
            if await asyncio.to_thread(self.root.is_dir):
                self.rescan_soon()
                return
            await asyncio.sleep(1.0)

    async def _consume(self) -> None:
        while True:
            hints = [await self._queue.get()]
            while not self._queue.empty():
                hints.append(self._queue.get_nowait())
            log.debug("hints", hints=[("/".join(h.parts), h.published) for h in hints][:20])
            try:
                async with self._fs_lock:
                    await self._apply(hints)
            except Exception:  # one bad hint must not stop the daemon: log it, go on
                log.exception("hint_failed")
            self._status_dirty = True  # a folder may have started settling

    def _collect_soon(self) -> None:
        self._gc_due = True
        self._gc_wake.set()

    async def _collector(self) -> None:
        while True:
            await self._gc_wake.wait()
            self._gc_wake.clear()
            async with self._fs_lock:
                if self._gc_due:
                    await self._collect()

    async def _apply(self, hints: list[Hint]) -> None:
        published: dict[str, bool] = {}
        full = False
        for hint in hints:
            names = await asyncio.to_thread(resolve_hint, self.root, hint)
            if names is None:
                full = True
                continue
            if not (self.root / hint.parts[0]).exists():
                prefix = hint.parts[0] + "/"
                names += [n for n in self.catalog.names() if n.startswith(prefix)]
            elif hint.parts[0] in self.catalog.names() and hint.parts[0] not in names:
                names.append(hint.parts[0])  # an adapter folder that may have become an org
            for name in names:
                # A rename publishes the folder it names (or an org's adapters below it),
                # never the adapter that a renamed sub-folder sits in.
                under = tuple(name.split("/"))[: len(hint.parts)] == hint.parts
                published[name] = published.get(name, False) or (hint.published and under)
        if full:
            await self.rescan(frozenset(n for n, p in published.items() if p))
            return
        for name, was_published in published.items():
            await self.refresh(name, published=was_published)

    async def refresh(self, name: str, *, published: bool = False) -> None:
        """Bring one adapter's record up to date with its folder."""
        fp = await asyncio.to_thread(_read_fingerprint, self.root, name)
        record = self._observe(name, fp, published=published)
        if record is not None:
            await self._inspect(record, fp)

    def _observe(
        self, name: str, fp: Fingerprint | None, *, published: bool
    ) -> AdapterRecord | None:
        """Take the folder's fingerprint into its record; the record when it is due for
        inspection now (new or changed, and settled or published)."""
        folder = self.root / name
        record = self.catalog.get(name)
        if fp is None and not self.root.is_dir():
            self.rescan_soon()  # the drop directory itself is gone: see _watch_drop_dir
            return None
        if fp is None:
            self.settler.forget(name)
            if record is not None:
                self.catalog.remove(name)
                log.info("adapter_removed", adapter=name)
                self._catalog_changed()
            return None
        if record is None:
            record = AdapterRecord(name=name, source_path=folder)
            self.catalog.add(record)
        elif record.fingerprint == fp and not record.settling and record.reason != "unreadable":
            # Permissions are not in the fingerprint: an unreadable folder is inspected again
            # on every hint and rescan, so the chmod/chown that fixes it is taken.
            return None
        if not record.settling:
            record.settling = True
            record.changed_at = time.time()
            record.changed_mono = time.monotonic()
        if not self.settler.observe(
            name, fp, now=time.monotonic(), wall=time.time(), published=published
        ):
            self._recheck_at(name, self.settler.due(name))
            return None
        return record

    def _recheck_at(self, name: str, due: float | None) -> None:
        if due is None:
            return
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        delay = max(due - time.monotonic(), 0) + 0.05
        parts = tuple(name.split("/"))
        self._timers[name] = loop.call_later(delay, self._queue.put_nowait, Hint(parts))

    def _check(self, record: AdapterRecord) -> Checked:
        """Inspect the folder and, when valid, snapshot it: the blocking part of `_inspect`."""
        result = inspect_adapter(
            record.source_path, root=self.root, rules=self.rules, name=record.name
        )
        if isinstance(result, Invalid):
            return result, None
        try:
            return result, self.store.create(result, self.rules)
        except SnapshotError as err:
            return result, err

    def _check_all(self, records: list[AdapterRecord]) -> list[Checked]:
        return [self._check(record) for record in records]

    async def _inspect(
        self, record: AdapterRecord, fp: object, checked: Checked | None = None
    ) -> None:
        name = record.name
        if checked is None:
            checked = await asyncio.to_thread(self._check, record)
        result, made = checked
        record.settling = False
        record.validated_at = time.time()
        if isinstance(result, Invalid):
            self.metrics.inspections.labels("invalid").inc()
            record.fingerprint = fp
            record.reason, record.message = str(result.reason), result.message
            record.snapshot = None
            log.warning(
                "adapter_invalid", adapter=name, reason=record.reason, message=result.message
            )
            self._catalog_changed()
            return
        self.metrics.inspections.labels("valid").inc()
        if isinstance(made, SnapshotError):
            err = made
            if err.reason == "source_changed":
                record.settling = True  # it is still being written: settle again
                self._recheck_at(name, time.monotonic() + self.settings.settle_seconds)
                return
            record.validated_at = None
            record.reason, record.message = err.reason, err.message
            record.snapshot = None
            log.error("snapshot_failed", adapter=name, reason=err.reason, message=err.message)
            self._catalog_changed()
            return  # fingerprint not recorded: the next rescan tries again
        snap = made
        assert snap is not None  # a valid folder always comes with a snapshot or an error
        record.fingerprint = fp
        record.reason = record.message = None
        previous = record.snapshot
        record.snapshot = snap
        record.newest_mtime = result.newest_mtime_ns / 1e9
        if previous is None or previous.path != snap.path:
            log.info(
                "adapter_valid",
                adapter=name,
                digest=snap.digest,
                rank=result.rank,
                snapshot=str(snap.path),
                replaces=str(previous.path) if previous else None,
            )
            self._catalog_changed()

    def _catalog_changed(self) -> None:
        self._collect_soon()
        self._status_dirty = True
        for r in self.reconcilers:
            r.wake()

    def _server_changed(self) -> None:
        self._status_dirty = True
        # Only a sync after which a server no longer holds a snapshot (or the first time every
        # server was listed) can free one: collecting after every sync or load walked every
        # snapshot on disk (~1 s each at 10,000 adapters). The rest waits for the periodic one.
        listed = all(r.listed for r in self.reconcilers)
        loaded = frozenset(p for r in self.reconcilers for p in r.actual.values())
        if (listed and not self._all_listed) or self._loaded - loaded:
            self._collect_soon()
        self._all_listed, self._loaded = listed, loaded

    async def _collect(self) -> None:
        """Remove snapshots no adapter points to and no server may be reading."""
        self._gc_due = False
        if not all(r.listed for r in self.reconcilers):
            return  # a server we never listed may still read an old snapshot
        self._collect_after = time.monotonic() + self.settings.snapshot_grace_seconds
        keep = set(self.catalog.snapshot_paths())
        for r in self.reconcilers:
            keep.update(Path(p) for p in r.actual.values())
            if r.loading is not None:
                keep.add(Path(r.loading))  # vLLM may be reading it right now
        started = time.monotonic()
        try:
            # In a thread: walking 10,000 snapshots took seconds, and the status API with it.
            # Nothing can start to use an unreferenced snapshot meanwhile: rescans and
            # refreshes wait for the lock the caller holds, and servers load what is in `keep`.
            removed = await asyncio.to_thread(
                self.store.collect, keep, grace=self.settings.snapshot_grace_seconds
            )
        except OSError as err:
            log.warning("snapshot_collect_failed", error=str(err))
            return
        for path in removed:
            log.info("snapshot_removed", path=str(path))
        log.info(
            "snapshots_collected",
            removed=len(removed),
            seconds=round(time.monotonic() - started, 3),
        )


def _read_fingerprint(root: Path, name: str) -> Fingerprint | None:
    """The folder's fingerprint; None when it is gone or is no adapter (an org folder)."""
    folder = root / name
    fp = fingerprint(folder)
    if fp and "/" not in name and is_org(folder):
        fp = None  # it holds `org/name` adapters now: there is no adapter `name` any more
    return fp


def _read_fingerprints(
    root: Path, names: list[str], listings: dict[str, list[os.DirEntry[str]] | None]
) -> list[Fingerprint | None]:
    # `scan` has just told these adapters from org folders (no second `is_org` look) and
    # listed the top-level ones: at 10,000 folders a second listing of each was a third of
    # every periodic rescan. Plain strings: a Path per folder was another tenth.
    base = os.fspath(root)
    return [
        fingerprint(f"{base}/{name}")
        if (listing := listings[name]) is None
        else fingerprint_of(listing)
        for name in names
    ]


def run_daemon(settings: Settings) -> int:
    """`lorawarm run`: configure logging, run until stopped.

    The cache and state directories are checked by the caller (`lorawarm.cli`), which knows
    whether each came from a flag, the environment or the config file.
    """
    configure(settings.log_format, settings.log_level)
    daemon = Daemon(settings)
    try:
        return asyncio.run(daemon.run())
    except OSError as err:
        if err.errno in (98, 99):  # EADDRINUSE, EADDRNOTAVAIL: the status API cannot bind
            print(
                f"lorawarm: configuration error: LORAWARM_STATUS_PORT (status_port): cannot bind "
                f"{settings.status_host}:{settings.status_port}: {err.strerror}",
                file=sys.stderr,
            )
            return EX_CONFIG
        raise
