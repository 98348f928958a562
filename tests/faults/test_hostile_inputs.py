"""A hostile input corpus run end to end through BOTH the real `lorawarm run` process and the
vLLM plugin's resolver: every folder gets its specific reason, no request for it reaches vLLM,
nothing is unpickled, and the daemon's memory stays bounded.

`tests/unit/test_inspection.py` already tables 100+ broken folders for the inspection function;
this corpus is about what an attacker or a broken tool drops: hostile names, escapes, special
files, files that lie about their size or type, and files made to exhaust memory. A valid
control adapter goes through the same pipes, so that "nothing reached vLLM" is not vacuous.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import socket
import stat
import struct
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lorawarm.inspection import MAX_ENTRIES, Rules
from lorawarm.snapshot import SOURCES, STAGING, SnapshotStore
from lorawarm_vllm.resolver import LorawarmResolver
from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.support.fake_vllm_http import FakeVllmHttp
from tests.unit.adapters import (
    BASE_MODEL,
    BIN,
    CONFIG,
    PT,
    SAFETENSORS,
    peft_config,
    raw_safetensors,
    safetensors_bytes,
    split_safetensors,
    torch_zip_bytes,
    write_adapter,
)

SERVED = "tiny-llama-served"


def expected_state(hostile: Any) -> str:
    """Refused by inspection (invalid), or by the one server (incompatible: a sound adapter
    whose name is a model name that server serves)."""
    return "incompatible" if hostile.default_reason == "name_is_base_model" else "invalid"


RULES = Rules(base_model=BASE_MODEL, served_model_names=(SERVED,))
# With pickles allowed, `.bin`/`.pt` files are opened and their containers checked.
PICKLE_RULES = Rules(base_model=BASE_MODEL, served_model_names=(SERVED,), safetensors_only=False)
GIB = 1 << 30
MAX_RSS_KB = 300 * 1024
Build = Callable[[Path, "Outside"], None]


@dataclass(frozen=True)
class Outside:
    """Things outside the drop dir that hostile folders point at."""

    adapter: Path  # a valid adapter folder
    org: Path  # an org folder holding a valid adapter
    marker: Path  # created if anything ever unpickles one of the payloads


@dataclass(frozen=True)
class Hostile:
    """One hostile folder: its name in the drop dir (org/name allowed), how to build it at a
    staging path (then renamed into place), and the reason both the daemon and the plugin give
    when pickles are allowed (`safetensors_only` off)."""

    label: str
    name: str
    reason: str
    build: Build

    @property
    def pickled(self) -> bool:
        """Its weights file is a `.bin`/`.pt`: by default refused without being opened."""
        return self.label.startswith(("bin-", "pt-"))

    @property
    def default_reason(self) -> str:
        """The reason under the default settings."""
        return "pickle_not_allowed" if self.pickled else self.reason


# --- builders ------------------------------------------------------------------------------------


def valid(folder: Path, _: Outside) -> None:
    write_adapter(folder)


def config_text(text: str | bytes) -> Build:
    return lambda folder, _: write_adapter(folder, config_text=text)


def weights(data: bytes, file: str = SAFETENSORS) -> Build:
    return lambda folder, _: write_adapter(folder, weights=file, weights_bytes=data)


def sparse_config(size: int) -> Build:
    def build(folder: Path, _: Outside) -> None:
        write_adapter(folder)
        os.truncate(folder / CONFIG, size)  # sparse: a GiB of zeros that takes no disk

    return build


def sparse_weights(head: bytes, size: int, file: str = SAFETENSORS) -> Build:
    def build(folder: Path, _: Outside) -> None:
        write_adapter(folder, weights=file, weights_bytes=head)
        os.truncate(folder / file, size)

    return build


def symlinked_folder(folder: Path, outside: Outside) -> None:
    folder.symlink_to(outside.adapter, target_is_directory=True)


def symlinked_org(folder: Path, outside: Outside) -> None:
    folder.symlink_to(outside.org, target_is_directory=True)


def outside_file(file: str) -> Callable[[Outside], Path]:
    return lambda outside: outside.adapter / file


def fixed(target: str) -> Callable[[Outside], Path]:
    return lambda _: Path(target)  # relative targets resolve inside the folder


def link(file: str, target: Callable[[Outside], Path]) -> Build:
    def build(folder: Path, outside: Outside) -> None:
        write_adapter(folder)
        (folder / file).unlink()
        (folder / file).symlink_to(target(outside))

    return build


def symlink_loop(folder: Path, _: Outside) -> None:
    write_adapter(folder)
    (folder / CONFIG).unlink()
    (folder / CONFIG).symlink_to("loop-b")  # relative: the folder is renamed into place
    (folder / "loop-b").symlink_to(CONFIG)


def fifo(file: str) -> Build:
    def build(folder: Path, _: Outside) -> None:
        write_adapter(folder)
        (folder / file).unlink(missing_ok=True)
        os.mkfifo(folder / file)

    return build


def char_device(file: str, minor: int) -> Build:
    def build(folder: Path, _: Outside) -> None:
        write_adapter(folder, weights=SAFETENSORS if file == CONFIG else None)
        (folder / file).unlink(missing_ok=True)
        os.mknod(folder / file, stat.S_IFCHR | 0o666, os.makedev(1, minor))

    return build


def unix_socket(folder: Path, _: Outside) -> None:
    write_adapter(folder)
    cwd = os.getcwd()
    os.chdir(folder)  # a short relative path: AF_UNIX paths are limited to 108 bytes
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind("notes.sock")
    finally:
        os.chdir(cwd)


def config_dir(folder: Path, _: Outside) -> None:
    folder.mkdir()
    (folder / CONFIG).mkdir()
    (folder / SAFETENSORS).write_bytes(safetensors_bytes())


def too_many_files(folder: Path, _: Outside) -> None:
    write_adapter(folder)
    for i in range(MAX_ENTRIES + 10):
        (folder / f"junk-{i:04}.txt").touch()


class Payload:
    """Unpickling this runs `open(marker, "w")`: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def evil_pickle(protocol: int, file: str) -> Build:
    def build(folder: Path, outside: Outside) -> None:
        data = pickle.dumps(Payload(outside.marker), protocol=protocol)
        write_adapter(folder, weights=file, weights_bytes=data)

    return build


