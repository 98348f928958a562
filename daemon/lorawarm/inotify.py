"""A two-level inotify watch of the drop directory: the only levels that can hold adapters.

Adapters are `root/name/` and `root/org/name/`, and vLLM reads only the top-level files of an
adapter folder, so the drop directory, every folder in it and every folder in those are watched
(non-recursively each), and nothing deeper. watchdog's recursive watch added one watch per
folder at any depth, walking the whole tree at start (~11 % of a restart at 10,000 folders) and
again after every queue overflow; a hostile tree thousands of levels deep cost a watch each.

The reader thread only turns events into paths below the root and hands them to `deliver`; it
never raises into nothing (an unexpected error is logged, and a full rescan is asked for). A
kernel queue overflow (`IN_Q_OVERFLOW`: events were lost) is counted in `overflows` and reported
as a path of the root itself, which the intake answers with a full rescan. Standard library
only (ctypes to the C library's inotify calls).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from lorawarm.logs import get_logger

log = get_logger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# Changes only: IN_OPEN/IN_CLOSE_NOWRITE would report lorawarm's own reads of every folder.
MASK = (
    IN_MODIFY
    | IN_ATTRIB  # a chmod/chown may make an unreadable adapter readable
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
)
LEVELS = 2  # folders below the root that are watched: `name`, `org/name`
_EVENT = struct.Struct("iIII")

# (path below the root as parts, is a directory, renamed into place)
Deliver = Callable[[tuple[str, ...], bool, bool], None]

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - every Linux has a C library to ask
    _LIBC = None


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class TwoLevelInotify:
    """Watches `root` and the folders one and two levels below it; see the module docstring.

    `start()` raises OSError when the kernel refuses (ENOSPC: the watch limit, EMFILE: the
    instance limit, ENOENT: no root) and leaves nothing running.
    """

    def __init__(self, root: Path, deliver: Deliver) -> None:
        self.root = os.fspath(root)
        self._deliver = deliver
        self._fd = -1
        self._wake_r = self._wake_w = -1
        self._paths: dict[int, tuple[str, ...]] = {}  # watch descriptor -> parts below root
        self._wds: dict[tuple[str, ...], int] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.overflows = 0  # kernel queue overflows seen: events were lost
        self.missed_watches = 0  # folders that could not be watched (the watch limit)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "no C library to call inotify through")
        self._fd = _check(_LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._add((), strict=True)
            self._add_below(())
        except BaseException:
            self._close()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lorawarm-inotify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            thread.join(timeout=5)
        self._close()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def watches(self) -> int:
        """How many folders are watched now."""
        return len(self._paths)

    def _close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1
        self._paths.clear()
        self._wds.clear()

    # -- watches ---------------------------------------------------------------------------
    def _full(self, parts: tuple[str, ...]) -> str:
        return os.path.join(self.root, *parts)

    def _add(self, parts: tuple[str, ...], *, strict: bool = False) -> bool:
        """Watch the folder at `parts`; False when it is gone or not a folder."""
        assert _LIBC is not None
        wd = _LIBC.inotify_add_watch(self._fd, os.fsencode(self._full(parts)), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if strict:
                raise OSError(err, os.strerror(err), self._full(parts))
            if err in (errno.ENOSPC, errno.ENOMEM):
                self.missed_watches += 1
                if self.missed_watches == 1:
                    log.error(
                        "watch_limit_reached",
                        path=self._full(parts),
                        message="raise fs.inotify.max_user_watches; rescans catch up meanwhile",
                    )
            return False
        old = self._paths.get(wd)
        if old is not None and old != parts:
            self._wds.pop(old, None)
        self._paths[wd] = parts
        self._wds[parts] = wd
        return True

    def _add_below(self, parts: tuple[str, ...]) -> None:
        """Watch the folders inside `parts`, down to `LEVELS` below the root."""
        if len(parts) >= LEVELS:
            return
        try:
            with os.scandir(self._full(parts)) as it:
                subdirs = [
                    e.name
                    for e in it
                    if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
                ]
        except OSError:
            return
        for name in subdirs:
            child = (*parts, name)
            if self._add(child):
                self._add_below(child)

    def _forget(self, parts: tuple[str, ...]) -> None:
        """Stop watching `parts` and what is below it (it was renamed away)."""
        assert _LIBC is not None
        for watched in [p for p in self._wds if p[: len(parts)] == parts]:
            wd = self._wds.pop(watched)
            self._paths.pop(wd, None)
            _LIBC.inotify_rm_watch(self._fd, wd)

    def rewatch(self) -> None:
        """Add the watches of folders created while events were lost (after an overflow)."""
        self._add_below(())

    # -- the reader thread -----------------------------------------------------------------
    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            try:
                ready = poller.poll()
                if self._stop.is_set():
                    return
                if any(fd == self._fd for fd, _ in ready):
                    self._read()
            except Exception:  # the thread must not die silently: ask for a rescan
                log.exception("watch_event_failed")
                with contextlib.suppress(Exception):
                    self._deliver((), True, False)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            self._event(wd, mask, os.fsdecode(raw.rstrip(b"\0")))

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.overflows += 1
            log.warning("watch_queue_overflow", path=self.root, overflows=self.overflows)
            self.rewatch()
            self._deliver((), True, False)
            return
        parts = self._paths.get(wd)
        if parts is None:
            return  # a watch already forgotten
        if mask & IN_IGNORED:
            self._paths.pop(wd, None)
            if self._wds.get(parts) == wd:
                del self._wds[parts]
            if not parts:
                self._deliver((), True, False)  # the root itself went away
            return
        if not name:  # the watched folder itself: deleted, moved, chmod (the root: a rescan)
            self._deliver(parts, True, False)
            return
        path = (*parts, name)
        is_dir = bool(mask & IN_ISDIR)
        if is_dir and mask & IN_MOVED_FROM:
            self._forget(path)
        fresh = is_dir and mask & (IN_CREATE | IN_MOVED_TO) and not name.startswith(".")
        if fresh and len(path) <= LEVELS and self._add(path):
            self._add_below(path)
        self._deliver(path, is_dir, bool(mask & IN_MOVED_TO) and is_dir)
