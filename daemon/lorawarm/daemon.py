r"""The supervisor: builds intake, reconcilers, collector and status API, runs them, and owns
signals, the shutdown deadline and the exit code. Nothing else.

    drop dir -> intake -> catalog -> reconcilers (one per vLLM server) -> vLLM
                             \-> collector <- reconcilers       status API reads them all

Everything runs on one asyncio loop. Signals only set flags: SIGTERM/SIGINT stop (a second
SIGINT exits at once), SIGHUP rescans the drop directory. A part that crashes stops the daemon
with exit code 70 (EX_SOFTWARE), so that systemd's `Restart=on-failure` restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import uvicorn

from lorawarm.catalog import AdapterState, Catalog, adapter_state
from lorawarm.collector import Collector
from lorawarm.intake import Intake
from lorawarm.logs import configure, get_logger
from lorawarm.metrics import Metrics
from lorawarm.notify import Notifier
from lorawarm.progress import Progress, warm_counts
from lorawarm.reconcile import ServerReconciler
from lorawarm.settings import EX_CONFIG, Settings
from lorawarm.snapshot import SnapshotStore
from lorawarm.sources.sync import SourceSync
from lorawarm.status import create_app
from lorawarm.vllm_client import Condition, VllmClient

log = get_logger(__name__)

SHUTDOWN_DEADLINE = 10.0
EX_SOFTWARE = 70  # a part of the daemon crashed: a bug, restart us


class _StatusServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Daemon:
    """One lorawarm process. The parts are public attributes, for the status API and tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier()
        self.store = SnapshotStore(settings.state_dir)
        self.catalog = Catalog(pinned=settings.pinned, complete=False)
        self.intake = Intake(
            settings, self.catalog, self.store, self.metrics, rules=settings.watched_rules()
        )
        self.reconcilers = [
            ServerReconciler(
                VllmClient(server.url, api_key=server.api_key, timeout=settings.request_timeout),
                self.catalog,
                self.store,
                self.metrics,
                resync_seconds=settings.resync_seconds,
                health_seconds=settings.health_seconds,
                max_backoff=settings.max_backoff_seconds,
                policy=server.policy,
                warm_limit=server.warm_limit,
            )
            for server in settings.server_configs()
        ]
        self.collector = Collector(
            self.store,
            self.catalog,
            {r.url: r for r in self.reconcilers},
            self.metrics,
            grace=settings.snapshot_grace_seconds,
            lock=self.intake.lock,
        )
        # Object-storage sources: their own stage, writing into the drop directory only.
        self.sync = (
            SourceSync(
                settings.sources,
                self.intake.root,
                settings.state_dir,
                self.metrics.registry,
                poll_seconds=settings.source_poll_seconds,
                concurrency=settings.source_concurrency,
                timeout=settings.source_timeout,
                max_bytes=settings.max_adapter_bytes,
                max_backoff=settings.max_backoff_seconds,
            )
            if settings.sources
            else None
        )
        self.ready = False
        self.status_port: int | None = None
        self._stop = asyncio.Event()
        self._interrupts = 0
        self._closed = False

    # -- what the status API reads ----------------------------------------------------------
    @property
    def server_urls(self) -> list[str]:
        return [r.url for r in self.reconcilers]

    @property
    def servers(self) -> Sequence[ServerReconciler]:
        return self.reconcilers

    @property
    def drop_dir_ok(self) -> bool:
        return self.intake.drop_dir_ok

    @property
    def watch_problem(self) -> str | None:
        return self.intake.watch_problem

    @property
    def collection_held(self) -> Mapping[str, str]:
        return self.collector.held

    def states(self) -> dict[str, AdapterState]:
        """Every adapter's overall state, by name."""
        return {
            record.name: adapter_state(
                record, [o for r in self.reconcilers if (o := r.outcome(record)) is not None]
            )
            for record in self.catalog
        }

    def summary(self, states: Mapping[str, AdapterState] | None = None) -> str:
        """One line for systemd's STATUS=: adapters by state, servers that are ok."""
        counts: dict[str, int] = {}
        for state in (self.states() if states is None else states).values():
            counts[state] = counts.get(state, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
        return f"adapters: {parts}; {self._servers_ok()}"

    def _servers_ok(self) -> str:
        ok = sum(1 for r in self.reconcilers if r.status.condition == Condition.OK)
        return f"servers ok: {ok}/{len(self.reconcilers)}"

    # -- lifecycle --------------------------------------------------------------------------
    def request_stop(self) -> None:
        """What SIGTERM does: stop, draining within the shutdown deadline."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def interrupt(self) -> None:
        """What SIGINT does: stop; a second one exits at once."""
        self._interrupts += 1
        if self._interrupts > 1:
            log.warning("second_interrupt_exiting_now")
            os._exit(130)
        self.request_stop()

    def hangup(self) -> None:
        """What SIGHUP does: rescan the drop directory and list every source now."""
        self.intake.rescan_soon()
        if self.sync is not None:
            self.sync.sync_soon()

    async def run(self) -> int:
        """Run until asked to stop; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.interrupt),
            (signal.SIGHUP, self.hangup),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)

        server, server_task = self._start_status_server()
        tasks: list[asyncio.Task[None]] = []
        code = 0
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            started = time.monotonic()
            # The reconcilers start after the first scan. Started with it, a cold start of 3,000
            # folders took 62 s instead of 29 s: the scan's thread holds the GIL for its
            # inspections, and the loop waits up to the switch interval after every I/O of every
            # load (a convoy). A stop is honoured at any point of the scan.
            tasks = [asyncio.create_task(self._heartbeat(), name="heartbeat")]
            scan = asyncio.create_task(self.intake.rescan(), name="first scan")
            await asyncio.wait([scan, stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if not scan.done():
                self.intake.stop()
                scan.cancel()
                await asyncio.wait([scan], timeout=SHUTDOWN_DEADLINE)
                tasks.append(scan)
            elif scan.exception() is not None:
                tasks.append(scan)
            else:
                self.ready = True
                log.info(
                    "ready",
                    adapters=len(self.catalog),
                    seconds=round(time.monotonic() - started, 3),
                    status=f"http://{self.settings.status_host}:{self.status_port}",
                )
                tasks += [
                    asyncio.create_task(r.run(), name=f"reconcile {r.url}")
                    for r in self.reconcilers
                ]
                tasks.append(asyncio.create_task(self.intake.run(), name="intake"))
                tasks.append(asyncio.create_task(self.collector.run(), name="collect"))
                if self.sync is not None:
                    tasks.append(asyncio.create_task(self.sync.run(), name="sources"))
                self.notifier.ready(self.summary())
            if self.ready:
                await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("task_crashed", task=task.get_name(), error=repr(task.exception()))
                    code = EX_SOFTWARE
        finally:
            stop.cancel()
            log.info("stopping")
            self.notifier.stopping()
            self.intake.stop()
            if self.sync is not None:
                self.sync.stop()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=SHUTDOWN_DEADLINE)
            await self.aclose()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server_task, timeout=5)
        log.info("stopped", code=code)
        return code

    async def aclose(self) -> None:
        """Stop the watcher and timers and close the vLLM clients (run() does this too)."""
        if self._closed:
            return
        self._closed = True
        self.intake.stop()
        if self.sync is not None:
            self.sync.stop()
        for r in self.reconcilers:
            await r.client.aclose()

    async def _heartbeat(self) -> None:
        """WATCHDOG=1 from the event loop itself (a wedged loop stops the pings and systemd
        restarts us), and STATUS= whenever the summary changes; during a long scan or warm-up
        the line says how far it is (progress.py), redrawn every second."""
        every = self.notifier.watchdog_seconds
        interval = min(every / 2, 5.0) if every else 5.0
        last = ""
        seen: tuple[object, ...] = ()
        progress = Progress()
        busy = False
        while True:
            if every:
                self.notifier.watchdog()
            scan = self.intake.scan_progress
            versions = (self.catalog.version, *(r.version for r in self.reconcilers), scan)
            if versions != seen:  # states() visits every adapter: ~50 ms at 10,000
                seen = versions
                if scan is not None and scan[0] < scan[1]:  # no states(): the scan is busy
                    busy_line = progress.line(scan, None)
                    line = busy_line or ""
                else:
                    states = self.states()
                    warm = warm_counts(states.values()) if self.ready else None
                    busy_line = progress.line(None, warm)
                    line = f"{busy_line}; {self._servers_ok()}" if busy_line else ""
                    line = line or self.summary(states)
                busy = busy_line is not None or not self.ready  # a start-up: look often
                if line != last:
                    self.notifier.status(line)
                    last = line
            await asyncio.sleep(min(interval, 1.0) if busy else interval)

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
        app = create_app(self, token=token.get_secret_value() if token else None, sources=self.sync)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        server = _StatusServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="status")
        return server, task


