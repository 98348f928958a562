"""The watcher: filesystem events to adapter-name hints, the pending-hint set (`Hints`), discovery
of adapter folders, and a real watchdog observer (inotify and polling) feeding the loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from watchdog.events import (
    DirCreatedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
)

from lorawarm.settle import fingerprint, fingerprint_of
from lorawarm.watcher import Hint, Hints, Watcher, _Handler, hint_for, is_org, resolve_hint, scan


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "drop"
    path.mkdir()
    return path


# --- hint_for ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "published", "hint"),
    [
        ("a", False, Hint(("a",))),
        ("a/adapter_config.json", False, Hint(("a", "adapter_config.json"))),
        ("a", True, Hint(("a",), published=True)),
        ("org/a", True, Hint(("org", "a"), published=True)),
        ("org/a", False, Hint(("org", "a"))),
        ("org/a/adapter_model.safetensors", False, Hint(("org", "a"))),
        # a rename deeper than root/org/name is a change inside an adapter, not a publish
        ("org/a/sub", True, Hint(("org", "a"))),
        # root/name/x and root/org/name look alike here; resolve_hint tells them apart
        ("a/sub", True, Hint(("a", "sub"), published=True)),
        ("", False, Hint(())),
        (".a.tmp", False, None),
        (".a.tmp", True, None),
        (".a.tmp/adapter_config.json", False, None),
    ],
)
def test_hint_for(root: Path, rel: str, published: bool, hint: Hint | None) -> None:
    """Paths map to their top two components; top-level dot-folders are ignored; a rename is a
    publish only at depth one or two (root/name, root/org/name); the root asks for a rescan."""
    path = str(root / rel) if rel else str(root)
    assert hint_for(root, path, published=published) == hint


@pytest.mark.parametrize("path", ["/elsewhere/a", "/", "{root}2/a", "{root}/../x"])
def test_hint_for_outside_root_is_none(root: Path, path: str) -> None:
    """An event outside the drop directory (even a sibling sharing its prefix) is no hint."""
    assert hint_for(root, path.format(root=root)) is None


# --- the event handler ------------------------------------------------------------------------


def handled(root: Path, event: FileSystemEvent) -> list[Hint]:
    hints: list[Hint] = []
    _Handler(root, hints.append).on_any_event(event)
    return hints


def test_handler_publish_by_rename(root: Path) -> None:
    """mv .a.tmp a gives one publish hint for a (the dot source is ignored)."""
    event = DirMovedEvent(str(root / ".a.tmp"), str(root / "a"))
    assert handled(root, event) == [Hint(("a",), published=True)]


def test_handler_rename_between_names_hints_both(root: Path) -> None:
    """mv a b: a is gone (hint a) and b is published (hint b)."""
    event = DirMovedEvent(str(root / "a"), str(root / "b"))
    assert handled(root, event) == [Hint(("a",)), Hint(("b",), published=True)]


def test_handler_file_rename_is_not_a_publish(root: Path) -> None:
    """A file renamed inside an adapter (an editor's save) is a change, not a publish."""
    event = FileMovedEvent(str(root / "a" / ".cfg.swp"), str(root / "a" / "adapter_config.json"))
    assert handled(root, event) == [Hint(("a", ".cfg.swp")), Hint(("a", "adapter_config.json"))]


def test_handler_rename_out_of_the_drop_dir(root: Path, tmp_path: Path) -> None:
    """mv root/a elsewhere: only the source is hinted."""
    event = DirMovedEvent(str(root / "a"), str(tmp_path / "trash" / "a"))
    assert handled(root, event) == [Hint(("a",))]


@pytest.mark.parametrize(
    "event_of",
    [
        lambda root: FileOpenedEvent(str(root / "a" / "adapter_config.json")),
        lambda root: FileClosedNoWriteEvent(str(root / "a" / "adapter_config.json")),
        lambda root: DirModifiedEvent(str(root)),
    ],
    ids=["opened", "closed-no-write", "root-modified"],
)
def test_handler_ignores_noise(root: Path, event_of: object) -> None:
    """Reads (opened, closed without write) and the root's own "modified" give no hint."""
    assert callable(event_of)
    assert handled(root, event_of(root)) == []


def test_handler_created_and_modified(root: Path) -> None:
    """Creating or writing inside an adapter hints its name."""
    assert handled(root, DirCreatedEvent(str(root / "a"))) == [Hint(("a",))]
    assert handled(root, FileCreatedEvent(str(root / "a" / "w"))) == [Hint(("a", "w"))]
    assert handled(root, FileModifiedEvent(str(root / "org" / "b" / "w"))) == [Hint(("org", "b"))]


def test_handler_never_lets_an_exception_escape(root: Path) -> None:
    """An exception while delivering is logged, never raised into the observer thread."""

    def explode(hint: Hint) -> None:
        raise RuntimeError("boom")

    with capture_logs() as logs:
        _Handler(root, explode).on_any_event(FileCreatedEvent(str(root / "a")))
    assert [e["event"] for e in logs] == ["watch_event_failed"]
    assert logs[0]["log_level"] == "error"


def test_deliver_after_the_loop_closed_is_silent() -> None:
    """A late event while the daemon shuts down (loop closed) raises nothing into the
    observer thread; it only waits among the pending hints."""
    loop = asyncio.new_event_loop()
    loop.close()
    hints = Hints(loop)
    hints.put(Hint(("a",)))
    assert hints.pending() == 1


# --- Hints ------------------------------------------------------------------------------------


async def test_hints_deduplicate_one_folder_and_wake_the_loop_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1,000 puts for one folder are one pending entry and cost one hop to the loop."""
    loop = asyncio.get_running_loop()
    hops: list[object] = []
    real = loop.call_soon_threadsafe

    def counting(callback: Callable[..., object], *args: object) -> asyncio.Handle:
        hops.append(callback)
        return real(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    hints = Hints(loop)
    for _ in range(1000):
        hints.put(Hint(("a", "adapter_model.safetensors")))
    assert hints.pending() == 1
    assert len(hops) == 1
    assert await hints.get() == [Hint(("a", "adapter_model.safetensors"))]
    assert hints.pending() == 0
    hints.put(Hint(("a", "adapter_model.safetensors")))  # a new batch: one more hop
    assert len(hops) == 2


async def test_hints_keep_a_publish_seen_among_plain_hints() -> None:
    """A folder hinted plainly and as published is one entry that stays published."""
    hints = Hints(asyncio.get_running_loop())
    hints.put(Hint(("a",)))
    hints.put(Hint(("a",), published=True))
    hints.put(Hint(("a",)))
    assert await hints.get() == [Hint(("a",), published=True)]


async def test_hints_put_a_requested_rescan_first() -> None:
    """A hint for the drop directory itself comes back first, as Hint(()), once."""
    hints = Hints(asyncio.get_running_loop())
    hints.put(Hint(("a",)))
    hints.put(Hint(()))
    hints.put(Hint(()))
    assert hints.pending() == 2
    assert await hints.get() == [Hint(()), Hint(("a",))]


async def test_hints_past_the_limit_collapse_into_a_rescan_keeping_publishes() -> None:
    """Past `limit` distinct folders the batch becomes a full rescan that keeps only the
    published hints (at most `limit` of them)."""
    hints = Hints(asyncio.get_running_loop(), limit=3)
    hints.put(Hint(("a",), published=True))
    hints.put(Hint(("b",)))
    hints.put(Hint(("org", "c"), published=True))
    assert hints.pending() == 3
    hints.put(Hint(("d",)))
    assert hints.pending() == 3  # the rescan, a and org/c
    hints.put(Hint(("e",)))  # after the collapse the batch fills up again
    assert await hints.get() == [
        Hint(()),
        Hint(("a",), published=True),
        Hint(("org", "c"), published=True),
        Hint(("e",)),
    ]
    many = Hints(asyncio.get_running_loop(), limit=2)
    for name in "wxyz":
        many.put(Hint((name,), published=True))
    got = await many.get()
    assert got[0] == Hint(())
    assert all(h.published for h in got[1:])
    assert len(got) <= 3


async def test_hints_get_waits_for_a_put() -> None:
    """get() waits while nothing is pending."""
    hints = Hints(asyncio.get_running_loop())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(hints.get(), timeout=0.05)
    hints.put(Hint(("a",)))
    assert await asyncio.wait_for(hints.get(), timeout=1) == [Hint(("a",))]


async def test_hints_put_from_other_threads_arrive() -> None:
    """Puts from several threads at once all reach the loop, each folder once."""
    hints = Hints(asyncio.get_running_loop())

    def feed(prefix: str) -> None:
        for i in range(250):
            hints.put(Hint((f"{prefix}{i}",)))
            hints.put(Hint((f"{prefix}{i}",)))

    threads = [threading.Thread(target=feed, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    seen: set[Hint] = set()
    async with asyncio.timeout(5):
        while len(seen) < 1000:
            seen.update(await hints.get())
    for t in threads:
        t.join()
    assert seen == {Hint((f"{p}{i}",)) for p in "abcd" for i in range(250)}
    assert hints.pending() == 0


# --- discover and resolve_hint ----------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "plain").mkdir()
    (root / "plain" / "adapter_config.json").write_text("{}")
    (root / "empty").mkdir()  # a copy that just started: an adapter
    (root / "org" / "x").mkdir(parents=True)
    (root / "org" / "y").mkdir()
    (root / "org" / ".z.tmp").mkdir()  # staging inside an org
    (root / "mixed").mkdir()  # a file at its top: an adapter, even with a folder inside
    (root / "mixed" / "adapter_config.json").write_text("{}")
    (root / "mixed" / "checkpoint").mkdir()
    (root / "run" / "checkpoint-100").mkdir(parents=True)  # a trainer's output: one adapter
    (root / "run" / "checkpoint-200").mkdir()
    (root / "orgish" / "checkpoint-1").mkdir(parents=True)  # one non-checkpoint: an org
    (root / "orgish" / "final").mkdir()
    (root / ".hidden.tmp").mkdir()
    (root / ".hidden.tmp" / "adapter_config.json").write_text("{}")
    (root / "README.md").write_text("files at the top are not adapters")


TREE_NAMES = {
    "plain",
    "empty",
    "org/x",
    "org/y",
    "mixed",
    "run",
    "orgish/checkpoint-1",
    "orgish/final",
}


def test_scan_finds_names_and_org_names(root: Path) -> None:
    """Top-level folders are adapters, folders of only folders are orgs of adapters; dot
    entries and top-level files are ignored."""
    make_tree(root)
    assert set(scan(root)) == TREE_NAMES


def test_a_folder_of_only_checkpoints_is_one_adapter(root: Path) -> None:
    """A top-level folder holding only `checkpoint-N` folders is one adapter folder, not an
    org of `name/checkpoint-N` adapters; one other folder beside them makes it an org."""
    make_tree(root)
    found = scan(root)
    assert "run" in found
    assert not any(n.startswith("run/") for n in found)
    assert not is_org(root / "run")
    assert is_org(root / "orgish")
    assert resolve_hint(root, Hint(("run", "checkpoint-100"))) == ["run"]
    assert resolve_hint(root, Hint(("orgish", "final"))) == ["orgish/final"]


def test_scan_follows_a_top_level_symlink(root: Path, tmp_path: Path) -> None:
    """A symlinked top-level folder is found (inspection decides whether it may be used)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "adapter_config.json").write_text("{}")
    (root / "link").symlink_to(tmp_path / "real")
    assert scan(root) == {"link": None}


