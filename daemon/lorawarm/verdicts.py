"""Remembered verdicts: a restart does not inspect again a folder that has not changed.

A valid verdict is written to `<state>/verdicts/<quoted name>` with what it was reached from:
the stat of the folder, of its org folder, and of every entry in it (mode, size, mtime, ctime,
inode), the whole inspection `Rules` value, lorawarm's version and the shape of the `Valid`
dataclass. It is recalled only when all of these are equal now, so it can never be stale:

- any write to a file moves its ctime (users cannot set ctime), a rename or a new file changes
  the listing, a chmod moves the ctime too;
- a verdict is written only for entries whose ctime is over `STABLE_NS` older than the
  inspection (the kernel's clock is coarse: a write in the same tick would not show), and only
  when nothing in the folder is a symlink (a symlink's target can change behind an unchanged
  link);
- new rules, a new release, or a new field in `Valid` (another branch may add one) make every
  record unusable; serialization walks the dataclasses generically, so a field needs no code
  here.

Only valid verdicts are remembered (the common case at restart; an invalid folder is cheap to
refuse again). A record that cannot be read or decoded is ignored: the folder is inspected.
Standard library and `lorawarm.inspection` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import stat
import time
import types
import typing
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import lorawarm
from lorawarm.inspection import MAX_ENTRIES, Rules, Valid

VERDICTS = "verdicts"  # below the state dir
# Entries whose ctime is less than this older than the inspection are not trusted to show
# every write (see the module docstring).
STABLE_NS = 1_000_000_000
_TMP = "%tmp-"  # never the start of a quoted name

StatKey = list[list[Any]]


def stat_key(folder: Path, name: str) -> StatKey | None:
    """What a verdict on `folder` depends on, from `lstat`s only; None when it cannot be
    remembered (a symlink in the way, too many entries, anything unreadable)."""
    try:
        key: StatKey = []
        parts = name.split("/")
        if len(parts) == 2:
            org = os.lstat(folder.parent)
            if not stat.S_ISDIR(org.st_mode):
                return None
            key.append(["", org.st_dev, org.st_ino])
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode):
            return None
        key.append([".", st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns])
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        if len(entries) > MAX_ENTRIES:
            return None
        for e in entries:
            s = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(s.st_mode):
                return None
            key.append([e.name, s.st_ino, s.st_mode, s.st_size, s.st_mtime_ns, s.st_ctime_ns])
    except OSError:
        return None
    return key


def _newest_ctime(key: StatKey) -> int:
    return max((int(entry[-1]) for entry in key if len(entry) > 3), default=0)


class VerdictMemory:
    """Reads and writes remembered verdicts for one set of `rules`."""

    def __init__(self, state_dir: Path, rules: Rules) -> None:
        self.root = Path(os.path.abspath(state_dir)) / VERDICTS
        self.context = _context(rules)

    def _record(self, name: str) -> Path:
        return self.root / quote(name, safe="")

    def recall(self, folder: Path, name: str) -> Valid | None:
        """The verdict remembered for `folder` exactly as it is now, or None."""
        try:
            doc = json.loads(self._record(name).read_bytes())
            if doc["context"] != self.context:
                return None
            key = stat_key(folder, name)
            if key is None or doc["stat"] != key:
                return None
            valid = from_json(Valid, doc["verdict"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        if not isinstance(valid, Valid) or valid.name != name or valid.path != folder:
            return None
        return valid

    def remember(self, valid: Valid, key: StatKey | None, *, inspected_ns: int) -> None:
        """Record `valid`, reached from a folder whose stat was `key` before it was inspected
        at `inspected_ns` (wall clock); nothing when the folder changed since or may have
        changed unseen. Best effort: a full or read-only state dir only costs inspections."""
        if key is None or _newest_ctime(key) >= inspected_ns - STABLE_NS:
            return
        if stat_key(valid.path, valid.name) != key:
            return
        doc = {"context": self.context, "stat": key, "verdict": to_json(valid)}
        record = self._record(valid.name)
        tmp = record.with_name(f"{_TMP}{os.getpid()}-{record.name}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, separators=(",", ":")))
            tmp.replace(record)  # no fsync: a lost or torn record only costs an inspection
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def forget(self, name: str) -> None:
        """The folder is gone: its record goes too."""
        with contextlib.suppress(OSError):
            self._record(name).unlink()

    def prune(self, keep: set[str]) -> None:
        """Remove the records of names not in `keep`, and temporary ones left by a killed
        writer (after the start-up scan, which saw every folder)."""
        try:
            with os.scandir(self.root) as it:
                entries = [e.name for e in it]
        except OSError:
            return
        now = time.time()
        for entry in entries:
            path = self.root / entry
            with contextlib.suppress(OSError):
                if entry.startswith(_TMP):
                    gone = now - path.stat().st_mtime > 10
                else:
                    gone = unquote(entry) not in keep
                if gone:
                    path.unlink()


def _context(rules: Rules) -> str:
    """Everything besides the folder that a verdict depends on, as one comparable string."""
    return json.dumps(
        {
            "version": lorawarm.__version__,
            "rules": to_json(rules),
            "schema": _schema(Valid),
        },
        sort_keys=True,
        default=repr,
    )


def _schema(cls: type) -> Any:
    """The fields of a dataclass and of the dataclasses inside it, with their types."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out[f.name] = repr(tp)
        for arg in _flatten(tp):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg) and arg is not cls:
                out[f"{f.name}:{arg.__name__}"] = _schema(arg)
    return out


