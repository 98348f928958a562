"""How snapshots are copied and made durable: reflinks where the filesystem has them (a real
loop-mounted XFS image with reflink=1), a byte copy elsewhere, the `.synced` marker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorawarm import snapshot as snapshot_module
from lorawarm.inspection import Rules, Valid, inspect_adapter
from lorawarm.snapshot import MARKER, SnapshotStore
from tests.unit.adapters import BASE_MODEL, SAFETENSORS, lora_tensors, write_adapter

RULES = Rules(max_lora_rank=16, base_model=BASE_MODEL)
BIG = 24 << 20  # bytes of weights: far above what XFS needs for a clone's metadata


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 300 MB XFS filesystem with reflinks, loop-mounted (needs root and xfsprogs, which
    `make test` installs)."""
    base = tmp_path_factory.mktemp("xfs")
    image, mount = base / "image", base / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(300 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def big_adapter(root: Path, name: str = "big") -> Valid:
    """A valid adapter of about `BIG` bytes of weights."""
    # float32 lora_A [8, h] and lora_B [h, 8]: 64 bytes per unit of h.
    tensors = lora_tensors(r=8, hidden=BIG // 64, layers=1, targets=("q_proj",), seed=3)
    write_adapter(root / name, tensors=tensors)
    result = inspect_adapter(root / name, root=root, rules=RULES)
    assert isinstance(result, Valid), result
    return result


def free_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def shares_extents(path: Path) -> bool:
    """True when some extent of `path` is shared with another file (`filefrag -v` says so)."""
    out = subprocess.run(
        ["filefrag", "-v", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return "shared" in out


def test_a_snapshot_on_a_reflink_filesystem_takes_no_space(xfs: Path) -> None:
    """On XFS with reflink=1 the snapshot's weights are a clone of the drop folder's: the
    filesystem's free space hardly moves, and the files share their extents."""
    drop, state = xfs / "drop", xfs / "state"
    drop.mkdir()
    adapter = big_adapter(drop)
    before = free_bytes(xfs)
    snap = SnapshotStore(state).create(adapter, RULES)
    used = before - free_bytes(xfs)
    assert used < BIG // 8, f"the snapshot used {used} bytes of {BIG}"
    assert shares_extents(snap.path / SAFETENSORS)
    assert (snap.path / SAFETENSORS).read_bytes() == (adapter.path / SAFETENSORS).read_bytes()
    assert (snap.path / MARKER).is_file()


def test_the_digest_does_not_depend_on_how_the_bytes_were_copied(xfs: Path, tmp_path: Path) -> None:
    """The same adapter gets the same digest cloned on XFS, copied on ext4, and copied from
    ext4 into XFS (no clone across filesystems): daemon and plugin agree wherever they run."""
    ext_drop = tmp_path / "drop"
    ext_drop.mkdir()
    on_ext = big_adapter(ext_drop, "same")
    xfs_drop = xfs / "drop2"
    xfs_drop.mkdir()
    on_xfs = big_adapter(xfs_drop, "same")
    copied = SnapshotStore(tmp_path / "state").create(on_ext, RULES)
    cloned = SnapshotStore(xfs / "state2").create(on_xfs, RULES)
    across = SnapshotStore(xfs / "state3").create(on_ext, RULES)
    assert copied.digest == cloned.digest == across.digest
    assert shares_extents(cloned.path / SAFETENSORS)
    assert not shares_extents(copied.path / SAFETENSORS)
    assert not shares_extents(across.path / SAFETENSORS)
    for snap in (copied, across):
        assert (snap.path / SAFETENSORS).read_bytes() == (on_ext.path / SAFETENSORS).read_bytes()


def small_adapter(root: Path, name: str = "x") -> Valid:
    write_adapter(root / name)
    result = inspect_adapter(root / name, root=root, rules=RULES)
    assert isinstance(result, Valid), result
    return result


def test_without_durability_the_marker_waits_for_sync(tmp_path: Path) -> None:
    """`durable=False` publishes the snapshot at once, unmarked; `sync` (one syncfs for the
    batch) marks every one of them."""
    drop = tmp_path / "drop"
    store = SnapshotStore(tmp_path / "state")
    snaps = [store.create(small_adapter(drop, n), RULES, durable=False) for n in ("a", "b")]
    assert all(s.path.is_dir() and not (s.path / MARKER).exists() for s in snaps)
    store.sync(snaps)
    assert all((s.path / MARKER).is_file() for s in snaps)


def create_and_die(drop: Path, state: Path) -> None:
    """Publish a snapshot of `drop/x` without syncing it, in a process that then exits at
    once: its writer is gone, nobody will write its marker."""
    code = (
        "import os, sys; from pathlib import Path; "
        "from lorawarm.inspection import inspect_adapter; "
        "from lorawarm.snapshot import SnapshotStore; "
        "from tests.unit.test_snapshot_copy import RULES; "
        "drop, state = Path(sys.argv[1]), Path(sys.argv[2]); "
        "v = inspect_adapter(drop / 'x', root=drop, rules=RULES); "
        "SnapshotStore(state).create(v, RULES, durable=False); os._exit(0)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code, str(drop), str(state)], check=True, env=env)


def test_an_unmarked_snapshot_is_verified_before_it_is_used(tmp_path: Path) -> None:
    """A snapshot whose writer died before syncing it is verified before it is used: reused
    (and marked) when its bytes match its digest, remade when they differ (a crash before
    they reached the disk), never handed out torn."""
    drop, state = tmp_path / "drop", tmp_path / "state"
    adapter = small_adapter(drop)
    create_and_die(drop, state)
    (published,) = SnapshotStore(state).existing()
    assert not (published.path / MARKER).exists()
    again = SnapshotStore(state).create(adapter, RULES)
    assert again.path == published.path
    assert (published.path / MARKER).is_file()

    (published.path / MARKER).unlink()
    weights = published.path / SAFETENSORS
    torn = bytearray(weights.read_bytes())
    torn[-8:] = b"\0" * 8
    weights.chmod(0o644)
    weights.write_bytes(bytes(torn))
    remade = SnapshotStore(state).create(adapter, RULES)
    assert remade.path == published.path
    assert (remade.path / SAFETENSORS).read_bytes() == (adapter.path / SAFETENSORS).read_bytes()
    assert (remade.path / MARKER).is_file()


def test_a_snapshot_being_synced_by_a_live_writer_is_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While its writer (the plugin, before its background sync) is alive, an unmarked
    snapshot is used as it is: a second process does not hash it again."""
    drop, state = tmp_path / "drop", tmp_path / "state"
    adapter = small_adapter(drop)
    writer = SnapshotStore(state)
    made = writer.create(adapter, RULES, durable=False)
    hashed: list[Path] = []
    real = snapshot_module._hash_folder
    monkeypatch.setattr(
        snapshot_module, "_hash_folder", lambda p, f: hashed.append(p) or real(p, f)
    )
    assert SnapshotStore(state).create(adapter, RULES, durable=False) == made
    assert hashed == []
    writer.sync([made])
    assert (made.path / MARKER).is_file()