def lock_state_dir(state_dir: Path) -> int | None:
    """Hold `<state>/lorawarm.lock` for the life of the process; the pid of the holder's
    process (or 0) when another daemon holds it. Two daemons on one state dir would collect
    each other's snapshots."""
    path = state_dir / "lorawarm.lock"
    # Held through a read-only descriptor: a file open for writing would keep the state dir's
    # filesystem from being remounted read-only (the daemon must survive that, not prevent it).
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            os.close(fd)
            raise
        try:
            holder = int(os.pread(fd, 32, 0).decode().strip() or 0)
        except (OSError, ValueError):
            holder = 0
        os.close(fd)
        return holder
    with contextlib.suppress(OSError):  # the pid is for the message only
        path.write_text(f"{os.getpid()}\n")
    return None


def run_daemon(settings: Settings) -> int:
    """`lorawarm run`: configure logging, run until stopped.

    The cache and state directories are checked by the caller (`lorawarm.cli`), which knows
    whether each came from a flag, the environment or the config file.
    """
    configure(settings.log_format, settings.log_level)
    try:
        holder = lock_state_dir(settings.state_dir)
    except OSError as err:
        print(
            f"lorawarm: configuration error: {settings.origin('state_dir')}: cannot lock "
            f"{settings.state_dir}: {err.strerror}",
            file=sys.stderr,
        )
        return EX_CONFIG
    if holder is not None:
        print(
            f"lorawarm: configuration error: another lorawarm (pid {holder or 'unknown'}) runs "
            f"on the state dir {settings.state_dir}; give each daemon its own "
            "LORAWARM_STATE_DIR",
            file=sys.stderr,
        )
        return EX_CONFIG
    daemon = Daemon(settings)
    try:
        return asyncio.run(daemon.run())
    except OSError as err:
        if err.errno in (98, 99):  # EADDRINUSE, EADDRNOTAVAIL: the status API cannot bind
            print(
                f"lorawarm: configuration error: {settings.origin('status_port')}: cannot bind "
                f"{settings.status_host}:{settings.status_port}: {err.strerror}",
                file=sys.stderr,
            )
            return EX_CONFIG
        raise
