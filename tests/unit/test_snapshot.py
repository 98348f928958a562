"""Snapshots: immutable, content-addressed copies that vLLM reads instead of the drop directory."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorawarm import snapshot as snapshot_module
from lorawarm.inspection import Rules, Valid, inspect_adapter
from lorawarm.snapshot import (
    DIGEST_CHARS,
    MARKER,
    STAGING,
    Snapshot,
    SnapshotError,
    SnapshotStore,
)
from tests.unit.adapters import BASE_MODEL, CONFIG, SAFETENSORS, write_adapter

RULES = Rules(max_lora_rank=16, base_model=BASE_MODEL)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    root.mkdir()
    return root


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "state")


def valid(root: Path, name: str = "x", **kwargs: object) -> Valid:
    folder = write_adapter(root / name, **kwargs)  # type: ignore[arg-type]  # keyword pass-through
    result = inspect_adapter(folder, root=root, rules=RULES)
    assert isinstance(result, Valid), result
    return result


def staging_entries(store: SnapshotStore) -> list[str]:
    staging = store.root / STAGING
    return sorted(os.listdir(staging)) if staging.is_dir() else []


def rewrite_keeping_stat(path: Path, data: bytes) -> None:
    """Rewrite a file in place with same-size bytes and its old mtime (rsync -t, a careless cp)."""
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_create_publishes_read_only_copy(root: Path, store: SnapshotStore, tmp_path: Path) -> None:
    """A snapshot is `<state>/snapshots/<name>/<digest>`, read-only, holding what vLLM reads."""
    adapter = valid(root)
    (adapter.path / "README.md").write_text("not copied")
    snap = store.create(adapter, RULES)
    assert snap.path == tmp_path / "state" / "snapshots" / "x" / snap.digest
    assert snap.path.is_absolute()
    assert (snap.name, len(snap.digest)) == ("x", DIGEST_CHARS)
    assert sorted(os.listdir(snap.path)) == [MARKER, CONFIG, SAFETENSORS]
    for name in (CONFIG, SAFETENSORS):
        copied = snap.path / name
        assert copied.read_bytes() == (adapter.path / name).read_bytes()
        assert stat.S_IMODE(copied.stat().st_mode) == 0o444
        assert not copied.is_symlink()
    assert stat.S_IMODE(snap.path.stat().st_mode) == 0o755
    assert staging_entries(store) == []
    again = inspect_adapter(snap.path, root=store.root, rules=RULES, name="x")
    assert isinstance(again, Valid)


def test_same_content_same_path(root: Path, store: SnapshotStore) -> None:
    """Creating a snapshot of unchanged content again returns the very same path."""
    adapter = valid(root)
    first = store.create(adapter, RULES)
    assert store.create(adapter, RULES) == first
    reinspected = inspect_adapter(adapter.path, root=root, rules=RULES)
    assert isinstance(reinspected, Valid)
    assert store.create(reinspected, RULES) == first


def test_changed_content_new_digest(root: Path, store: SnapshotStore) -> None:
    """A changed adapter gets a new digest and path; the old snapshot stays untouched."""
    first = store.create(valid(root, seed=0), RULES)
    second = store.create(valid(root, seed=1), RULES)
    assert second.digest != first.digest
    assert second.path.parent == first.path.parent
    assert first.path.is_dir()
    assert second.path.is_dir()


def test_digest_is_content_only(root: Path, store: SnapshotStore) -> None:
    """Two names with identical content share a digest but never a path."""
    a = store.create(valid(root, "a"), RULES)
    b = store.create(valid(root, "b"), RULES)
    assert a.digest == b.digest
    assert a.path != b.path


def test_org_name_nesting(root: Path, store: SnapshotStore) -> None:
    """An `org/name` adapter is snapshotted under `snapshots/org/name/<digest>`."""
    snap = store.create(valid(root, "acme/bot"), RULES)
    assert snap.path == store.root / "acme" / "bot" / snap.digest
    assert snap.name == "acme/bot"
    assert list(store.existing()) == [snap]


def test_symlinked_source_is_copied_as_a_file(root: Path, store: SnapshotStore) -> None:
    """A weights symlink inside the drop directory becomes a plain file in the snapshot."""
    shared = write_adapter(root / "shared")
    folder = write_adapter(root / "x", weights=None)
    (folder / SAFETENSORS).symlink_to(shared / SAFETENSORS)
    adapter = inspect_adapter(folder, root=root, rules=RULES)
    assert isinstance(adapter, Valid)
    snap = store.create(adapter, RULES)
    assert not (snap.path / SAFETENSORS).is_symlink()
    assert (snap.path / SAFETENSORS).read_bytes() == (shared / SAFETENSORS).read_bytes()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes() + b"\0"), id="appended"),
        pytest.param(lambda p: p.unlink(), id="deleted"),
        pytest.param(lambda p: os.utime(p, ns=(0, 0)), id="touched"),
        pytest.param(lambda p: os.replace(p.with_name("new"), p), id="replaced"),
    ],
)
def test_source_changed_after_inspection(
    root: Path, store: SnapshotStore, change: Callable[[Path], None]
) -> None:
    """A weights file changed after inspection is `source_changed`, and nothing is left over."""
    adapter = valid(root)
    weights = adapter.path / SAFETENSORS
    weights.with_name("new").write_bytes(weights.read_bytes())
    change(weights)
    with pytest.raises(SnapshotError) as caught:
        store.create(adapter, RULES)
    assert caught.value.reason == "source_changed"
    assert staging_entries(store) == []
    assert list(store.existing()) == []


def _during_copy(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run `action` right after the weights' bytes were copied, before the source is looked at
    again: the window a concurrent writer hits."""
    original = snapshot_module._copy_file

    def copy_then_act(src: int, dst: int, size: int, h: object, *, clone: bool) -> int:
        copied = original(src, dst, size, h, clone=clone)  # type: ignore[arg-type]
        if size > 4096:  # the weights, not the config
            action()
        return copied

    monkeypatch.setattr(snapshot_module, "_copy_file", copy_then_act)


