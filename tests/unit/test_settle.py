"""Settle: when a folder in the drop directory is complete enough to inspect.

The Settler is pure bookkeeping on explicit timestamps (`now` monotonic, `wall` the wall clock of
the same instant), so these tests pass times in instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorawarm.inspection import MAX_ENTRIES, Invalid, Reason, Rules, inspect_adapter
from lorawarm.settle import Fingerprint, Settler, fingerprint, fingerprint_of, newest_mtime
from tests.unit.adapters import CONFIG, SAFETENSORS, write_adapter

SETTLE = 5.0
WALL = 1_800_000_000.0  # the wall clock at monotonic time NOW
NOW = 1000.0


def fp(*entries: tuple[str, int, float], inode: int = 1) -> Fingerprint:
    """A fingerprint of entries (name, size, mtime in wall seconds)."""
    return tuple(
        sorted(
            (name, size, int(mtime * 1e9), inode + i)
            for i, (name, size, mtime) in enumerate(entries)
        )
    )


FRESH = fp(("adapter_config.json", 10, WALL), ("adapter_model.safetensors", 100, WALL - 0.5))
GROWN = fp(("adapter_config.json", 10, WALL), ("adapter_model.safetensors", 200, WALL + 2))


def test_published_folder_is_ready_at_once() -> None:
    """A folder renamed into place is ready on the first observation, quiet or not."""
    settler = Settler(SETTLE)
    assert settler.observe("a", FRESH, now=NOW, wall=WALL, published=True)
    assert settler.due("a") is None


def test_in_place_copy_waits_for_the_quiet_period() -> None:
    """A freshly written folder is ready only once it has been unchanged for settle_seconds."""
    settler = Settler(SETTLE)
    assert not settler.observe("a", FRESH, now=NOW, wall=WALL)
    assert settler.due("a") == NOW + SETTLE
    assert not settler.observe("a", FRESH, now=NOW + SETTLE - 0.01, wall=WALL + SETTLE - 0.01)
    assert settler.observe("a", FRESH, now=NOW + SETTLE, wall=WALL + SETTLE)
    assert settler.due("a") is None


def test_fingerprint_change_restarts_the_clock() -> None:
    """Any change of the fingerprint while settling starts the quiet period again from now."""
    settler = Settler(SETTLE)
    assert not settler.observe("a", FRESH, now=NOW, wall=WALL)
    assert not settler.observe("a", GROWN, now=NOW + 3, wall=WALL + 3)
    assert settler.due("a") == NOW + 3 + SETTLE
    assert not settler.observe("a", GROWN, now=NOW + SETTLE + 1, wall=WALL + SETTLE + 1)
    assert settler.observe("a", GROWN, now=NOW + 3 + SETTLE, wall=WALL + 3 + SETTLE)


def test_old_folder_found_at_start_up_is_already_quiet() -> None:
    """A folder whose newest file is older than the settle period is ready on first sight."""
    settler = Settler(SETTLE)
    old = fp(("adapter_config.json", 10, WALL - 3600), ("w", 100, WALL - SETTLE))
    assert settler.observe("a", old, now=NOW, wall=WALL)


def test_partly_aged_folder_waits_only_for_the_rest() -> None:
    """A folder last changed 2 s ago (by the wall clock) is due settle_seconds - 2 from now."""
    settler = Settler(SETTLE)
    assert not settler.observe("a", fp(("w", 1, WALL - 2)), now=NOW, wall=WALL)
    assert settler.due("a") == NOW - 2 + SETTLE


def test_mtime_in_the_future_starts_the_clock_now() -> None:
    """Files dated in the future (clock skew, a copy keeping times) do not count as old."""
    settler = Settler(SETTLE)
    assert not settler.observe("a", fp(("w", 1, WALL + 600)), now=NOW, wall=WALL)
    assert settler.due("a") == NOW + SETTLE


def test_empty_folder_starts_the_clock_now() -> None:
    """An empty (or unreadable) folder has no age: it is watched from now."""
    settler = Settler(SETTLE)
    assert not settler.observe("a", (), now=NOW, wall=WALL)
    assert settler.due("a") == NOW + SETTLE


def test_change_after_start_up_is_not_taken_as_old() -> None:
    """Only the first sighting may be judged by file age; a later change always waits."""
    settler = Settler(SETTLE)
    assert not settler.observe("a", FRESH, now=NOW, wall=WALL)
    old_looking = fp(("w", 1, WALL - 3600))  # e.g. `cp -p` of an old file into the folder
    assert not settler.observe("a", old_looking, now=NOW + 1, wall=WALL + 1)
    assert settler.due("a") == NOW + 1 + SETTLE


def test_publish_while_settling_makes_it_ready() -> None:
    """A rename into place of a folder already being watched ends the wait."""
    settler = Settler(SETTLE)
    assert not settler.observe("a", FRESH, now=NOW, wall=WALL)
    assert settler.observe("a", FRESH, now=NOW + 0.1, wall=WALL + 0.1, published=True)
    assert settler.due("a") is None


def test_zero_settle_seconds_takes_everything_at_once() -> None:
    """With settle_seconds 0 every folder is ready when observed."""
    assert Settler(0).observe("a", FRESH, now=NOW, wall=WALL)


def test_due_is_none_for_untracked_names() -> None:
    """due() answers None for a name never observed or already settled."""
    settler = Settler(SETTLE)
    assert settler.due("nope") is None
    settler.observe("a", FRESH, now=NOW, wall=WALL, published=True)
    assert settler.due("a") is None


def test_names_are_tracked_independently() -> None:
    """Each name has its own clock."""
    settler = Settler(SETTLE)
    settler.observe("a", FRESH, now=NOW, wall=WALL)
    settler.observe("org/b", fp(("w", 1, WALL + 2)), now=NOW + 2, wall=WALL + 2)
    assert settler.due("a") == NOW + SETTLE
    assert settler.due("org/b") == NOW + 2 + SETTLE
    assert settler.observe("a", FRESH, now=NOW + SETTLE, wall=WALL + SETTLE)
    assert settler.due("a") is None
    assert settler.due("org/b") == NOW + 2 + SETTLE


def test_forget_drops_the_watch() -> None:
    """forget() stops tracking a name (folder deleted); forgetting twice is harmless."""
    settler = Settler(SETTLE)
    settler.observe("a", FRESH, now=NOW, wall=WALL)
    settler.forget("a")
    settler.forget("a")
    assert settler.due("a") is None
    # Seen again, it starts over, judged by its files' age as on a first sighting.
    assert not settler.observe("a", FRESH, now=NOW + 4, wall=WALL + 4)
    assert settler.due("a") == NOW + SETTLE


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_lists_top_level_entries_sorted(tmp_path: Path) -> None:
    """The fingerprint is (name, size, mtime_ns, inode) of each top-level entry, sorted."""
    folder = write_adapter(tmp_path / "a")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.bin").write_bytes(b"x" * 10)
    got = fingerprint(folder)
    assert got is not None
    assert [e[0] for e in got] == sorted([CONFIG, SAFETENSORS, "sub"])
    st = os.stat(folder / SAFETENSORS)
    assert (SAFETENSORS, st.st_size, st.st_mtime_ns, st.st_ino) in got


def test_fingerprint_changes_when_a_file_grows(tmp_path: Path) -> None:
    """Appending to the weights (a copy still running) changes the fingerprint."""
    folder = write_adapter(tmp_path / "a")
    before = fingerprint(folder)
    with (folder / SAFETENSORS).open("ab") as f:
        f.write(b"\0" * 16)
    assert fingerprint(folder) != before


def test_fingerprint_is_stable_without_changes(tmp_path: Path) -> None:
    """Two looks at an unchanged folder give the same fingerprint."""
    folder = write_adapter(tmp_path / "a")
    assert fingerprint(folder) == fingerprint(folder)


def test_fingerprint_of_missing_or_non_folder_is_none(tmp_path: Path) -> None:
    """A deleted folder, or a plain file where a folder was, has no fingerprint."""
    assert fingerprint(tmp_path / "gone") is None
    (tmp_path / "file").write_text("x")
    assert fingerprint(tmp_path / "file") is None


def test_fingerprint_of_empty_folder_is_empty(tmp_path: Path) -> None:
    """An empty folder (mkdir before the copy) has an empty fingerprint."""
    (tmp_path / "a").mkdir()
    assert fingerprint(tmp_path / "a") == ()


class _VanishingEntry:
    """A directory entry whose file is deleted before it can be stat'ed."""

    name = "vanished"

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        raise FileNotFoundError(2, "No such file or directory")