def _flatten(tp: Any) -> list[Any]:
    args = typing.get_args(tp)
    return [tp, *(a for arg in args for a in _flatten(arg))]


def to_json(value: Any) -> Any:
    """A JSON value for a verdict: dataclasses field by field (generically), paths and enums
    as strings, tuples and sets as lists, mappings as lists of pairs."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted((to_json(v) for v in value), key=repr)
    if isinstance(value, dict):
        return [[to_json(k), to_json(v)] for k, v in value.items()]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot remember a {type(value).__name__}")


def from_json(tp: Any, data: Any) -> Any:
    """The inverse of `to_json`, led by the type annotations; raises TypeError/ValueError/
    KeyError on anything that does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            with contextlib.suppress(TypeError, ValueError, KeyError, AttributeError):
                return from_json(arg, data)
        raise TypeError(f"no member of {tp} fits")
    if tp is type(None):
        if data is not None:
            raise TypeError("not None")
        return None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(data, dict):
            raise TypeError(f"{tp.__name__} is not an object")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if set(data) != set(names):
            raise KeyError(f"fields of {tp.__name__} differ")
        return tp(**{n: from_json(hints[n], data[n]) for n in names})
    if origin is tuple:
        if not isinstance(data, list):
            raise TypeError("not a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_json(args[0], v) for v in data)
        if len(args) != len(data):
            raise ValueError("wrong length")
        return tuple(from_json(a, v) for a, v in zip(args, data, strict=True))
    if origin in (list, frozenset, set):
        if not isinstance(data, list):
            raise TypeError("not a list")
        items = [from_json(args[0] if args else Any, v) for v in data]
        return items if origin is list else origin(items)
    if origin is dict:
        if not isinstance(data, list):
            raise TypeError("not a list of pairs")
        k, v = args or (Any, Any)
        return {from_json(k, pair[0]): from_json(v, pair[1]) for pair in data}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is Path:
        if not isinstance(data, str):
            raise TypeError("not a path")
        return Path(data)
    if tp in (bool, int, float, str):
        if type(data) is not tp and not (tp is float and type(data) is int):
            raise TypeError(f"not a {tp.__name__}")
        return data
    raise TypeError(f"cannot recall a {tp!r}")