def test_source_changed_during_copy(
    root: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file rewritten while it is copied is `source_changed`; staging is cleaned up."""
    adapter = valid(root)
    weights = adapter.path / SAFETENSORS
    _during_copy(monkeypatch, lambda: weights.write_bytes(weights.read_bytes()[:-4]))
    with pytest.raises(SnapshotError) as caught:
        store.create(adapter, RULES)
    assert caught.value.reason == "source_changed"
    assert staging_entries(store) == []


def test_same_stat_rewrite_during_copy_is_caught(
    root: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes rewritten during the copy with size and mtime kept are caught (ctime moved)."""
    adapter = valid(root)
    weights = adapter.path / SAFETENSORS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    _during_copy(monkeypatch, lambda: rewrite_keeping_stat(weights, bytes(data)))
    with pytest.raises(SnapshotError) as caught:
        store.create(adapter, RULES)
    assert caught.value.reason == "source_changed"
    assert staging_entries(store) == []
    assert list(store.existing()) == []


def test_copy_is_inspected_again(root: Path, store: SnapshotStore) -> None:
    """Content corrupted behind an unchanged stat is caught when the copy is inspected."""
    adapter = valid(root)
    weights = adapter.path / SAFETENSORS
    rewrite_keeping_stat(weights, b"\xff" * weights.stat().st_size)
    with pytest.raises(SnapshotError) as caught:
        store.create(adapter, RULES)
    assert caught.value.reason == "snapshot_invalid"
    assert "did not pass inspection" in caught.value.message
    assert staging_entries(store) == []
    assert list(store.existing()) == []


def test_stricter_rules_refuse_the_copy(root: Path, store: SnapshotStore) -> None:
    """The copy is checked with the rules passed to `create`, not those of the first look."""
    with pytest.raises(SnapshotError) as caught:
        store.create(valid(root), Rules(max_lora_rank=4))
    assert caught.value.reason == "snapshot_invalid"


def test_unwritable_state_dir(root: Path, tmp_path: Path) -> None:
    """A state dir that cannot hold snapshots (a file where a dir must be) is `snapshot_failed`."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "snapshots").write_text("not a directory")
    with pytest.raises(SnapshotError) as caught:
        SnapshotStore(state).create(valid(root), RULES)
    assert caught.value.reason == "snapshot_failed"
    assert "state dir" in caught.value.message
    assert isinstance(caught.value, OSError)


def test_unwritable_name_dir(root: Path, store: SnapshotStore) -> None:
    """A failure at publish time is `snapshot_failed` and leaves no staging copy behind."""
    store.root.mkdir(parents=True)
    (store.root / "x").write_text("in the way")
    with pytest.raises(SnapshotError) as caught:
        store.create(valid(root), RULES)
    assert caught.value.reason == "snapshot_failed"
    assert staging_entries(store) == []


def test_two_threads_create_the_same_snapshot(
    root: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers copying the same content at once both get the same complete snapshot."""
    adapter = valid(root)
    both_copied = threading.Barrier(2, timeout=10)
    original = snapshot_module._copy

    def copy_then_wait(
        folder: Path, files: tuple[snapshot_module.FileStat, ...], dest: Path
    ) -> str:
        digest = original(folder, files, dest)
        both_copied.wait()  # both have a full staging copy; now both race to rename
        return digest

    monkeypatch.setattr(snapshot_module, "_copy", copy_then_wait)
    results: list[Snapshot | BaseException] = []

    def worker() -> None:
        try:
            results.append(store.create(adapter, RULES))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            results.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == 2
    assert all(isinstance(r, Snapshot) for r in results), results
    assert results[0] == results[1]
    snap = results[0]
    assert isinstance(snap, Snapshot)
    assert sorted(os.listdir(snap.path)) == [MARKER, CONFIG, SAFETENSORS]
    assert (snap.path / SAFETENSORS).read_bytes() == (adapter.path / SAFETENSORS).read_bytes()
    assert staging_entries(store) == []
    assert list(store.existing()) == [snap]


def test_collect_removes_unreferenced(root: Path, store: SnapshotStore) -> None:
    """Collect removes snapshots not kept (and then-empty name folders), keeping the rest."""
    old = store.create(valid(root, "acme/bot", seed=0), RULES)
    new = store.create(valid(root, "acme/bot", seed=1), RULES)
    other = store.create(valid(root, "other"), RULES)
    gone = store.create(valid(root, "gone/bot"), RULES)
    removed = store.collect([new.path, str(other.path) + "/"])
    assert sorted(removed) == sorted([old.path, gone.path])
    assert not old.path.exists()
    assert not (store.root / "gone").exists()
    assert new.path.is_dir()
    assert other.path.is_dir()
    assert sorted(s.path for s in store.existing()) == sorted([new.path, other.path])
    assert store.collect([new.path, other.path]) == []


def test_collect_removes_only_stale_staging(root: Path, store: SnapshotStore) -> None:
    """Staging leftovers older than the age limit are removed; a copy in progress is not."""
    store.create(valid(root), RULES)
    staging = store.root / STAGING
    stale, fresh = staging / "snap-stale", staging / "snap-fresh"
    for d in (stale, fresh):
        d.mkdir()
        (d / CONFIG).write_text("{}")
    hours_ago = time.time() - 7200
    os.utime(stale, (hours_ago, hours_ago))
    removed = store.collect([p.path for p in store.existing()], staging_age=3600)
    assert removed == [stale]
    assert fresh.is_dir()


def test_hex_looking_org_name_is_not_a_snapshot(root: Path, store: SnapshotStore) -> None:
    """An `org/<32 hex chars>` adapter (a digest-looking name) is listed and kept correctly."""
    name = "runs/" + "ab" * (DIGEST_CHARS // 2)
    snap = store.create(valid(root, name), RULES)
    assert list(store.existing()) == [snap]
    assert snap.name == name
    assert store.collect([snap.path]) == []
    assert snap.path.is_dir()


def test_existing_without_state_dir(store: SnapshotStore) -> None:
    """A state dir that does not exist yet has no snapshots and nothing to collect."""
    assert list(store.existing()) == []
    assert store.collect([]) == []


def test_parse_and_owns(store: SnapshotStore, tmp_path: Path) -> None:
    """Only `<state>/snapshots/<name>[/<name>]/<digest>` paths are ours, normalized first."""
    digest = "0123456789abcdef" * 2
    assert store.path_for("x", digest) == store.root / "x" / digest
    ours = {
        f"{store.root}/x/{digest}": ("x", digest),
        f"{store.root}/acme/bot/{digest}/": ("acme/bot", digest),
        f"{store.root}/x/../y/{digest}": ("y", digest),
    }
    for path, expected in ours.items():
        assert store.parse(path) == expected
        assert store.owns(Path(path))
    not_ours = [
        f"{store.root}/x",
        f"{store.root}/x/{digest.upper()}",
        f"{store.root}/x/{digest[:-1]}",
        f"{store.root}/{STAGING}/{digest}",
        f"{store.root}/a/b/c/{digest}",
        f"{store.root}/../snapshots2/x/{digest}",
        f"{tmp_path}/elsewhere/x/{digest}",
        f"x/{digest}",
        "/",
    ]
    for path in not_ours:
        assert store.parse(path) is None, path
        assert not store.owns(path)


def test_store_root_is_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A relative state dir still yields absolute snapshot paths (vLLM needs absolute ones)."""
    monkeypatch.chdir(tmp_path)
    store = SnapshotStore(Path("state"))
    assert store.root == tmp_path / "state" / "snapshots"


def test_publish_onto_a_non_directory_fails_cleanly(root: Path, tmp_path: Path) -> None:
    """If something that is not a snapshot sits at the final path, create fails and cleans up."""
    adapter = valid(root)
    digest = SnapshotStore(tmp_path / "probe").create(adapter, RULES).digest
    store = SnapshotStore(tmp_path / "state")
    store.path_for("x", digest).parent.mkdir(parents=True)
    store.path_for("x", digest).write_text("in the way")
    with pytest.raises(SnapshotError) as caught:
        store.create(adapter, RULES)
    assert caught.value.reason == "snapshot_failed"
    assert staging_entries(store) == []


def test_stray_folders_are_not_snapshots(root: Path, store: SnapshotStore) -> None:
    """Folders that are not `<name>/<digest>` are neither listed nor collected."""
    snap = store.create(valid(root, "org/bot"), RULES)
    stray = store.root / "org" / "bot" / "notes"
    stray.mkdir()
    (store.root / "loose-file").write_text("")
    assert list(store.existing()) == [snap]
    assert store.collect([snap.path]) == []
    assert stray.is_dir()


def test_collect_removes_a_single_level_name(root: Path, store: SnapshotStore) -> None:
    """A one-level name whose last snapshot is collected loses its folder, not the root."""
    snap = store.create(valid(root, "solo"), RULES)
    assert store.collect([]) == [snap.path]
    assert not (store.root / "solo").exists()
    assert store.root.is_dir()


@pytest.mark.parametrize("lost", [[SAFETENSORS], [CONFIG], [SAFETENSORS, CONFIG]])
def test_a_half_removed_snapshot_is_rebuilt(
    root: Path, store: SnapshotStore, lost: list[str]
) -> None:
    """A snapshot folder that lost files (a removal killed half-way) is rebuilt, never reused."""
    adapter = valid(root)
    snap = store.create(adapter, RULES)
    for name in lost:
        (snap.path / name).unlink()
    again = store.create(adapter, RULES)
    assert again == snap
    assert sorted(os.listdir(snap.path)) == [MARKER, CONFIG, SAFETENSORS]
    assert (snap.path / SAFETENSORS).read_bytes() == (root / "x" / SAFETENSORS).read_bytes()
    assert staging_entries(store) == []


def test_collect_removes_through_staging(
    root: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Collection renames a snapshot away before deleting it (a kill never leaves a half-removed
    snapshot at its path), and the next collection clears what a killed one left in staging."""
    snap = store.create(valid(root), RULES)

    def killed(path: Path) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(snapshot_module, "_remove", killed)
    with pytest.raises(SystemExit):
        store.collect([])
    assert not snap.path.exists()
    assert [e.startswith(snapshot_module.TRASH) for e in staging_entries(store)] == [True]
    monkeypatch.undo()
    store.collect([])
    assert staging_entries(store) == []


def test_collect_removes_the_staging_folder_of_a_killed_copy(
    root: Path, store: SnapshotStore
) -> None:
    """A staging folder whose writer died (its lock is free) goes after a few seconds; one whose
    writer is alive (holding the lock) stays."""
    staging = store.root / STAGING
    dead, alive = staging / "snap-dead", staging / "snap-alive"
    past = time.time() - 60
    for d in (dead, alive):
        d.mkdir(parents=True)
        (d / CONFIG).write_text("{}")
        os.utime(d, (past, past))
    lock = snapshot_module._hold(alive)
    try:
        assert store.collect([]) == [dead]
    finally:
        os.close(lock)
    assert alive.is_dir()


# --- remembered digests ------------------------------------------------------------------------


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files count as written long ago (their ctime cannot be set back in a test)."""
    monkeypatch.setattr(snapshot_module, "STABLE_NS", -(10**18))


def inspected(root: Path, name: str = "x") -> Valid:
    """The folder as it is now (`valid` writes it first)."""
    result = inspect_adapter(root / name, root=root, rules=RULES, name=name)
    assert isinstance(result, Valid), result
    return result


def count_digests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every source file read (copied and hashed) for a snapshot."""
    calls: list[int] = []
    original = snapshot_module._copy_file

    def counting(src: int, dst: int, size: int, h: object, *, clone: bool) -> int:
        calls.append(size)
        return original(src, dst, size, h, clone=clone)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot_module, "_copy_file", counting)
    return calls


@pytest.mark.usefixtures("settled")
def test_unchanged_files_are_not_read_again(
    root: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart (a new store on the same state dir) finds the snapshot of unchanged, settled
    files without reading their weights again; the org/name form too."""
    first = [store.create(valid(root, name), RULES) for name in ("x", "org/y")]
    reads = count_digests(monkeypatch)
    again = SnapshotStore(store.root.parent)
    assert [again.create(inspected(root, name), RULES) for name in ("x", "org/y")] == first
    assert reads == []


def test_files_written_just_now_are_read_again(
    root: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the settled fixture the files' ctime is recent: nothing is remembered, because
    a write in the same clock tick as the read would not show in the stat."""
    snap = store.create(valid(root), RULES)
    reads = count_digests(monkeypatch)
    assert store.create(inspected(root), RULES) == snap
    assert len(reads) == 2  # the config and the weights, each read once


@pytest.mark.usefixtures("settled")
def test_rewrite_keeping_size_and_mtime_is_not_missed(root: Path, store: SnapshotStore) -> None:
    """New bytes written in place with the old size and mtime (rsync -t) change the ctime: the
    remembered digest is not used, and the new content gets its own snapshot."""
    old = store.create(valid(root), RULES)
    weights = root / "x" / SAFETENSORS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a weight byte: the header still describes the file
    time.sleep(0.01)  # past the filesystem's clock tick
    rewrite_keeping_stat(weights, bytes(data))
    new = store.create(inspected(root), RULES)
    assert new.digest != old.digest
    assert (new.path / SAFETENSORS).read_bytes() == bytes(data)


@pytest.mark.usefixtures("settled")
@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"digest": "../../etc", "files": {}}',
        b'{"digest": 3, "files": {"adapter_config.json": [1, 2, 3, 4]}}',
        b'{"digest": "0123456789abcdef0123456789abcdef", "files": {"adapter_config.json": []}}',
    ],
)
def test_a_broken_record_means_a_digest(
    root: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch, record: bytes
) -> None:
    """A torn, foreign or hostile record is ignored: the files are read and the right
    snapshot returned."""
    snap = store.create(valid(root), RULES)
    (store.root / snapshot_module.SOURCES / "x").write_bytes(record)
    reads = count_digests(monkeypatch)
    assert store.create(inspected(root), RULES) == snap
    assert len(reads) == 2  # the config and the weights, each read once


@pytest.mark.usefixtures("settled")
def test_collect_forgets_the_records_of_gone_names(root: Path, store: SnapshotStore) -> None:
    """Once a name has no snapshot left its record goes too, and so does a temporary record a
    killed writer left; the records of names still present stay."""
    keep = store.create(valid(root, "keep"), RULES)
    store.create(valid(root, "org/gone"), RULES)
    sources = store.root / snapshot_module.SOURCES
    orphan = sources / f"{snapshot_module._TMP_RECORD}999-keep"
    orphan.write_text("{}")
    past = time.time() - 60
    os.utime(orphan, (past, past))
    store.collect([keep.path])
    assert sorted(os.listdir(sources)) == ["keep"]
