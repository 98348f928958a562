"""Immutable, content-addressed copies of adapters: the only files vLLM ever reads.

`<state>/snapshots/<name>/<digest>/` holds the adapter's `adapter_config.json` and its weights
file, read-only. A snapshot is built in `<state>/snapshots/.staging/`, checked again (the copy
itself is inspected, so what vLLM reads is what was validated), and published with one
`rename`: two writers (the daemon and the plugin) building the same content at the same moment
both end up with the same complete directory, and nobody ever sees a half-written one.

Because vLLM reads only from here, a user deleting or rewriting a folder in the drop directory
cannot break a running vLLM (vllm#5105), and a changed adapter gets a new path.

The source is read once: each file is cloned (`FICLONE`, a reflink: no data copied, where the
filesystem shares extents: XFS with reflink=1, btrfs, bcachefs, ZFS 2.2+) and the clone hashed,
or copied while it is hashed; the staging folder is then published under the digest of what
was written. Durability is recorded by a `.synced` marker inside the snapshot, written once its
files are known to be on disk: `create(durable=True)` fsyncs before publishing; the plugin
publishes first and syncs in the background (off vLLM's request path), the daemon's rescans
sync a whole batch with one `syncfs`. A snapshot without the marker (its writer has not synced
it yet, or a crash came first) is hashed again before it is used, and remade when it differs.

This module is shared with the vLLM plugin: standard library and `lorawarm.inspection` only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote, unquote

from lorawarm.inspection import CONFIG_FILE, FileStat, Invalid, Rules, Valid, inspect_adapter

DIGEST_CHARS = 32
STAGING = ".staging"
# `<snapshots>/.sources/<quoted name>`: which digest the adapter's files had, by their stat.
SOURCES = ".sources"
# A digest is remembered only for files whose ctime is this much older than the start of the
# read: a write during or after the read moves ctime past it (ctime cannot be set by users,
# and the kernel's coarse clock lags by milliseconds), so a remembered digest is never stale.
STABLE_NS = 1_000_000_000
TRASH = "gone-"  # prefix of a snapshot being removed, inside the staging dir
# A staging folder whose writer holds no lock on it (the writer was killed) and that has not
# changed for this long is removed; the delay covers the instant between mkdtemp and flock.
ABANDONED_AGE = 10.0
_TMP_RECORD = "%tmp-"  # never the start of a quoted name: `%` is always followed by hex there
_DIGEST = re.compile(rf"[0-9a-f]{{{DIGEST_CHARS}}}")
_CHUNK = 1 << 20
# Inside a snapshot: its files (and the names they were published under) reached the disk.
MARKER = ".synced"
FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
# What `FICLONE` answers when this pair of files cannot share extents (another filesystem, one
# without reflinks, an old kernel): copy the bytes instead.
_NO_CLONE = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
)
# (source device, state device) pairs whose files FICLONE refused: not tried again (a cache of
# what the filesystems can do, the same for every store in the process).
_NO_CLONE_PAIRS: set[tuple[int, int]] = set()


class SnapshotReason(StrEnum):
    """Why a snapshot could not be made; the values are public (status API, logs)."""

    SOURCE_CHANGED = "source_changed"  # the folder changed while it was read: settle again
    SNAPSHOT_INVALID = "snapshot_invalid"  # the copy did not pass inspection
    SNAPSHOT_FAILED = "snapshot_failed"  # the state dir cannot be written (full, read-only)


class SnapshotError(OSError):
    """A snapshot could not be made (disk full, read-only state dir, source changed...);
    `reason` says which."""

    def __init__(self, reason: SnapshotReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Snapshot:
    """A published snapshot: `path` is what vLLM is given (absolute)."""

    name: str
    digest: str
    path: Path


class SnapshotStore:
    """Creates, finds and collects snapshots under `<state_dir>/snapshots`."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(os.path.abspath(state_dir)) / "snapshots"
        # Snapshots published here with `durable=False` and not synced yet, with the flock
        # held on each since it was a staging folder: another user that finds one unmarked
        # sees the lock and knows a live writer is syncing it (no need to verify its bytes).
        self._unsynced: dict[Path, int] = {}
        self._unsynced_lock = threading.Lock()

    def path_for(self, name: str, digest: str) -> Path:
        return self.root / name / digest

    def owns(self, path: str | Path) -> bool:
        """True when `path` is one of our snapshot directories (as vLLM's /v1/models shows it)."""
        return self.parse(path) is not None

    def parse(self, path: str | Path) -> tuple[str, str] | None:
        """(name, digest) of a snapshot path, or None when the path is not ours."""
        try:
            rel = Path(os.path.normpath(path)).relative_to(self.root)
        except ValueError:
            return None
        parts = rel.parts
        if (
            len(parts) not in (2, 3)
            or parts[0] in (STAGING, SOURCES)
            or not _DIGEST.fullmatch(parts[-1])
        ):
            return None
        return "/".join(parts[:-1]), parts[-1]

    def create(self, adapter: Valid, rules: Rules, *, durable: bool = True) -> Snapshot:
        """Publish a snapshot of `adapter` (or find the identical one) and return it.

        With `durable`, the snapshot's files are on disk when this returns (fsync, then the
        marker); without it the caller makes them so later (`sync`), or never (a lost marker
        only costs a verification at the next use). Raises `SnapshotError` when the source
        changed under us, when the copy does not pass inspection, or when the state dir cannot
        be written; nothing half-written is left.
        """
        digest = self._remembered(adapter)
        if digest is not None:
            final = self.path_for(adapter.name, digest)
            if self._usable(final, adapter.files, digest, durable=durable):
                return Snapshot(adapter.name, digest, final)
        staging = self.root / STAGING
        try:
            staging.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="snap-", dir=staging))
        except OSError as err:
            raise SnapshotError(
                SnapshotReason.SNAPSHOT_FAILED, f"cannot write the state dir: {err}"
            ) from err
        lock = -1
        started = time.time_ns()
        try:
            lock = _hold(tmp)  # while held, collection knows that this copy is alive
            digest = _copy(adapter.path, adapter.files, tmp)
            check = inspect_adapter(tmp, root=staging, rules=rules, name=adapter.name)
            if isinstance(check, Invalid):
                raise SnapshotError(
                    SnapshotReason.SNAPSHOT_INVALID,
                    f"the copy did not pass inspection: {check.message}",
                )
            final = self.path_for(adapter.name, digest)
            if not self._usable(final, adapter.files, digest, durable=durable):
                self._publish(tmp, final, adapter.files, digest, durable=durable)
                if not durable and not tmp.exists():  # ours is the published one
                    with self._unsynced_lock:
                        self._unsynced[final], lock = lock, -1
        except SnapshotError:
            _remove(tmp)
            raise
        except OSError as err:
            _remove(tmp)
            raise SnapshotError(
                SnapshotReason.SNAPSHOT_FAILED, f"cannot write the snapshot: {err}"
            ) from err
        finally:
            if lock >= 0:
                os.close(lock)
        _remove(tmp)  # what is left when the same content was published already
        self._remember(adapter, digest, started)
        return Snapshot(adapter.name, digest, final)

    def find(self, adapter: Valid, digest: str, *, durable: bool = True) -> Snapshot | None:
        """The published snapshot of `adapter` whose content digest is known to be `digest`
        (a remembered verdict), or None when it must be made (`create`)."""
        final = self.path_for(adapter.name, digest)
        if self._usable(final, adapter.files, digest, durable=durable):
            return Snapshot(adapter.name, digest, final)
        return None

    def _publish(
        self, tmp: Path, final: Path, files: tuple[FileStat, ...], digest: str, *, durable: bool
    ) -> None:
        """Rename the checked staging copy `tmp` to `final`, read-only."""
        for f in files:
            (tmp / f.name).chmod(0o444)
        # Inherit the snapshot root's group bits (a shared group lets the plugin, running
        # as vLLM's user, and the daemon create and collect each other's snapshots).
        tmp.chmod(0o755 | (self.root.stat().st_mode & 0o070))
        if durable:
            _fsync_files(tmp, files)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(final)
        except OSError as err:
            # Someone (the plugin, or another daemon) published the same content first.
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if self._usable(final, files, digest, durable=durable):
                return
            # Files are missing or differ from their digest (a removal killed half-way, a
            # crash before they reached the disk): replace it.
            _discard(final, self.root / STAGING)
            tmp.rename(final)
        if durable:
            _mark(final)

    def _usable(
        self, final: Path, files: Iterable[FileStat], digest: str, *, durable: bool
    ) -> bool:
        """True when `final` is a whole snapshot of `digest` (made durable if asked)."""
        files = tuple(files)
        if not _complete(final, files):
            return False
        if os.path.exists(f"{final}/{MARKER}"):
            return True
        try:
            if _held(final):  # a live writer published it whole and is about to sync it
                if durable:
                    _fsync_files(final, files)
                    _mark(final)
                return True
        except OSError:
            return False
        # Published but not known to be on disk, and nobody is syncing it: its writer died
        # first (a crash may have left anything in the files). Their content decides.
        try:
            if _hash_folder(final, files) != digest:
                return False
            if durable:
                _fsync_files(final, files)
                _mark(final)
        except OSError:
            return False
        return True

    def sync(self, snapshots: Iterable[Snapshot]) -> None:
        """Make snapshots created with `durable=False` durable: one `syncfs` of the state
        filesystem for a batch (where the C library has it), an fsync of each file for a
        single one, then their markers. Best effort: a snapshot left unmarked is verified at
        its next use."""
        paths = [s.path for s in snapshots]
        pending = [p for p in paths if not os.path.exists(p / MARKER)]
        try:
            if len(pending) == 1 or (pending and not _syncfs(self.root)):
                for path in pending:
                    _fsync_files(path, _regular_files(path))
        except OSError:
            pending = []  # left unmarked (and unlocked below): verified at their next use
        for path in pending:
            with contextlib.suppress(OSError):
                _mark(path)
        with self._unsynced_lock:
            locks = [self._unsynced.pop(p, -1) for p in paths]
        for fd in locks:
            if fd >= 0:
                os.close(fd)

    def _source_record(self, name: str) -> Path:
        return self.root / SOURCES / quote(name, safe="")

    def _remembered(self, adapter: Valid) -> str | None:
        """The digest recorded for these very files (same inode, size, mtime and ctime), so
        that a restart or a new vLLM process does not read every adapter's weights again."""
        try:
            with open(f"{self.root}/{SOURCES}/{quote(adapter.name, safe='')}", "rb") as f:
                record = json.loads(f.read())
            files = {f.name: f for f in adapter.files}
            if sorted(record["files"]) != sorted(files):
                return None
            for name, (size, mtime_ns, inode, ctime_ns) in record["files"].items():
                st = os.stat(f"{adapter.path}/{name}")
                seen = files[name]
                if (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) != (
                    size,
                    mtime_ns,
                    inode,
                    ctime_ns,
                ) or (seen.size, seen.mtime_ns, seen.inode) != (size, mtime_ns, inode):
                    return None
            digest = record["digest"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None  # none yet, or unreadable: the digest is computed
        return digest if isinstance(digest, str) and _DIGEST.fullmatch(digest) else None

    def _remember(self, adapter: Valid, digest: str, started_ns: int) -> None:
        """Record the digest of files that were not written since before the read began."""
        files: dict[str, list[int]] = {}
        try:
            for f in adapter.files:
                st = os.stat(adapter.path / f.name)
                if st.st_ctime_ns >= started_ns - STABLE_NS or (
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                ) != (f.size, f.mtime_ns, f.inode):
                    return  # written recently (or under us): computed again next time
                files[f.name] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
            record = self._source_record(adapter.name)
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f"{_TMP_RECORD}{os.getpid()}-{record.name}")
            tmp.write_text(json.dumps({"digest": digest, "files": files}))
            tmp.replace(record)  # no fsync: a lost or torn record only costs a digest
        except OSError:
            return  # a full or read-only state dir: the snapshot itself reports that

    def existing(self) -> Iterator[Snapshot]:
        """Every published snapshot on disk."""
        for name, digest, path in self._walk():
            yield Snapshot(name, digest, Path(path))

    def _walk(self) -> Iterator[tuple[str, str, str]]:
        """(name, digest, path) of every published snapshot, lazily, in plain strings: at
        10,000 snapshots a `Path` and an `is_file` per snapshot were most of a collection."""
        for first in _subdir_entries(os.fspath(self.root)):
            if first.name in (STAGING, SOURCES):
                continue
            for second in _subdir_entries(first.path):
                # `org/<32 hex chars>` is a valid adapter name too: a snapshot is told apart
                # from a name folder by what it holds.
                if _DIGEST.fullmatch(second.name) and os.path.isfile(
                    f"{second.path}/{CONFIG_FILE}"
                ):
                    yield first.name, second.name, second.path
                    continue
                for third in _subdir_entries(second.path):
                    if _DIGEST.fullmatch(third.name):
                        yield f"{first.name}/{second.name}", third.name, third.path

    def collect(
        self, keep: Iterable[Path], *, grace: float = 0.0, staging_age: float = 3600.0
    ) -> list[Path]:
        """Remove snapshots not in `keep` and made more than `grace` seconds ago (the plugin
        may be about to hand a new one to vLLM), and stale staging dirs; return what went."""
        kept = {os.path.normpath(p) for p in keep}
        removed = []
        left: set[str] = set()  # names that still have a snapshot
        now = time.time()
        # Lazily: each level is listed before anything in it is removed, and a list of every
        # snapshot was ~10 MB at 10,000.
        for name, _, path in self._walk():
            if path in kept or _younger(path, now - grace):
                left.add(name)
                continue
            snap = Path(path)
            _discard(snap, self.root / STAGING)
            removed.append(snap)
            with contextlib.suppress(OSError):
                snap.parent.rmdir()  # only succeeds once the name has no snapshot left
                if snap.parent.parent != self.root:
                    snap.parent.parent.rmdir()
        self._forget_records(keeping=left, now=now)
        staging = self.root / STAGING
        for leftover in _subdirs(staging):
            with contextlib.suppress(OSError):
                age = now - leftover.stat().st_mtime
                if (
                    leftover.name.startswith(TRASH)
                    or age > staging_age
                    or (age > ABANDONED_AGE and _abandoned(leftover))
                ):
                    _remove(leftover)
                    removed.append(leftover)
        return removed

    def _forget_records(self, *, keeping: set[str], now: float) -> None:
        """Remove the digest records of names that have no snapshot left."""
        try:
            with os.scandir(self.root / SOURCES) as it:
                records = [e.name for e in it]
        except OSError:
            return
        for entry in records:
            path = self.root / SOURCES / entry
            with contextlib.suppress(OSError):
                if entry.startswith(_TMP_RECORD):  # left by a killed writer
                    gone = now - path.stat().st_mtime > ABANDONED_AGE
                else:
                    gone = unquote(entry) not in keeping
                if gone:
                    path.unlink()


