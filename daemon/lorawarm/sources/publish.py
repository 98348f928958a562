"""Publishing into the drop directory exactly as a user should: build the folder in a
dot-folder (`<drop>/.lorawarm-sync/`, which the intake ignores, on the same filesystem), then
rename it into place. A changed adapter is swapped in with one `renameat2(RENAME_EXCHANGE)`, so
the name never disappears (the intake would unload it meanwhile); where that call is missing,
two renames. A removal renames the folder out of the way first, then deletes it: the intake
never sees a half-deleted adapter.

`name_lock` serialises everything done to one name across processes (the daemon's sync and the
plugin's on-demand fetch): a flock on `<state>/sources/locks/<name>.lock`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

STAGING = ".lorawarm-sync"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_root(drop: Path) -> Path:
    return drop / STAGING


def new_staging(drop: Path) -> Path:
    """A fresh, empty staging folder inside the drop directory."""
    root = staging_root(drop)
    root.mkdir(exist_ok=True)
    path = root / uuid.uuid4().hex
    path.mkdir()
    return path


@contextlib.contextmanager
def name_lock(state_dir: Path, name: str) -> Iterator[None]:
    """Hold the cross-process lock of adapter `name` (a validated name)."""
    path = Path(os.path.abspath(state_dir)) / "sources" / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _libc_exchange() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError):
        return None


_EXCHANGE = _libc_exchange()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False when the system cannot."""
    if _EXCHANGE is None:
        return False
    rc = _EXCHANGE(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(drop: Path, staged: Path, name: str) -> Path:
    """Move the complete folder `staged` to `<drop>/<name>`, replacing what is there.

    For `org/name` with no `org/` folder yet, `org/` is made inside the staging area and the
    whole of it renamed in, so the drop directory never shows an empty `org` folder (which the
    intake would take for an adapter being copied).
    """
    target = drop / name
    if "/" in name and not (drop / name.partition("/")[0]).is_dir():
        org, _, leaf = name.partition("/")
        holder = new_staging(drop)
        os.rename(staged, holder / leaf)
        try:
            os.rename(holder, drop / org)
        except OSError:
            os.rename(holder / leaf, staged)
            os.rmdir(holder)
            raise
        return target
    if not os.path.lexists(target):
        os.rename(staged, target)
        return target
    if _exchange(staged, target):
        _discard(staged)  # now the old content
        return target
    old = new_staging(drop)
    os.rename(target, old / "old")
    os.rename(staged, target)
    _discard(old)
    return target


def remove(drop: Path, name: str) -> None:
    """Take `<drop>/<name>` away in one rename, then delete it."""
    target = drop / name
    if not os.path.lexists(target):
        return
    away = new_staging(drop)
    os.rename(target, away / "old")
    _discard(away)
    if "/" in name:  # an org folder left empty would look like an adapter being copied
        with contextlib.suppress(OSError):
            os.rmdir(drop / name.partition("/")[0])


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def clean_staging(drop: Path, older_than: float = 3600.0) -> None:
    """Remove staging folders left by a process that died mid-download: those untouched for
    `older_than` seconds (a live download, the plugin's too, writes into its folder)."""
    import time

    limit = time.time() - older_than
    with contextlib.suppress(OSError), os.scandir(staging_root(drop)) as it:
        for entry in it:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < limit:
                    _discard(Path(entry.path))