def test_fingerprint_skips_entries_that_vanish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry deleted between listing and stat is left out instead of failing."""
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "keep").write_text("k")
    real_scandir = os.scandir

    @contextlib.contextmanager
    def scandir(path: Path) -> Iterator[list[object]]:
        with real_scandir(path) as it:
            yield [*it, _VanishingEntry()]

    monkeypatch.setattr(os, "scandir", scandir)
    got = fingerprint(folder)
    assert got is not None
    assert [e[0] for e in got] == ["keep"]


def test_fingerprint_of_unreadable_folder_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that cannot be listed gives an empty fingerprint; inspection reports why."""

    def scandir(path: Path) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "scandir", scandir)
    assert fingerprint(tmp_path) == ()


def test_fingerprint_keeps_dangling_symlinks(tmp_path: Path) -> None:
    """A dangling symlink is an entry like any other (inspection refuses it later)."""
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "broken").symlink_to(folder / "nowhere")
    got = fingerprint(folder)
    assert got is not None
    assert [e[0] for e in got] == ["broken"]


def test_fingerprint_stops_at_the_entry_limit_of_inspection(tmp_path: Path) -> None:
    """A folder with a thousand entries is fingerprinted from one entry more than inspection
    accepts (inspection refuses it as `too_many_files`), from a fresh look or from a listing
    at hand, and its fingerprint changes once it is cut back under the limit."""
    folder = write_adapter(tmp_path / "a")
    for i in range(MAX_ENTRIES * 4):
        (folder / f"junk-{i:04}").touch()
    over = fingerprint(folder)
    assert over is not None
    assert len(over) == MAX_ENTRIES + 1
    with os.scandir(folder) as it:
        assert fingerprint_of(list(it)) == over
    inspected = inspect_adapter(folder, root=tmp_path, rules=Rules())
    assert isinstance(inspected, Invalid)
    assert inspected.reason == Reason.TOO_MANY_FILES
    for junk in sorted(folder.glob("junk-*"))[MAX_ENTRIES - 10 :]:
        junk.unlink()
    under = fingerprint(folder)
    assert under is not None
    assert len(under) == MAX_ENTRIES - 10 + 2
    assert under != over


def test_newest_mtime_is_in_wall_seconds() -> None:
    """newest_mtime() is the newest entry's mtime in seconds; 0 for an empty folder."""
    assert newest_mtime(fp(("a", 1, WALL - 10), ("b", 1, WALL))) == WALL
    assert newest_mtime(()) == 0