def _younger(path: str, than: float) -> bool:
    try:
        return os.stat(path).st_ctime >= than
    except OSError:
        return True  # cannot tell: keep it for now


def _subdirs(path: Path) -> list[Path]:
    return [Path(e.path) for e in _subdir_entries(os.fspath(path))]


def _subdir_entries(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _complete(path: Path, files: Iterable[FileStat]) -> bool:
    # Published by rename and removed by rename (`_discard`), so a snapshot directory is whole
    # unless something else broke it: check that every file is there at its size.
    try:
        # Strings, not Paths: this runs for every folder of a restart.
        base = os.fspath(path)
        return all(os.stat(f"{base}/{f.name}").st_size == f.size for f in files)
    except OSError:
        return False


def _open_source(folder: Path, f: FileStat) -> int:
    try:
        fd = os.open(folder / f.name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:  # deleted or replaced since it was inspected
        raise SnapshotError(
            SnapshotReason.SOURCE_CHANGED, f"cannot read {f.name}: {err.strerror}"
        ) from err
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns, st.st_ino) != (
        f.size,
        f.mtime_ns,
        f.inode,
    ):
        os.close(fd)
        raise SnapshotError(
            SnapshotReason.SOURCE_CHANGED, f"{f.name} changed since it was inspected"
        )
    return fd


def _copy(folder: Path, files: tuple[FileStat, ...], dest: Path) -> str:
    """Copy the files into `dest`, reading each source once, and return the digest of
    what was written. Raises `SnapshotError(SOURCE_CHANGED)` when a source file is not
    the one inspected, or changed while it was read."""
    h = hashlib.sha256()
    dest_dev = os.stat(dest).st_dev
    for f in sorted(files, key=lambda x: x.name):
        fd = _open_source(folder, f)
        try:
            before = os.fstat(fd)
            out = os.open(dest / f.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                h.update(f"{f.name}\0{f.size}\0".encode())
                written = _copy_file(
                    fd, out, f.size, h, clone=(before.st_dev, dest_dev) not in _NO_CLONE_PAIRS
                )
                if written < 0:
                    _NO_CLONE_PAIRS.add((before.st_dev, dest_dev))
            finally:
                os.close(out)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if abs(written) != f.size or _identity(after) != _identity(before):
            raise SnapshotError(
                SnapshotReason.SOURCE_CHANGED, "the adapter changed while it was being copied"
            )
    return h.hexdigest()[:DIGEST_CHARS]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    # ctime too: a write that keeps size and mtime (or resets mtime) still moves it.
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _copy_file(src: int, dst: int, size: int, h: hashlib._Hash, *, clone: bool) -> int:
    """Copy `size` bytes from `src` to `dst`, feeding what `dst` holds to `h`; return the
    number of bytes copied, negative when a clone was tried and the filesystem refused it."""
    refused = False
    if clone and size:
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as err:
            if err.errno not in _NO_CLONE:
                raise
            refused = True
        else:
            # The clone shares the source's extents but not its page cache: hash the source,
            # which a fresh publish has in memory (the clone would be read from the disk).
            # The caller's fstat of the source before and after (ctime included) proves that
            # nothing wrote it meanwhile, so the clone holds exactly the bytes hashed.
            return _hash_fd(src, h)
    copied = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while n := os.readv(src, [buf]):
        chunk = view[:n]
        h.update(chunk)
        while chunk:
            chunk = chunk[os.write(dst, chunk) :]
        copied += n
    return -copied if refused else copied


def _hash_fd(fd: int, h: hashlib._Hash) -> int:
    size = os.fstat(fd).st_size
    if size:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
            h.update(mapped)
    return size


def _hash_folder(folder: Path, files: Iterable[FileStat]) -> str:
    """The digest of a published snapshot's files, as `SnapshotStore._copy` computes it."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda x: x.name):
        fd = os.open(folder / f.name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            h.update(f"{f.name}\0{f.size}\0".encode())
            _hash_fd(fd, h)
        finally:
            os.close(fd)
    return h.hexdigest()[:DIGEST_CHARS]


def _regular_files(folder: Path) -> list[FileStat]:
    with os.scandir(folder) as it:
        return [
            FileStat(e.name, 0, 0, 0)
            for e in it
            if e.is_file(follow_symlinks=False) and e.name != MARKER
        ]


def _fsync_files(folder: Path, files: Iterable[FileStat]) -> None:
    for f in files:
        fd = os.open(folder / f.name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _mark(snapshot: Path) -> None:
    os.close(os.open(snapshot / MARKER, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))


def _syncfs(path: Path) -> bool:
    """`syncfs(2)` on the filesystem holding `path`; False when the C library lacks it."""
    func = getattr(_LIBC, "syncfs", None)
    if func is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if func(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
    return True


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # no C library to ask (a static build): fsync file by file
    _LIBC = None


def _hold(folder: Path) -> int:
    """Open a staging folder and hold an exclusive flock on it (released when the fd is closed,
    by us or by the kernel when the process dies)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        raise
    return fd


def _held(folder: Path) -> bool:
    """True when someone holds the folder's flock (a writer that has not synced it yet)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _abandoned(folder: Path) -> bool:
    """True when nobody holds the staging folder's lock: its writer died (SIGKILL, OOM)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False  # not ours to judge (another user's copy in progress): the age rule decides
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _discard(path: Path, staging: Path) -> None:
    """Remove a published snapshot so that its path never shows a half-removed one (vLLM would
    be given it again if the same content came back): rename it into the staging dir in one
    step, then delete it there. A removal killed half-way leaves a `gone-*` folder in staging,
    which the next collection deletes."""
    try:
        staging.mkdir(parents=True, exist_ok=True)
        trash = Path(tempfile.mkdtemp(prefix=TRASH, dir=staging))
    except OSError:
        _remove(path)
        return
    with contextlib.suppress(OSError):
        path.rename(trash / path.name)
    _remove(trash)


def _remove(path: Path) -> None:
    # Files are read-only but their directory is not, so removal needs no chmod.
    shutil.rmtree(path, ignore_errors=True)