def test_scan_hands_over_the_listing_of_top_level_adapters(root: Path, tmp_path: Path) -> None:
    """The rescan fingerprints top-level adapters from scan's own listing: it gives the same
    fingerprint as a fresh look (dot entries included); org adapters and symlinks get none."""
    make_tree(root)
    (root / "plain" / ".editor-swap").write_text("x")
    (tmp_path / "real").mkdir()
    (root / "link").symlink_to(tmp_path / "real")
    found = scan(root)
    assert set(found) == {*TREE_NAMES, "link"}
    assert found["org/x"] is None
    assert found["link"] is None
    for name in ("plain", "empty", "mixed", "run"):
        listing = found[name]
        assert listing is not None
        assert fingerprint_of(listing) == fingerprint(root / name)
    assert ".editor-swap" in [e[0] for e in fingerprint_of(found["plain"] or [])]


def test_scan_of_missing_root_is_empty(tmp_path: Path) -> None:
    """A drop directory that vanished yields nothing instead of failing."""
    assert scan(tmp_path / "nope") == {}


def test_resolve_hint(root: Path) -> None:
    """A hint resolves to the adapter names it may concern."""
    make_tree(root)
    assert resolve_hint(root, Hint(())) is None
    assert resolve_hint(root, Hint(("plain",))) == ["plain"]
    assert resolve_hint(root, Hint(("org", "x"))) == ["org/x"]
    assert sorted(resolve_hint(root, Hint(("org",))) or []) == ["org/x", "org/y"]
    # a dot entry inside an org: every adapter of the org is looked at again
    assert sorted(resolve_hint(root, Hint(("org", ".z.tmp"))) or []) == ["org/x", "org/y"]
    # an event inside an adapter folder names that adapter first
    inside = resolve_hint(root, Hint(("plain", "adapter_config.json")))
    assert inside is not None
    assert inside[0] == "plain"


