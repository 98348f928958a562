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
import functools
import json
import os
import re
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
_DIGEST = re.compile(r"[0-9a-f]{32}")  # lorawarm.snapshot.DIGEST_CHARS hex characters

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

    def recall(self, folder: Path, name: str) -> tuple[Valid, str] | None:
        """The verdict remembered for `folder` exactly as it is now, with the digest of its
        snapshot (the files' content, which has not changed either), or None."""
        try:
            with open(f"{self.root}/{quote(name, safe='')}", "rb") as f:
                doc = json.loads(f.read())
            if doc["context"] != self.context:
                return None
            key = stat_key(folder, name)
            if key is None or doc["stat"] != key:
                return None
            valid = from_json(Valid, doc["verdict"])
            digest = doc["digest"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        if not isinstance(valid, Valid) or valid.name != name or valid.path != folder:
            return None
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            return None
        return valid, digest

    def remember(
        self, valid: Valid, digest: str, key: StatKey | None, *, inspected_ns: int
    ) -> None:
        """Record `valid` and its snapshot's `digest`, reached from a folder whose stat was
        `key` before it was inspected at `inspected_ns` (wall clock); nothing when the folder
        changed since or may have changed unseen. Best effort: a full or read-only state dir
        only costs inspections."""
        if key is None or _newest_ctime(key) >= inspected_ns - STABLE_NS:
            return
        if stat_key(valid.path, valid.name) != key:
            return
        doc = {"context": self.context, "stat": key, "verdict": to_json(valid), "digest": digest}
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


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A dataclass's resolved annotations and its init fields (resolving them is slow: a
    restart decodes 10,000 verdicts)."""
    hints = typing.get_type_hints(cls)
    return hints, frozenset(f.name for f in dataclasses.fields(cls) if f.init)


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
            elif isinstance(arg, type) and issubclass(arg, tuple) and hasattr(arg, "_fields"):
                out[f"{f.name}:{arg.__name__}"] = repr(typing.get_type_hints(arg))
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
    return _decoder(tp)(data)


Decoder = typing.Callable[[Any], Any]


@functools.cache
def _decoder(tp: Any) -> Decoder:
    """A decoding function for `tp`, built once per type from its annotations (interpreting
    them for every verdict made recalling slower than inspecting)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return lambda data: data
    if origin in (typing.Union, types.UnionType):
        members = [_decoder(a) for a in args]

        def union(data: Any) -> Any:
            for member in members:
                with contextlib.suppress(TypeError, ValueError, KeyError, AttributeError):
                    return member(data)
            raise TypeError(f"no member of {tp} fits")

        return union
    if tp is type(None):

        def none(data: Any) -> None:
            if data is not None:
                raise TypeError("not None")

        return none
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        cls = tp
        hints, names = _fields(cls)
        fields = [(n, _decoder(hints[n])) for n in names]

        def instance(data: Any) -> Any:
            if not isinstance(data, dict):
                raise TypeError(f"{cls.__name__} is not an object")
            if data.keys() != names:
                raise KeyError(f"fields of {cls.__name__} differ")
            return cls(**{n: decode(data[n]) for n, decode in fields})

        return instance
    if isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields"):
        # A NamedTuple (encoded as a list, in field order): its fields' annotations lead.
        named = tp
        parts = [_decoder(a) for a in typing.get_type_hints(named).values()]

        def record(data: Any) -> Any:
            if len(_list(data)) != len(parts):
                raise ValueError(f"{named.__name__}: wrong length")
            return named(*(d(v) for d, v in zip(parts, data, strict=True)))

        return record
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder(args[0])
            return lambda data: tuple(item(v) for v in _list(data))
        items = [_decoder(a) for a in args]

        def fixed(data: Any) -> tuple[Any, ...]:
            if len(_list(data)) != len(items):
                raise ValueError("wrong length")
            return tuple(d(v) for d, v in zip(items, data, strict=True))

        return fixed
    if origin in (list, frozenset, set):
        item = _decoder(args[0] if args else Any)
        kind = origin
        return lambda data: kind(item(v) for v in _list(data))
    if origin is dict:
        key, value = (_decoder(a) for a in (args or (Any, Any)))
        return lambda data: {key(pair[0]): value(pair[1]) for pair in _list(data)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    if tp is Path:

        def path(data: Any) -> Path:
            if not isinstance(data, str):
                raise TypeError("not a path")
            return Path(data)

        return path
    if tp in (bool, int, float, str):
        scalar = tp

        def plain(data: Any) -> Any:
            if type(data) is not scalar and not (scalar is float and type(data) is int):
                raise TypeError(f"not a {scalar.__name__}")
            return data

        return plain
    raise TypeError(f"cannot recall a {tp!r}")


def _list(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise TypeError("not a list")
    return data
