"""Adapter names: which names are acceptable and where a name lives under a root.

An adapter's name is its folder's path relative to the drop directory: `name`, or `org/name`
(two levels, as vLLM accepts hub-style ids and its filesystem resolver joins them onto the cache
dir). The same rules run in the daemon and in the plugin, so a name the daemon refuses is never
resolved by the plugin either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

MAX_COMPONENT_LENGTH = 96
MAX_NAME_LENGTH = 160

# ASCII only on purpose: unicode look-alikes (a Latin alpha for "a", full-width slashes) are
# refused, so a name in a log line or a request is exactly the folder on disk.
_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class BadName(ValueError):
    """A name that cannot be an adapter name; `reason` is a stable code, `str()` is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def check_name(name: str, served_models: Iterable[str] = ()) -> str:
    """Return `name` if it is an acceptable adapter name, else raise `BadName`."""
    shown = ascii(name)[:80]
    if not name:
        raise BadName("invalid_name", "the adapter name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise BadName(
            "name_too_long",
            f"the adapter name is {len(name)} characters long; at most {MAX_NAME_LENGTH} allowed",
        )
    if name.startswith("/"):
        raise BadName(
            "invalid_name",
            f"adapter name {shown} is an absolute path; a name is a folder inside the adapter "
            "directory: 'name' or 'org/name'",
        )
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadName(
            "invalid_name",
            f"adapter name {shown} has an empty, '.' or '..' part; use 'name' or 'org/name'",
        )
    if len(parts) > 2:
        raise BadName(
            "invalid_name",
            f"adapter name {shown} has more than two levels; use 'name' or 'org/name'",
        )
    for part in parts:
        if len(part) > MAX_COMPONENT_LENGTH:
            raise BadName(
                "name_too_long",
                f"a part of adapter name {shown} is longer than {MAX_COMPONENT_LENGTH} characters",
            )
        if not _COMPONENT.fullmatch(part):
            raise BadName(
                "invalid_name",
                f"adapter name {shown} may use only letters, digits, '.', '_' and '-' "
                "and must not start with a dot",
            )
    if name in set(served_models):
        raise BadName(
            "name_is_base_model",
            f"adapter name {shown} is the name of a served base model; vLLM refuses it",
        )
    return name


def is_name(name: str) -> bool:
    """True when `name` passes the name rules (ignoring served model names)."""
    try:
        check_name(name)
    except BadName:
        return False
    return True


def folder_for(root: Path, name: str) -> Path | None:
    """The folder `name` maps to under `root`, or None when the name is not acceptable.

    Pure string work plus one `realpath`: hostile names (`../x`, absolute paths, `a/../../b`,
    percent-encoded separators are not decoded here and fail the character rules) never map
    outside `root`.
    """
    if not is_name(name):
        return None
    candidate = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        return None
    return candidate