def evil_pickle_as_safetensors(folder: Path, outside: Outside) -> None:
    data = pickle.dumps(Payload(outside.marker), protocol=4)
    write_adapter(folder, weights_bytes=data)


HUGE_INT_CONFIG = '{"peft_type": "LORA", "r": ' + "9" * 100_000 + "}"
# A header length of 60 MiB (under the 64 MiB cap: it is read) in a sparse file that holds it.
HEADER_60MIB = (struct.pack("<Q", 60 << 20), 8 + (60 << 20))


def nested_json(depth: int) -> str:
    return json.dumps(peft_config())[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"


def _st_header() -> tuple[dict[str, Any], bytes]:
    return split_safetensors(safetensors_bytes())


def st_length_beyond_file() -> bytes:
    header, data = _st_header()
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) + 1_000_000) + raw + data


def st_overlapping() -> bytes:
    header, data = _st_header()
    names = sorted(k for k in header if k != "__metadata__")
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    return raw_safetensors(header, data)


def st_data_beyond_file() -> bytes:
    header, data = _st_header()
    return raw_safetensors(header, data[: len(data) // 2])


def st_huge_shape() -> bytes:
    header, data = _st_header()
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1 << 40, 1 << 40]
    return raw_safetensors(header, data)


def st_negative_offset() -> bytes:
    header, data = _st_header()
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [-4096, header[name]["data_offsets"][1]]
    return raw_safetensors(header, data)


def st_deep_header() -> bytes:
    return raw_safetensors(b"[" * 200_000 + b"]" * 200_000)


# --- the corpus ----------------------------------------------------------------------------------

NAMES = [  # (label, folder name, reason): valid content, hostile name
    ("newline", "new\nline", "invalid_name"),
    ("carriage-return", "carriage\rreturn", "invalid_name"),
    ("tab", "tab\there", "invalid_name"),
    ("control-char", "ctrl\x01char", "invalid_name"),
    ("escape-sequence", "ansi\x1b[31mred", "invalid_name"),
    ("nul-symbol", "\u2400null", "invalid_name"),
    ("percent-nul", "nul%00byte", "invalid_name"),
    ("percent-traversal", "%2e%2e%2f", "invalid_name"),
    ("percent-traversal-2", "x%2f..%2f..%2fetc%2fpasswd", "invalid_name"),
    ("backslash-traversal", "x\\..\\..\\windows", "invalid_name"),
    ("cyrillic-lookalike", "\u0455upport-bot", "invalid_name"),
    ("fullwidth-lookalike", "\uff41dapter", "invalid_name"),
    ("division-slash", "org\u2215name", "invalid_name"),
    ("fullwidth-dots", "\uff0e\uff0e\uff0fetc", "invalid_name"),
    ("zero-width-space", "zero\u200bwidth", "invalid_name"),
    ("right-to-left-override", "rtl\u202eedoc.exe", "invalid_name"),
    ("space", "has space", "invalid_name"),
    ("not-utf8", os.fsdecode(b"bad-\xff\xfe-utf8"), "invalid_name"),
    ("org-with-newline", "evil-org/new\nline", "invalid_name"),
    ("long-255", "x" * 255, "name_too_long"),
    ("long-component", "a" * 97, "name_too_long"),
    ("long-org-name", "o" * 90 + "/" + "n" * 90, "name_too_long"),
    ("served-model-name", SERVED, "name_is_base_model"),
]

CONTENT = [  # (label, reason, build): an ordinary name, hostile content
    ("symlinked-folder-out", "symlink_escape", symlinked_folder),
    ("symlinked-org-out", "symlink_escape", symlinked_org),
    ("config-symlink-out", "symlink_escape", link(CONFIG, outside_file(CONFIG))),
    ("config-symlink-etc-passwd", "symlink_escape", link(CONFIG, fixed("/etc/passwd"))),
    ("weights-symlink-out", "symlink_escape", link(SAFETENSORS, outside_file(SAFETENSORS))),
    ("weights-symlink-proc-mem", "symlink_escape", link(SAFETENSORS, fixed("/proc/self/mem"))),
    ("weights-symlink-dangling", "not_regular_file", link(SAFETENSORS, fixed("nowhere"))),
    ("config-symlink-loop", "unreadable", symlink_loop),
    ("weights-fifo", "not_regular_file", fifo(SAFETENSORS)),
    ("config-fifo", "not_regular_file", fifo(CONFIG)),
    ("extra-fifo", "not_regular_file", fifo("README.md")),
    ("weights-dev-null", "not_regular_file", char_device(SAFETENSORS, 3)),
    ("config-dev-zero", "not_regular_file", char_device(CONFIG, 5)),
    ("extra-socket", "not_regular_file", unix_socket),
    ("config-is-a-directory", "not_regular_file", config_dir),
    ("too-many-files", "too_many_files", too_many_files),
    ("config-1gib-sparse", "config_too_large", sparse_config(GIB)),
    ("config-nested-array", "config_not_json", config_text("[" * 100_000 + "]" * 100_000)),
    ("config-nested-object", "config_not_json", config_text('{"a":' * 50_000 + "1" + "}" * 50_000)),
    ("config-nested-inside", "config_not_json", config_text(nested_json(10_000))),
    ("config-huge-int", "config_not_json", config_text(HUGE_INT_CONFIG)),
    ("config-not-utf8", "config_not_json", config_text(b'{"peft_type": "\xff\xfe LORA"}')),
    ("config-nan-rank", "bad_field", config_text(json.dumps(peft_config(r=float("nan"))))),
    ("st-length-beyond-file", "weights_truncated", weights(st_length_beyond_file())),
    ("st-header-2-pow-64", "weights_header_invalid", weights(struct.pack("<Q", 2**64 - 1) + b"{}")),
    ("st-header-60mib-sparse", "weights_header_invalid", sparse_weights(*HEADER_60MIB)),
    ("st-header-nested", "weights_header_invalid", weights(st_deep_header())),
    ("st-overlapping-offsets", "weights_header_invalid", weights(st_overlapping())),
    ("st-data-beyond-file", "weights_truncated", weights(st_data_beyond_file())),
    ("st-huge-shape", "weights_header_invalid", weights(st_huge_shape())),
    ("st-negative-offset", "weights_header_invalid", weights(st_negative_offset())),
    ("st-is-a-pickle", "weights_header_invalid", evil_pickle_as_safetensors),
    ("st-9gib-sparse", "too_large", sparse_weights(struct.pack("<Q", 2), 9 * GIB)),
    ("bin-pickle-protocol-0", "weights_unrecognized", evil_pickle(0, BIN)),
    ("bin-pickle-protocol-2", "weights_unrecognized", evil_pickle(2, BIN)),
    ("pt-pickle-protocol-4", "weights_unrecognized", evil_pickle(4, PT)),
    ("pt-pickle-protocol-5", "weights_unrecognized", evil_pickle(5, PT)),
    ("bin-zip-not-torch", "weights_unrecognized", weights(torch_zip_bytes(with_pickle=False), BIN)),
    ("bin-zip-truncated", "weights_truncated", weights(torch_zip_bytes()[:200], BIN)),
    ("bin-zip-1gib-sparse", "weights_truncated", sparse_weights(b"PK\x03\x04", GIB, BIN)),
    ("pt-is-safetensors", "weights_unrecognized", weights(safetensors_bytes(), PT)),
    ("bin-text", "weights_unrecognized", weights(b"this is not a model\n", BIN)),
    ("bin-empty", "weights_empty", weights(b"", BIN)),
]  # fmt: skip

CORPUS = [Hostile(label, name, reason, valid) for label, name, reason in NAMES] + [
    Hostile(label, label, reason, build) for label, reason, build in CONTENT
]

# Names a request can carry but no folder can have: for the plugin only.
REQUEST_NAMES = [
    ("../x", "invalid_name"),
    ("../../etc/passwd", "invalid_name"),
    ("/etc/passwd", "invalid_name"),
    ("/", "invalid_name"),
    ("a/../../b", "invalid_name"),
    ("org/../../etc", "invalid_name"),
    ("..", "invalid_name"),
    (".", "invalid_name"),
    ("", "invalid_name"),
    ("a//b", "invalid_name"),
    ("a/b/c", "invalid_name"),
    ("./control", "invalid_name"),
    (".hidden", "invalid_name"),
    ("nul\x00byte", "invalid_name"),
    ("control\x00", "invalid_name"),
    ("control\n", "invalid_name"),
    ("~root", "invalid_name"),
    ("file:///etc/passwd", "invalid_name"),
    ("http://evil.example/x", "invalid_name"),
    ("a" * 10_000, "name_too_long"),
    ("org/" + "../" * 60 + "etc", "name_too_long"),
    ("..%2f..%2fetc%2fpasswd", "invalid_name"),
    ("..\\..\\windows", "invalid_name"),
    ("symlinked-org-out/adapter", "symlink_escape"),
]


def api_name(name: str) -> str:
    """A folder name as the status API shows it (bytes that are not UTF-8 as `\\xff`)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def top(name: str) -> str:
    return name.split("/", 1)[0]


def shown(hostile: Hostile, reason: str) -> str:
    return f"{hostile.label:28} {reason:24} {ascii(hostile.name)[:60]}"


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Outside]:
    """(drop dir, state dir, outside); the first test that needs the corpus drops it there."""
    base = tmp_path_factory.mktemp("hostile")
    drop, state = base / "drop", base / "state"
    drop.mkdir()
    outside = Outside(
        adapter=write_adapter(base / "outside" / "adapter"),
        org=base / "outside-org",
        marker=base / "UNPICKLED",
    )
    write_adapter(outside.org / "adapter")
    return drop, state, outside


def drop_corpus(drop: Path, outside: Outside) -> None:
    """Drop every hostile folder, each built aside and renamed into place."""
    for i, hostile in enumerate(CORPUS):
        stage = drop / f".stage-{i}"
        if "/" in hostile.name and hostile.build is valid:
            write_adapter(stage / hostile.name.split("/", 1)[1])
        else:
            hostile.build(stage, outside)
        os.rename(os.fsencode(stage), os.fsencode(drop / top(hostile.name)))
    write_adapter(drop / ".stage-control")
    (drop / ".stage-control").rename(drop / "control")


def vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


# --- the daemon ----------------------------------------------------------------------------------


def snapshot_names(snapshots: Path) -> set[str]:
    """Names with a snapshot, or with a remembered digest: only the control may have either."""
    names = {p.name for p in snapshots.iterdir()} - {STAGING, SOURCES}
    sources = snapshots / SOURCES
    return names | (set(os.listdir(sources)) if sources.is_dir() else set())


def test_corpus_through_the_daemon(
    world: tuple[Path, Path, Outside], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every hostile folder dropped into the drop dir shows `invalid` with its specific reason,
    no request for any of them reaches vLLM, nothing is unpickled and the daemon's peak memory
    stays under 300 MB."""
    drop, state, outside = world
    with (
        FakeVllmHttp() as server,
        LorawarmProcess(
            drop,
            state,
            [server.url],
            env={"LORAWARM_BASE_MODEL": BASE_MODEL, "LORAWARM_SERVED_MODEL_NAMES": SERVED},
            log_path=state.parent / "lorawarm.log",
        ) as proc,
    ):
        assert proc.process is not None
        drop_corpus(drop, outside)
        proc.wait_state("control", "loaded", timeout=30)

        def states() -> dict[str, dict[str, Any]] | None:
            listed = proc.get("/v1/adapters")
            assert listed.status_code == 200, listed.text
            docs = {a["name"]: a for a in listed.json()["adapters"]}
            done = all(
                docs.get(api_name(h.name), {}).get("state") == expected_state(h) for h in CORPUS
            )
            return docs if done else None

        try:
            docs = wait_for(states, timeout=30, what="every hostile folder to be invalid")
        except AssertionError:
            docs = {a["name"]: a for a in proc.get("/v1/adapters").json()["adapters"]}
            pending = {
                h.name: docs.get(api_name(h.name), {}).get("state")
                for h in CORPUS
                if docs.get(api_name(h.name), {}).get("state") != expected_state(h)
            }
            raise AssertionError(f"not invalid: {pending}") from None
        wrong = {
            h.label: (docs[api_name(h.name)]["reason"], h.reason)
            for h in CORPUS
            if docs[api_name(h.name)]["reason"] != h.default_reason
        }
        assert wrong == {}, wrong
        assert set(docs) == {api_name(h.name) for h in CORPUS} | {"control"}
        for hostile in CORPUS:  # each also answers on its own route, by its (quoted) name
            one = proc.get("/v1/adapters/" + urllib.parse.quote(api_name(hostile.name), safe="/"))
            assert one.status_code == 200, (hostile.label, one.status_code, one.text[:200])
            assert one.json()["reason"] == hostile.default_reason, hostile.label
            assert one.json()["message"], hostile.label

        loads = [(r.route, r.name) for r in server.requests("load", "unload")]
        assert loads == [("load", "control")]
        # A folder named like a served model is sound: snapshotted, but never sent there.
        assert snapshot_names(state / "snapshots") == {"control", SERVED}
        assert not outside.marker.exists()
        peak = vm_kb(proc.process.pid, "VmHWM")
        assert peak < MAX_RSS_KB, f"daemon peak RSS {peak} kB"
        assert proc.get("/healthz").status_code == 200
    with capsys.disabled():
        mb = peak // 1024
        print(f"\nhostile corpus through the daemon: {len(CORPUS)} folders, peak RSS {mb} MB")
        for hostile in CORPUS:
            print("  " + shown(hostile, hostile.default_reason))


# --- the plugin ----------------------------------------------------------------------------------


class Reasons(logging.Handler):
    """Collects the reason of every "is not served" line the resolver logs."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "is not served" in record.msg:
            self.by_name[str(record.args[0])] = str(record.args[1])  # type: ignore[index]  # args is a tuple here


@pytest.mark.parametrize("pickles", [False, True], ids=["default", "pickles-allowed"])
def test_corpus_through_the_plugin(
    world: tuple[Path, Path, Outside],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pickles: bool,
) -> None:
    """`LorawarmResolver.resolve_lora` answers None for every hostile folder and every hostile
    request name, logging the same specific reason as the daemon, and unpickles nothing: by
    default `.bin`/`.pt` files are refused unopened, with pickles allowed each gets the reason
    its container check gives."""
    drop, _, outside = world
    if not (drop / "control").exists():
        drop_corpus(drop, outside)
    store = SnapshotStore(tmp_path / "plugin-state")
    store.root.mkdir(parents=True)
    logger = logging.getLogger("tests.faults.hostile.plugin")
    reasons = Reasons()
    logger.addHandler(reasons)
    logger.setLevel(logging.DEBUG)
    resolver = LorawarmResolver(drop, store, PICKLE_RULES if pickles else RULES, logger=logger)

    async def resolve_all(names: list[str]) -> list[object]:
        return [await resolver.resolve_lora(BASE_MODEL, n) for n in names]

    try:
        expected = [(h.name, h.reason if pickles else h.default_reason) for h in CORPUS]
        cases = expected + REQUEST_NAMES
        answers = asyncio.run(resolve_all([name for name, _ in cases]))
        assert resolver.resolve_snapshot(BASE_MODEL, "control") is not None
    finally:
        logger.removeHandler(reasons)
    assert answers == [None] * len(cases)
    got = {name: reasons.by_name.get(ascii(name)[:200]) for name, _ in cases}
    wrong = {ascii(n)[:40]: (got[n], r) for n, r in cases if got[n] != r}
    assert wrong == {}, wrong
    assert snapshot_names(store.root) == {"control"}
    assert not outside.marker.exists()
    with capsys.disabled():
        print(
            f"\nhostile corpus through the plugin: {len(CORPUS)} folders + "
            f"{len(REQUEST_NAMES)} request names = {len(cases)}"
        )
        for name, reason in REQUEST_NAMES:
            print(f"  {'request name':28} {reason:24} {ascii(name)[:60]}")
