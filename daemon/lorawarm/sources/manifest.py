"""What lorawarm synced: one small JSON file per adapter under `<state>/sources/synced/`.

An entry says which source an adapter folder came from, the ETag and size of each object it was
made of, and the identity (device, inode) of the folder that was published. It is why a restart
downloads nothing unchanged, and why only folders lorawarm synced are ever removed: a folder
whose identity is not the recorded one was put there by someone else. One file per adapter,
replaced by rename, so the daemon and the vLLM plugin (another process) never write the same
file at once and a reader never sees half of one; both write under the name's lock
(`publish.name_lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorawarm.names import is_name


@dataclass(frozen=True)
class Entry:
    name: str
    source: str  # the source URL, as given (no credentials)
    objects: dict[str, dict[str, Any]]  # file name -> {"etag", "size"}
    folder: tuple[int, int]  # (st_dev, st_ino) of the published folder
    synced_at: float
    # The folder this one replaced: the entry is written before the rename that publishes, so
    # a process killed between the two still owns what is in place.
    previous: tuple[int, int] | None = None

    def owns(self, folder: tuple[int, int] | None) -> bool:
        """Whether the folder now in place (its identity) is one lorawarm published."""
        return folder is not None and folder in (self.folder, self.previous)

    def same_objects(self, objects: dict[str, dict[str, Any]]) -> bool:
        return self.objects == objects


class Manifest:
    """The per-adapter entries below `<state>/sources/synced/`."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(os.path.abspath(state_dir)) / "sources" / "synced"

    def _path(self, name: str) -> Path:
        if not is_name(name):
            raise ValueError(f"not an adapter name: {name!r}")
        return self.root / f"{name}.json"

    def get(self, name: str) -> Entry | None:
        """The entry of `name`, or None (also for an unreadable or foreign file)."""
        try:
            raw = json.loads(self._path(name).read_text(encoding="utf-8"))
            return Entry(
                name=str(raw["name"]),
                source=str(raw["source"]),
                objects={str(k): dict(v) for k, v in raw["objects"].items()},
                folder=(int(raw["folder"][0]), int(raw["folder"][1])),
                synced_at=float(raw["synced_at"]),
                previous=tuple(raw["previous"]) if raw.get("previous") else None,
            )
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    def put(self, entry: Entry) -> None:
        path = self._path(entry.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "name": entry.name,
            "source": entry.source,
            "objects": entry.objects,
            "folder": list(entry.folder),
            "synced_at": entry.synced_at,
            "previous": list(entry.previous) if entry.previous else None,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".entry-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def names(self) -> list[str]:
        """Every name with an entry."""
        found: list[str] = []
        with contextlib.suppress(OSError):
            for top in os.scandir(self.root):
                if top.name.startswith("."):
                    continue
                if top.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        found += [
                            f"{top.name}/{c.name[:-5]}"
                            for c in os.scandir(top.path)
                            if c.name.endswith(".json") and not c.name.startswith(".")
                        ]
                elif top.name.endswith(".json"):
                    found.append(top.name[:-5])
        return [n for n in found if is_name(n)]

    def entries(self) -> dict[str, Entry]:
        return {n: e for n in self.names() if (e := self.get(n)) is not None}


def folder_id(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a folder (not followed through a symlink), or None when absent."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