def test_resolve_hint_for_deleted_folders(root: Path) -> None:
    """A hint for a folder that is gone names both readings (name, and org/name), so the
    daemon can drop whichever it had."""
    assert resolve_hint(root, Hint(("gone",))) == ["gone"]
    assert resolve_hint(root, Hint(("gone", "x"))) == ["gone", "gone/x"]


def test_resolve_hint_for_an_org_that_lost_its_last_adapter(root: Path) -> None:
    """An org folder that became empty is read as a (new, empty) adapter and its former
    child is named too."""
    (root / "org").mkdir()
    assert resolve_hint(root, Hint(("org", "x"))) == ["org", "org/x"]


# --- a real observer --------------------------------------------------------------------------


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    """Fails when a test leaves a thread behind (watchdog's observer and emitters)."""
    before = threading.active_count()
    yield
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before, [t.name for t in threading.enumerate()]


def alive(watcher: Watcher) -> bool:
    return watcher.alive


async def wait_hint(hints: Hints, wanted: Hint, within: float = 5.0) -> list[Hint]:
    """Collect hints until `wanted` arrives; return all seen."""
    seen: list[Hint] = []
    async with asyncio.timeout(within):
        while wanted not in seen:
            seen.extend(await hints.get())
    return seen


@pytest.mark.usefixtures("no_leaked_threads")
@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
async def test_real_observer_delivers_hints(root: Path, polling: bool) -> None:
    """A real observer turns a copy into hints and a rename into a publish hint, on the loop's
    Hints; stop() joins every thread it started."""
    hints = Hints(asyncio.get_running_loop())
    watcher = Watcher(root, hints, polling=polling, poll_seconds=0.05)
    assert not alive(watcher)
    with watcher:
        assert alive(watcher)
        (root / "copied").mkdir()
        (root / "copied" / "adapter_config.json").write_text("{}")
        await wait_hint(hints, Hint(("copied",)))

        staging = root / ".pub.tmp"
        staging.mkdir()
        (staging / "adapter_config.json").write_text("{}")
        await asyncio.sleep(0.15)  # let the polling observer see the staging folder first
        os.rename(staging, root / "pub")
        seen = await wait_hint(hints, Hint(("pub",), published=True))
        assert all(not h.parts or not h.parts[0].startswith(".") for h in seen)

        (root / "org").mkdir()
        staging = root / "org" / ".b.tmp"
        staging.mkdir()
        await asyncio.sleep(0.15)
        os.rename(staging, root / "org" / "b")
        await wait_hint(hints, Hint(("org", "b"), published=True))
    assert not alive(watcher)


