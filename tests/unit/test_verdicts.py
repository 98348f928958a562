"""Remembered verdicts: a restart skips inspecting unchanged folders, and a remembered verdict
is never stale (files, rules, release, the shape of `Valid`)."""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from pathlib import Path

import pytest

import lorawarm
from lorawarm import verdicts as verdicts_module
from lorawarm.inspection import Rules, Valid, inspect_adapter
from lorawarm.verdicts import VerdictMemory, from_json, stat_key, to_json
from tests.unit.adapters import BASE_MODEL, CONFIG, SAFETENSORS, write_adapter
from tests.unit.conftest import MakeDaemon

RULES = Rules(max_lora_rank=16, base_model=BASE_MODEL)
DIGEST = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files count as written long ago (their ctime cannot be set back in a test)."""
    monkeypatch.setattr(verdicts_module, "STABLE_NS", -(10**18))


def remembered(root: Path, state: Path, name: str = "x", rules: Rules = RULES) -> Valid:
    """Inspect `root/name` and remember the verdict, as the intake does."""
    folder = root / name
    key, at = stat_key(folder, name), time.time_ns()
    result = inspect_adapter(folder, root=root, rules=rules, name=name)
    assert isinstance(result, Valid), result
    VerdictMemory(state, rules).remember(result, DIGEST, key, inspected_ns=at)
    return result


@pytest.mark.usefixtures("settled")
@pytest.mark.parametrize("name", ["x", "org/y"])
def test_an_unchanged_folder_is_recalled_after_a_restart(
    cache: Path, state: Path, name: str
) -> None:
    """A new memory on the same state dir (a restart) gives back exactly the verdict that
    inspection reached."""
    write_adapter(cache / name)
    verdict = remembered(cache, state, name)
    assert VerdictMemory(state, RULES).recall(cache / name, name) == (verdict, DIGEST)


def test_files_written_just_now_are_not_remembered(cache: Path, state: Path) -> None:
    """Without the settled fixture the files' ctime is recent: a write in the same clock tick
    would not show in their stat, so nothing is remembered."""
    write_adapter(cache / "x")
    remembered(cache, state)
    assert VerdictMemory(state, RULES).recall(cache / "x", "x") is None


def rewrite_keeping_stat(path: Path) -> None:
    """New bytes with the old size and mtime (rsync -t, a careless cp): only ctime moves."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    time.sleep(0.01)  # past the filesystem's clock tick
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.usefixtures("settled")
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda f: rewrite_keeping_stat(f / CONFIG), id="config-rewritten-same-stat"),
        pytest.param(lambda f: rewrite_keeping_stat(f / SAFETENSORS), id="weights-rewritten"),
        pytest.param(lambda f: (f / SAFETENSORS).chmod(0o000), id="chmod"),
        pytest.param(lambda f: (f / "README.md").write_text("new"), id="file-added"),
        pytest.param(lambda f: (f / SAFETENSORS).rename(f / "moved"), id="weights-renamed"),
        pytest.param(lambda f: (f / "checkpoint-1").mkdir(), id="folder-added"),
    ],
)
def test_any_change_to_the_folder_forgets_the_verdict(
    cache: Path, state: Path, change: object
) -> None:
    """Whatever changes in the folder, even behind an unchanged size and mtime, the remembered
    verdict is not used: the folder is inspected again."""
    folder = write_adapter(cache / "x")
    remembered(cache, state)
    change(folder)  # type: ignore[operator]  # the parametrized lambda
    assert VerdictMemory(state, RULES).recall(folder, "x") is None


@pytest.mark.usefixtures("settled")
def test_other_rules_or_another_release_do_not_recall(
    cache: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verdict reached under other rules, or by another lorawarm release, is not used."""
    folder = write_adapter(cache / "x")
    remembered(cache, state)
    stricter = dataclasses.replace(RULES, max_lora_rank=4)
    assert VerdictMemory(state, stricter).recall(folder, "x") is None
    assert VerdictMemory(state, RULES).recall(folder, "x") is not None
    monkeypatch.setattr(lorawarm, "__version__", "99.0.0")
    assert VerdictMemory(state, RULES).recall(folder, "x") is None


@pytest.mark.usefixtures("settled")
def test_a_symlinked_file_is_never_remembered(cache: Path, state: Path) -> None:
    """A weights symlink can point at new bytes behind an unchanged link: no memory then."""
    shared = write_adapter(cache / "shared")
    folder = write_adapter(cache / "x", weights=None)
    (folder / SAFETENSORS).symlink_to(shared / SAFETENSORS)
    remembered(cache, state)
    assert VerdictMemory(state, RULES).recall(folder, "x") is None


@pytest.mark.usefixtures("settled")
@pytest.mark.parametrize(
    "record",
    [b"", b"{not json", b"[]", b'{"context": 1}', b"\xff\xfe", b'{"context": null, "stat": []}'],
)
def test_a_broken_record_means_an_inspection(cache: Path, state: Path, record: bytes) -> None:
    """A torn, foreign or hostile record is ignored (the folder is inspected), never raised."""
    folder = write_adapter(cache / "x")
    remembered(cache, state)
    (state / "verdicts" / "x").write_bytes(record)
    assert VerdictMemory(state, RULES).recall(folder, "x") is None


class Kind(enum.StrEnum):
    LINEAR = "linear"


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    kind: Kind
    shape: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Richer:
    """A verdict with the kind of field another branch adds (modules and their shapes)."""

    path: Path
    modules: tuple[Module, ...]
    by_name: dict[str, Module]
    targets: frozenset[str]
    note: str | None = None


def test_serialization_follows_the_dataclasses_generically() -> None:
    """A new field of any usual type in a verdict round-trips with no code for it."""
    m = Module("q_proj", Kind.LINEAR, (8, 256))
    value = Richer(Path("/a/b"), (m,), {"q": m}, frozenset({"q_proj", "v_proj"}))
    assert from_json(Richer, to_json(value)) == value
    with pytest.raises((TypeError, KeyError, ValueError)):
        from_json(Richer, {**to_json(value), "modules": [{"name": "q"}]})


@pytest.mark.usefixtures("settled")
async def test_a_restarted_daemon_serves_a_changed_folder_by_its_new_content(
    make_daemon: MakeDaemon, cache: Path
) -> None:
    """After a restart the daemon takes an unchanged folder from memory and a folder changed
    while it was down (same size and mtime) by its new content: a new snapshot."""
    old = time.time() - 3600
    for name in ("same", "changed"):
        folder = write_adapter(cache / name, seed=1)
        for f in folder.iterdir():
            os.utime(f, (old, old))
    first = make_daemon()
    await first.intake.rescan()
    before = {n: first.catalog.get(n).snapshot for n in ("same", "changed")}  # type: ignore[union-attr]
    rewrite_keeping_stat(cache / "changed" / SAFETENSORS)
    second = make_daemon()
    await second.intake.rescan()
    after = {n: second.catalog.get(n).snapshot for n in ("same", "changed")}  # type: ignore[union-attr]
    assert after["same"] == before["same"]
    assert after["changed"] is not None
    assert before["changed"] is not None
    assert after["changed"].digest != before["changed"].digest
    data = (cache / "changed" / SAFETENSORS).read_bytes()
    assert (after["changed"].path / SAFETENSORS).read_bytes() == data
