"""Containment: the folder and every file vLLM may read lie inside the drop directory, are
regular files, and are read without ever blocking.

vLLM reads only the top-level files of an adapter folder, so only those are looked at; a folder
with more than `MAX_ENTRIES` entries is refused before any more of it is stat'ed (settle's
fingerprint stops at the same count). Files are opened once, with `O_NONBLOCK` so that a FIFO
swapped in never blocks the open, checked with `fstat` to be regular, and then read only through
that descriptor.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lorawarm.inspection.verdict import CONFIG_FILE, FileStat, Reason, Reject

# An adapter needs two files; a model card, a tokenizer and training leftovers fit easily.
MAX_ENTRIES = 256


@dataclass(frozen=True)
class Listing:
    """A folder's top-level regular files (by name) and the names of its subfolders."""

    files: dict[str, FileStat]
    subfolders: tuple[str, ...]


def real_folder(folder: Path, root: Path) -> tuple[str, str]:
    """The real paths of `folder` and of the drop directory `root`; `folder` must lie strictly
    below `root`.

    Raises `Reject` when it resolves to `root` itself, passes through a symlink that leads out,
    or is not under `root` at all.
    """
    real_root = os.path.realpath(root)
    real = realpath_below(folder, root, real_root)
    if inside(real, real_root) and real != real_root:
        return real, real_root
    if real == real_root:
        raise Reject(
            Reason.SYMLINK_ESCAPE,
            f"folder {folder} resolves to the adapter directory itself, not to an adapter",
        )
    if inside(os.path.abspath(folder), os.path.abspath(root)):  # a symlink (it, `org/`) leads out
        raise Reject(
            Reason.SYMLINK_ESCAPE,
            f"folder {folder} is or passes through a symlink that leads outside the adapter "
            f"directory {root}; copy the adapter in instead",
        )
    raise Reject(Reason.OUTSIDE_ROOT, f"folder {folder} is not inside the adapter directory {root}")


def realpath_below(folder: Path, root: Path, real_root: str) -> str:
    """Exactly `os.path.realpath(folder)`, without resolving `root` a second time when `folder`
    is `root/name` or `root/org/name` and neither part is a symlink (the common case)."""
    path, base = os.fspath(folder), os.fspath(root).rstrip(os.sep)
    parts = path[len(base) + 1 :].split(os.sep) if path.startswith(base + os.sep) else []
    if not 1 <= len(parts) <= 2 or any(p in ("", ".", "..") for p in parts):
        return os.path.realpath(folder)
    probe, real = base, real_root
    for part in parts:
        probe, real = f"{probe}{os.sep}{part}", f"{real}{os.sep}{part}"
        try:
            if stat.S_ISLNK(os.lstat(probe).st_mode):
                return os.path.realpath(folder)
        except OSError:
            return os.path.realpath(folder)  # gone, or unreadable: realpath says what it can
    return real


def inside(path: str, root: str) -> bool:
    """True when `path` is `root` or below it (both already absolute or real)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_directory(real: str, shown: Path) -> None:
    """Refuse a folder that does not exist, cannot be stat'ed or is no directory."""
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise Reject(Reason.NOT_A_DIRECTORY, f"folder {shown} does not exist") from None
    except OSError as err:
        raise Reject(Reason.UNREADABLE, f"cannot stat {shown}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Reject(Reason.NOT_A_DIRECTORY, f"{shown} is not a directory")


def scan(folder: str, real_root: str) -> Listing:
    """Stat the folder's top-level entries; refuse escaping symlinks and non-regular files.

    Subfolders are not entered (vLLM never reads them); their names are kept so that a caller
    can tell a directory of adapters from an adapter.
    """
    files: dict[str, FileStat] = {}
    subfolders: list[str] = []
    try:
        with os.scandir(folder) as it:
            for count, entry in enumerate(it):
                if count >= MAX_ENTRIES:
                    raise Reject(
                        Reason.TOO_MANY_FILES,
                        f"the folder holds more than {MAX_ENTRIES} entries; an adapter needs two",
                    )
                found = _stat_entry(entry, real_root)
                if isinstance(found, FileStat):
                    files[entry.name] = found
                elif found:
                    subfolders.append(entry.name)
    except OSError as err:
        raise Reject(Reason.UNREADABLE, f"cannot list {folder}: {err.strerror}") from None
    return Listing(files, tuple(subfolders))


def _stat_entry(entry: os.DirEntry[str], real_root: str) -> FileStat | bool:
    """The entry's stat if it is a regular file, True for a subfolder, False if it vanished."""
    try:
        if entry.is_symlink() and not inside(os.path.realpath(entry.path), real_root):
            raise Reject(
                Reason.SYMLINK_ESCAPE,
                f"{entry.name} is a symlink that points outside the adapter directory",
            )
        st = os.stat(entry.path)
    except FileNotFoundError:
        if entry.is_symlink():
            raise Reject(Reason.NOT_REGULAR_FILE, f"{entry.name} is a dangling symlink") from None
        return False  # vanished while we looked: the next look sees the folder as it is then
    except OSError as err:
        raise Reject(
            Reason.UNREADABLE,
            f"cannot stat {entry.name}: {err.strerror} (a symlink loop, or permissions)",
        ) from None
    if stat.S_ISDIR(st.st_mode):
        if entry.name == CONFIG_FILE:
            raise Reject(Reason.NOT_REGULAR_FILE, f"{CONFIG_FILE} is a directory, not a JSON file")
        return True  # vLLM never reads subfolders, and checks weights with os.path.isfile
    if not stat.S_ISREG(st.st_mode):
        raise Reject(
            Reason.NOT_REGULAR_FILE,
            f"{entry.name} is not a regular file (a FIFO, socket or device); refusing to read it",
        )
    return FileStat(entry.name, st.st_size, st.st_mtime_ns, st.st_ino)


def adapters_among(folder: str, subfolders: Iterable[str]) -> list[str]:
    """The subfolders that hold an adapter config: a folder with them is a directory of
    adapters (the drop directory, or an `org/` folder), not an adapter."""
    return [s for s in subfolders if os.path.isfile(os.path.join(folder, s, CONFIG_FILE))]


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[int]:
    """Open a file once for reading, never blocking on a FIFO, and yield the descriptor once
    `fstat` says it is a regular file. Read the file only through this descriptor: opening the
    path again could open whatever was swapped in meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise Reject(
            Reason.UNREADABLE,
            f"cannot open {path.name}: {err.strerror}; the files must be readable by the "
            "lorawarm and vLLM users",
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Reject(Reason.NOT_REGULAR_FILE, f"{path.name} is not a regular file")
        yield fd
    finally:
        os.close(fd)


def read_exactly(fd: int, size: int) -> bytes:
    """Up to `size` bytes from `fd`; fewer only when the file ends first."""
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