@pytest.mark.usefixtures("no_leaked_threads")
async def test_stop_is_idempotent_and_restartable(root: Path) -> None:
    """stop() twice is harmless, and a stopped watcher can be started again."""
    hints = Hints(asyncio.get_running_loop())
    watcher = Watcher(root, hints)
    watcher.stop()
    watcher.start()
    watcher.stop()
    watcher.stop()
    with watcher:
        (root / "again").mkdir()
        await wait_hint(hints, Hint(("again",)))


@pytest.mark.usefixtures("no_leaked_threads")
@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
async def test_start_that_fails_raises_and_leaves_nothing_running(
    tmp_path: Path, polling: bool
) -> None:
    """start() on a drop directory the observer cannot watch raises OSError and leaves no
    thread running; the watcher is not alive and can be stopped."""
    watcher = Watcher(tmp_path / "nope", Hints(asyncio.get_running_loop()), polling=polling)
    with pytest.raises(OSError, match="No such file or directory"):
        watcher.start()
    assert not alive(watcher)
    watcher.stop()


def inotify_watches() -> int:
    """Inotify watches this process holds, as the kernel lists them (/proc/self/fdinfo)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                count += sum(line.startswith("inotify wd:") for line in info)
        except OSError:
            continue
    return count


@pytest.mark.usefixtures("no_leaked_threads")
async def test_inotify_watches_only_the_two_levels_that_hold_adapters(root: Path) -> None:
    """Only the drop directory, its folders and theirs are watched: a tree 40 levels deep
    inside an adapter costs one watch, not 40, also when it appears while watching; a new org
    with an adapter in it is watched at once, and its adapter's files raise hints."""
    deep = root / "a" / "sub"
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (root / ".staging.tmp" / "x").mkdir(parents=True)  # dot-folders are not watched
    before = inotify_watches()
    hints = Hints(asyncio.get_running_loop())
    with Watcher(root, hints):
        assert inotify_watches() - before == 3  # root, a, a/sub
        later = root / "b" / "sub"
        for i in range(40):
            later = later / f"d{i}"
        later.mkdir(parents=True)
        await wait_hint(hints, Hint(("b",)))
        (root / "org" / "x").mkdir(parents=True)
        await wait_hint(hints, Hint(("org",)))
        async with asyncio.timeout(5):
            while inotify_watches() - before < 7:  # noqa: ASYNC110 - the kernel is polled; + b, b/sub, org, org/x
                await asyncio.sleep(0.01)
        (root / "org" / "x" / "adapter_config.json").write_text("{}")
        await wait_hint(hints, Hint(("org", "x")))
        await asyncio.sleep(0.1)
        assert inotify_watches() - before == 7
    assert inotify_watches() == before
