"""The vLLM resolver plugin: the resolver class on temp folders, and `register()` on vLLM's
real resolver registry."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lorawarm.snapshot as snapshot_module
import lorawarm_vllm
from lorawarm.fit import FitPolicy
from lorawarm.inspection import Reason, Rules
from lorawarm.server_facts import ServerFacts
from lorawarm.settings import EX_CONFIG
from lorawarm.snapshot import Snapshot, SnapshotStore
from lorawarm_vllm import LorawarmResolver, PluginConfigError, build_resolver, register
from tests.unit.adapters import BIN, CONFIG, SAFETENSORS, drop, torch_zip_bytes, write_adapter

MODEL = "/models/tiny-llama"  # what vLLM passes as base_model_name: its --model
RULES = Rules(max_lora_rank=16)
LOGGER = "lorawarm_vllm.resolver"


MakeResolver = Callable[..., LorawarmResolver]


@pytest.fixture
def make_resolver(cache: Path, state: Path) -> MakeResolver:
    def make(
        rules: Rules = RULES,
        state_dir: Path = state,
        *,
        policy: FitPolicy | None = None,
        facts: ServerFacts | None = None,
    ) -> LorawarmResolver:
        return LorawarmResolver(
            cache,
            SnapshotStore(state_dir),
            rules,
            policy=policy,
            facts=None if facts is None else (lambda: facts),
        )

    return make


@pytest.fixture
def resolver(make_resolver: MakeResolver) -> LorawarmResolver:
    return make_resolver()


def adapter(cache: Path, name: str = "a", **kwargs: Any) -> Path:
    """A valid adapter (unless `kwargs` break it) trained for MODEL, at `cache/name`."""
    kwargs.setdefault("base_model", MODEL)
    return write_adapter(cache / name, **kwargs)


def warnings_about(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and ascii(name) in r.getMessage()
    ]


def published(state: Path) -> list[Path]:
    return [s.path for s in SnapshotStore(state).existing()]


# ------------------------------------------------------------------------------ valid adapters


async def test_valid_adapter_resolves_to_its_snapshot(
    resolver: LorawarmResolver, cache: Path, state: Path
) -> None:
    """A valid adapter resolves to a LoRARequest naming an absolute snapshot path, not the
    drop folder, with the same bytes."""
    folder = adapter(cache)
    request = await resolver.resolve_lora(MODEL, "a")
    assert request is not None
    assert request.lora_name == "a"
    assert request.lora_int_id >= 1
    path = Path(request.lora_path)
    assert path.is_absolute()
    assert path.parent == (state / "snapshots" / "a").absolute()
    assert path in published(state)
    for file in (CONFIG, SAFETENSORS):
        assert (path / file).read_bytes() == (folder / file).read_bytes()


async def test_answer_is_a_vllm_lora_request(resolver: LorawarmResolver, cache: Path) -> None:
    """The answer is vLLM's own LoRARequest type, which vLLM re-numbers and loads."""
    from vllm.lora.request import LoRARequest

    adapter(cache)
    request = await resolver.resolve_lora(MODEL, "a")
    assert isinstance(request, LoRARequest)


async def test_org_name_resolves_to_nested_folder(
    resolver: LorawarmResolver, cache: Path, state: Path
) -> None:
    """A hub-style `org/name` maps to the nested folder and to a nested snapshot."""
    adapter(cache, "org/name")
    request = await resolver.resolve_lora(MODEL, "org/name")
    assert request is not None
    assert request.lora_name == "org/name"
    assert Path(request.lora_path).parent == (state / "snapshots" / "org" / "name").absolute()


async def test_org_folder_alone_is_not_an_adapter(resolver: LorawarmResolver, cache: Path) -> None:
    """Asking for the `org` level of a nested adapter resolves to nothing."""
    adapter(cache, "org/name")
    assert await resolver.resolve_lora(MODEL, "org") is None


async def test_same_adapter_resolves_to_same_snapshot(
    make_resolver: MakeResolver, cache: Path, state: Path
) -> None:
    """Resolving an unchanged adapter again, even from a fresh resolver, reuses its snapshot."""
    adapter(cache)
    first = await make_resolver().resolve_lora(MODEL, "a")
    again = await make_resolver().resolve_lora(MODEL, "a")
    assert first is not None
    assert again is not None
    assert again.lora_path == first.lora_path
    assert len(published(state)) == 1


async def test_rewritten_adapter_gets_a_new_snapshot(
    resolver: LorawarmResolver, cache: Path
) -> None:
    """A rewritten drop folder resolves to a new path; the old snapshot stays untouched."""
    adapter(cache, seed=1)
    old = await resolver.resolve_lora(MODEL, "a")
    assert old is not None
    old_bytes = (Path(old.lora_path) / SAFETENSORS).read_bytes()
    shutil.rmtree(cache / "a")
    adapter(cache, seed=2)
    new = await resolver.resolve_lora(MODEL, "a")
    assert new is not None
    assert new.lora_path != old.lora_path
    assert (Path(old.lora_path) / SAFETENSORS).read_bytes() == old_bytes


async def test_deleting_drop_folder_keeps_the_snapshot(
    resolver: LorawarmResolver, cache: Path
) -> None:
    """Once resolved, deleting the drop folder leaves vLLM's files in place (vllm#5105), and
    the name then resolves to nothing."""
    adapter(cache)
    request = await resolver.resolve_lora(MODEL, "a")
    assert request is not None
    shutil.rmtree(cache / "a")
    assert (Path(request.lora_path) / SAFETENSORS).is_file()
    assert await resolver.resolve_lora(MODEL, "a") is None


async def test_deleted_snapshot_is_made_again(
    resolver: LorawarmResolver, cache: Path, state: Path
) -> None:
    """A remembered snapshot that was collected in the meantime is published again."""
    adapter(cache)
    first = await resolver.resolve_lora(MODEL, "a")
    assert first is not None
    shutil.rmtree(first.lora_path)
    again = await resolver.resolve_lora(MODEL, "a")
    assert again is not None
    assert again.lora_path == first.lora_path
    assert (Path(again.lora_path) / CONFIG).is_file()


@pytest.mark.parametrize("fresh_resolver", [False, True], ids=["remembered", "found_on_disk"])
async def test_reused_snapshot_is_marked_fresh(
    make_resolver: MakeResolver, cache: Path, fresh_resolver: bool
) -> None:
    """Handing out an existing snapshot refreshes its times, so the daemon's collector (which
    spares recent snapshots) cannot remove it before vLLM lists it."""
    adapter(cache)
    resolver = make_resolver()
    first = await resolver.resolve_lora(MODEL, "a")
    assert first is not None
    os.utime(first.lora_path, (1, 1))
    again = await (make_resolver() if fresh_resolver else resolver).resolve_lora(MODEL, "a")
    assert again is not None
    assert again.lora_path == first.lora_path
    assert os.stat(first.lora_path).st_mtime > 1


async def test_unknown_name_resolves_to_nothing_quietly(
    resolver: LorawarmResolver, caplog: pytest.LogCaptureFixture
) -> None:
    """A name with no folder is not ours: None, and no warning (another resolver may know it)."""
    caplog.set_level(logging.DEBUG, LOGGER)
    assert await resolver.resolve_lora(MODEL, "nobody") is None
    assert warnings_about(caplog, "nobody") == []


# ------------------------------------------------------------------------------ invalid adapters


def without_config(cache: Path) -> Path:
    folder = adapter(cache)
    (folder / CONFIG).unlink()
    return folder


def broken(**kwargs: Any) -> Callable[[Path], Path]:
    return lambda cache: adapter(cache, **kwargs)


# Each case breaks a valid adapter in one way; the resolver must refuse it with that reason.
INVALID: dict[str, tuple[Reason, Callable[[Path], Path]]] = {
    "missing_config": (Reason.MISSING_CONFIG, without_config),
    "half_written_config": (Reason.CONFIG_NOT_JSON, broken(config_text='{"peft_type": "LO')),
    "not_lora": (Reason.WRONG_PEFT_TYPE, broken(config={"peft_type": "IA3"})),
    "no_rank": (Reason.MISSING_FIELD, broken(config={"r": drop()})),
    "rank_too_large": (Reason.RANK_TOO_LARGE, broken(r=32)),
    "bias": (Reason.BIAS_NOT_SUPPORTED, broken(config={"bias": "all"})),
    "dora": (Reason.DORA_NOT_SUPPORTED, broken(config={"use_dora": True})),
    "modules_to_save": (
        Reason.MODULES_TO_SAVE_NOT_SUPPORTED,
        broken(config={"modules_to_save": ["lm_head"]}),
    ),
    "no_weights": (Reason.MISSING_WEIGHTS, broken(weights=None)),
    "empty_weights": (Reason.WEIGHTS_EMPTY, broken(weights_bytes=b"")),
    "tensors_of_other_rank": (Reason.WEIGHTS_RANK_MISMATCH, broken(tensor_rank=4)),
    "not_lora_tensors": (
        Reason.WEIGHTS_NOT_LORA,
        broken(tensors={"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}),
    ),
    "pickled_weights": (
        Reason.PICKLE_NOT_ALLOWED,
        broken(weights=BIN, weights_bytes=torch_zip_bytes()),
    ),
}


async def test_adapter_above_the_size_limit_resolves_to_nothing(
    make_resolver: MakeResolver, cache: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The plugin applies `max_adapter_bytes` from its rules: a larger adapter is never copied
    or handed to vLLM, and the log line names the size and the limit."""
    folder = adapter(cache)
    size = sum(f.stat().st_size for f in folder.iterdir())
    small = make_resolver(Rules(max_lora_rank=16, max_adapter_bytes=size - 1))
    assert await small.resolve_lora(MODEL, "a") is None
    [line] = warnings_about(caplog, "a")
    assert "(too_large)" in line
    assert f"{size} bytes" in line
    assert f"{size - 1} bytes" in line
    assert published(state) == []
    exact = make_resolver(Rules(max_lora_rank=16, max_adapter_bytes=size))
    assert await exact.resolve_lora(MODEL, "a") is not None


async def test_pickled_weights_resolve_when_allowed(
    make_resolver: MakeResolver, cache: Path
) -> None:
    """With `safetensors_only` off, a torch `.bin` adapter resolves (its container checked)."""
    adapter(cache, weights=BIN, weights_bytes=torch_zip_bytes())
    allowed = make_resolver(Rules(max_lora_rank=16, safetensors_only=False))
    assert await allowed.resolve_lora(MODEL, "a") is not None


@pytest.mark.parametrize(("reason", "build"), INVALID.values(), ids=INVALID.keys())
async def test_invalid_adapter_resolves_to_nothing(
    resolver: LorawarmResolver,
    cache: Path,
    state: Path,
    caplog: pytest.LogCaptureFixture,
    reason: Reason,
    build: Callable[[Path], Path],
) -> None:
    """Every kind of invalid adapter resolves to None, logs its reason, and is never copied."""
    build(cache)
    assert await resolver.resolve_lora(MODEL, "a") is None
    assert any(f"({reason.value})" in m for m in warnings_about(caplog, "a"))
    assert published(state) == []


async def test_half_copied_weights_resolve_once_complete(
    resolver: LorawarmResolver, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Weights still being copied resolve to nothing; the same folder resolves once whole."""
    folder = adapter(cache)
    whole = (folder / SAFETENSORS).read_bytes()
    (folder / SAFETENSORS).write_bytes(whole[: len(whole) // 2])
    assert await resolver.resolve_lora(MODEL, "a") is None
    assert any("(weights_truncated)" in m for m in warnings_about(caplog, "a"))
    (folder / SAFETENSORS).write_bytes(whole)
    assert await resolver.resolve_lora(MODEL, "a") is not None


async def test_name_of_a_served_model_resolves_to_nothing(
    make_resolver: MakeResolver, cache: Path
) -> None:
    """An adapter folder named like a served base model is refused, as vLLM would refuse it."""
    adapter(cache, "tiny")
    resolver = make_resolver(Rules(served_model_names=("tiny",)))
    assert await resolver.resolve_lora(MODEL, "tiny") is None


async def test_symlinked_folder_leaving_the_drop_dir_resolves_to_nothing(
    resolver: LorawarmResolver, cache: Path, tmp_path: Path
) -> None:
    """A folder that is a symlink to a valid adapter outside the drop dir is refused."""
    outside = adapter(tmp_path, "outside")
    (cache / "a").symlink_to(outside, target_is_directory=True)
    assert await resolver.resolve_lora(MODEL, "a") is None


async def test_invalid_reason_is_logged_once(
    resolver: LorawarmResolver, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Repeated requests for the same broken adapter log its reason once, not per request."""
    adapter(cache, r=32)
    for _ in range(3):
        assert await resolver.resolve_lora(MODEL, "a") is None
    assert len(warnings_about(caplog, "a")) == 1


async def test_new_reason_is_logged_again(
    resolver: LorawarmResolver, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A different reason for the same name is logged, and so is the same reason again after
    the adapter was valid in between."""
    folder = adapter(cache, r=32)
    assert await resolver.resolve_lora(MODEL, "a") is None
    shutil.rmtree(folder)
    folder = adapter(cache, config={"bias": "all"})
    assert await resolver.resolve_lora(MODEL, "a") is None
    shutil.rmtree(folder)
    folder = adapter(cache)
    assert await resolver.resolve_lora(MODEL, "a") is not None
    shutil.rmtree(folder)
    adapter(cache, r=32)
    assert await resolver.resolve_lora(MODEL, "a") is None
    reasons = [m for m in warnings_about(caplog, "a") if "not served" in m]
    assert [m.split("(")[1].split(")")[0] for m in reasons] == [
        "rank_too_large",
        "bias_not_supported",
        "rank_too_large",
    ]


def test_log_once_memory_is_bounded(resolver: LorawarmResolver) -> None:
    """Names come from requests, so what "log once" remembers stays bounded."""
    for i in range(lorawarm_vllm.resolver.MAX_REMEMBERED + 50):
        resolver.resolve_snapshot(MODEL, f"../n{i}")
    assert len(resolver._reported) == lorawarm_vllm.resolver.MAX_REMEMBERED


# ------------------------------------------------------------------------------ hostile names

HOSTILE = [
    "../x",
    "../../etc",
    "/etc/passwd",
    "/tmp/x",
    "a/../../b",
    "a/../x",
    "%2e%2e",
    "%2e%2e/x",
    "..%2fx",
    "..",
    ".",
    "",
    ".x",
    "org/.x",
    "x/",
    "org//x",
    "a/b/c",
    "x\x00",
    "x\\..\\..\\y",
    "\u0430",  # Cyrillic a, looks like "a"
    "a" * 200,
]


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_name_resolves_to_nothing(
    resolver: LorawarmResolver, cache: Path, tmp_path: Path, state: Path, name: str
) -> None:
    """Traversal, absolute, encoded and odd names resolve to nothing, even where a naive join
    would land on a valid adapter."""
    adapter(cache)  # a valid "a", reachable by "a/../x"-style tricks
    adapter(cache, "x")
    adapter(tmp_path, "x")  # tmp_path/x: what "../x" joins to
    (tmp_path / "b").symlink_to(tmp_path / "x", target_is_directory=True)
    assert await resolver.resolve_lora(MODEL, name) is None
    assert published(state) == []


# ------------------------------------------------------------------------------ base models


async def test_base_model_name_decides_only_when_configured(
    make_resolver: MakeResolver, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no base model configured, an adapter naming another base model is served (adapters
    in the wild name quantized variants, training paths or nothing); with one configured, it
    is refused as base_model_mismatch while vLLM's --model is still accepted."""
    adapter(cache, "mine", base_model=MODEL)
    adapter(cache, "theirs", base_model="/models/other")
    adapter(cache, "nobody", config={"base_model_name_or_path": None})
    free = make_resolver()
    for name in ("mine", "theirs", "nobody"):
        assert await free.resolve_lora(MODEL, name) is not None
    enforced = make_resolver(policy=FitPolicy(base_model="org/tiny-llama"))
    assert await enforced.resolve_lora(MODEL, "mine") is not None
    assert await enforced.resolve_lora(MODEL, "theirs") is None
    assert any("(base_model_mismatch)" in m for m in warnings_about(caplog, "theirs"))


async def test_model_flag_matches_despite_trailing_slash(
    resolver: LorawarmResolver, cache: Path
) -> None:
    """`--model /models/tiny-llama/` and an adapter naming `/models/tiny-llama` match."""
    adapter(cache)
    assert await resolver.resolve_lora(MODEL + "/", "a") is not None


@pytest.mark.parametrize(
    "policy",
    [
        FitPolicy(base_model="meta/tiny", base_model_aliases=("tiny-llama-v1", "org/tiny")),
        FitPolicy(base_model="meta/tiny", served_model_names=("org/tiny",)),
        FitPolicy(base_model="org/tiny"),
    ],
    ids=["alias", "served_name", "configured_base_model"],
)
async def test_configured_names_are_accepted(
    make_resolver: MakeResolver, cache: Path, policy: FitPolicy
) -> None:
    """Where a base model is enforced, an adapter trained for an alias, a served name or the
    configured base model loads even though it does not name vLLM's --model (the exact match
    that 404s in vllm#18630)."""
    adapter(cache, base_model="org/tiny")
    assert await make_resolver(policy=policy).resolve_lora(MODEL, "a") is not None


async def test_model_flag_is_accepted_besides_configured_names(
    make_resolver: MakeResolver, cache: Path
) -> None:
    """Configured names widen what is accepted; vLLM's --model stays accepted."""
    adapter(cache)
    policy = FitPolicy(base_model="org/tiny", base_model_aliases=("other",))
    assert await make_resolver(policy=policy).resolve_lora(MODEL, "a") is not None


async def test_offline_hub_cache_path_accepts_the_hub_id(
    make_resolver: MakeResolver, cache: Path
) -> None:
    """With HF_HUB_OFFLINE vLLM passes the hub cache path of `org/name` as --model; an adapter
    naming `org/name` matches it where a base model is enforced."""
    resolver = make_resolver(policy=FitPolicy(base_model="acme/enforced"))
    adapter(cache, base_model="org/tiny-llama")
    cached = "/root/.cache/huggingface/hub/models--org--tiny-llama/snapshots/0123abc"
    assert await resolver.resolve_lora(cached, "a") is not None
    assert await resolver.resolve_lora("/root/elsewhere/tiny-llama", "a") is None


async def test_the_endpoints_facts_judge_what_the_resolver_serves(
    make_resolver: MakeResolver, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where lorawarm's endpoint learned this vLLM (same process), the resolver judges by its
    facts, as the daemon does: a rank above its --max-lora-rank or a served name is refused
    before vLLM is handed anything; without them, only what each call tells is known."""
    adapter(cache, "big", r=16)
    adapter(cache, "small", r=8)
    adapter(cache, "tiny")
    facts = ServerFacts(model=MODEL, served_model_names=("tiny",), max_lora_rank=8)
    learned = make_resolver(facts=facts)
    assert await learned.resolve_lora(MODEL, "small") is not None
    assert await learned.resolve_lora(MODEL, "big") is None
    assert await learned.resolve_lora(MODEL, "tiny") is None
    assert any("(rank_too_large)" in m for m in warnings_about(caplog, "big"))
    assert any("(name_is_base_model)" in m for m in warnings_about(caplog, "tiny"))
    assert learned.facts_for("ignored") is facts
    unknown = make_resolver()
    assert await unknown.resolve_lora(MODEL, "big") is not None
    cached = "/root/.cache/huggingface/hub/models--org--tiny-llama/snapshots/0123abc"
    assert unknown.facts_for(cached).model_names == {cached, "org/tiny-llama"}


async def test_another_base_model_is_served_with_a_warning_once(
    make_resolver: MakeResolver, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An adapter naming another base model is served (no base model enforced) and the
    warning base_model_differs is logged once, not per request."""
    adapter(cache, "theirs", base_model="unsloth/tiny-llama-bnb-4bit")
    resolver = make_resolver()
    for _ in range(3):
        assert await resolver.resolve_lora(MODEL, "theirs") is not None
    [warning] = warnings_about(caplog, "theirs")
    assert "(base_model_differs)" in warning


# ------------------------------------------------------------------------------ concurrency


async def test_concurrent_resolvers_share_one_snapshot(
    make_resolver: MakeResolver,
    cache: Path,
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two resolvers (plugin and daemon, or two API servers) copying the same adapter at the
    same moment both answer with the one published snapshot, and no staging copy is left."""
    adapter(cache)
    both_copied = threading.Barrier(2, timeout=20)
    real_copy = snapshot_module._copy

    def copy_then_wait(*args: Any) -> str:
        digest = real_copy(*args)
        both_copied.wait()  # neither publishes before the other has made its own copy
        return digest

    monkeypatch.setattr(snapshot_module, "_copy", copy_then_wait)
    first, second = await asyncio.gather(
        make_resolver().resolve_lora(MODEL, "a"), make_resolver().resolve_lora(MODEL, "a")
    )
    assert first is not None
    assert second is not None
    assert first.lora_path == second.lora_path
    assert published(state) == [Path(first.lora_path)]
    assert list((state / "snapshots" / ".staging").iterdir()) == []


async def test_many_concurrent_requests_agree(
    make_resolver: MakeResolver, cache: Path, state: Path
) -> None:
    """Many concurrent resolutions across resolvers give one path and one snapshot."""
    adapter(cache, "org/name")
    resolvers = [make_resolver() for _ in range(3)]
    answers = await asyncio.gather(*(r.resolve_lora(MODEL, "org/name") for r in resolvers * 3))
    assert {a.lora_path for a in answers if a is not None} == {str(published(state)[0])}
    assert all(a is not None for a in answers)


async def test_blocking_work_runs_off_the_event_loop(
    resolver: LorawarmResolver, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inspection and copying run in a worker thread, not on vLLM's event loop."""
    adapter(cache)
    threads: list[int] = []
    real = resolver.resolve_snapshot

    def record(base: str, name: str) -> Snapshot | None:
        threads.append(threading.get_ident())
        return real(base, name)

    monkeypatch.setattr(resolver, "resolve_snapshot", record)
    assert await resolver.resolve_lora(MODEL, "a") is not None
    assert threads
    assert threads != [threading.get_ident()]


# ------------------------------------------------------------------------------ never raises


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), KeyError("x"), PermissionError(13, "denied")]
)
async def test_unexpected_error_resolves_to_nothing(
    resolver: LorawarmResolver,
    cache: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    """An unexpected exception inside is logged with its traceback and answered with None,
    never raised into vLLM (where it would become a 500)."""
    adapter(cache)

    def explode(*args: Any) -> Snapshot:
        raise error

    monkeypatch.setattr(resolver.store, "create", explode)
    assert await resolver.resolve_lora(MODEL, "a") is None
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert failures[0].exc_info is not None


async def test_failing_inspection_resolves_to_nothing(
    resolver: LorawarmResolver, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even an exception escaping the inspection function is contained."""
    adapter(cache)

    def explode(*args: Any, **kwargs: Any) -> None:
        raise ValueError("bug")

    monkeypatch.setattr(lorawarm_vllm.resolver, "inspect_adapter", explode)
    assert await resolver.resolve_lora(MODEL, "a") is None


async def test_snapshot_error_resolves_to_nothing_and_is_logged_once(
    make_resolver: MakeResolver, cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state dir that cannot be written makes the adapter resolve to nothing, with the
    snapshot's reason logged once."""
    adapter(cache)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the state dir should be")
    resolver = make_resolver(state_dir=blocker)
    for _ in range(2):
        assert await resolver.resolve_lora(MODEL, "a") is None
    logged = warnings_about(caplog, "a")
    assert len(logged) == 1
    assert "(snapshot_failed)" in logged[0]


async def test_source_changed_while_copying_resolves_to_nothing(
    resolver: LorawarmResolver, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter rewritten between inspection and copy is not handed to vLLM."""
    adapter(cache)
    real_create = SnapshotStore.create

    def rewrite_then_create(store: SnapshotStore, valid: Any, rules: Rules) -> Snapshot:
        (cache / "a" / SAFETENSORS).write_bytes(
            (cache / "a" / SAFETENSORS).read_bytes()[::-1][:100]
        )
        return real_create(store, valid, rules)

    monkeypatch.setattr(SnapshotStore, "create", rewrite_then_create)
    assert await resolver.resolve_lora(MODEL, "a") is None


async def test_cancelled_resolution_propagates(
    resolver: LorawarmResolver, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancellation (vLLM shutting down a request) is not swallowed as an error."""
    adapter(cache)
    release = threading.Event()
    real = resolver.resolve_snapshot

    def slow(base: str, name: str) -> Snapshot | None:
        release.wait(10)
        return real(base, name)

    monkeypatch.setattr(resolver, "resolve_snapshot", slow)
    task = asyncio.create_task(resolver.resolve_lora(MODEL, "a"))
    await asyncio.sleep(0.05)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


# ------------------------------------------------------------------------------ register()

ENV = (
    "LORAWARM_CONFIG",
    "LORAWARM_CACHE_DIR",
    "VLLM_LORA_RESOLVER_CACHE_DIR",
    "LORAWARM_STATE_DIR",
    "STATE_DIRECTORY",
    "LORAWARM_MAX_LORA_RANK",
    "LORAWARM_BASE_MODEL",
    "LORAWARM_BASE_MODEL_ALIASES",
    "LORAWARM_SERVED_MODEL_NAMES",
    "VLLM_PLUGINS",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, cache: Path, state: Path) -> pytest.MonkeyPatch:
    """A clean plugin environment: enabled, pointing at the temp drop and state dirs."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "lorawarm")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    monkeypatch.setenv("LORAWARM_CACHE_DIR", str(cache))
    monkeypatch.setenv("LORAWARM_STATE_DIR", str(state))
    return monkeypatch


@pytest.fixture
def registry() -> Iterator[Any]:
    """vLLM's real resolver registry, restored after the test."""
    from vllm.lora.resolver import LoRAResolverRegistry

    saved = dict(LoRAResolverRegistry.resolvers)
    LoRAResolverRegistry.resolvers.pop("lorawarm", None)
    yield LoRAResolverRegistry
    LoRAResolverRegistry.resolvers.clear()
    LoRAResolverRegistry.resolvers.update(saved)


def test_register_adds_the_lorawarm_resolver(
    env: pytest.MonkeyPatch, registry: Any, cache: Path, state: Path
) -> None:
    """register() puts one `lorawarm` resolver built from the settings into vLLM's registry."""
    from vllm.lora.resolver import LoRAResolver

    env.setenv("LORAWARM_BASE_MODEL_ALIASES", "org/tiny,tiny-v1")
    env.setenv("LORAWARM_MAX_LORA_RANK", "64")
    env.setenv("LORAWARM_MAX_ADAPTER_BYTES", "1000000")
    env.setenv("LORAWARM_SAFETENSORS_ONLY", "false")
    register()
    resolver = registry.get_resolver("lorawarm")
    assert isinstance(resolver, LorawarmResolver)
    assert isinstance(resolver, LoRAResolver)
    assert resolver.cache_dir == cache
    assert resolver.store.root == state / "snapshots"
    assert resolver.rules == Rules(max_adapter_bytes=1_000_000, safetensors_only=False)
    assert resolver.policy == FitPolicy(
        base_model_aliases=("org/tiny", "tiny-v1"), max_lora_rank=64
    )


def test_register_twice_keeps_the_first_resolver(env: pytest.MonkeyPatch, registry: Any) -> None:
    """Calling register() again with the same settings (vLLM does, per process) changes
    nothing: the same resolver instance stays registered, once."""
    register()
    first = registry.get_resolver("lorawarm")
    register()
    assert registry.get_resolver("lorawarm") is first
    assert list(registry.resolvers).count("lorawarm") == 1


def test_register_with_new_settings_replaces_the_resolver(
    env: pytest.MonkeyPatch, registry: Any
) -> None:
    """Changed settings between calls register a resolver with the new settings."""
    register()
    env.setenv("LORAWARM_BASE_MODEL", "org/tiny")
    register()
    assert registry.get_resolver("lorawarm").policy.base_model == "org/tiny"


def test_register_resolver_resolves_through_the_registry(
    env: pytest.MonkeyPatch, registry: Any, cache: Path
) -> None:
    """The registered resolver answers vLLM's call for an adapter on disk."""
    adapter(cache)
    register()
    request = asyncio.run(registry.get_resolver("lorawarm").resolve_lora(MODEL, "a"))
    assert request is not None
    assert request.lora_name == "a"


def test_cache_dir_falls_back_to_vllm_variable(
    env: pytest.MonkeyPatch, registry: Any, cache: Path
) -> None:
    """VLLM_LORA_RESOLVER_CACHE_DIR, the built-in resolver's variable, works as the drop dir."""
    env.delenv("LORAWARM_CACHE_DIR")
    env.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache))
    register()
    assert registry.get_resolver("lorawarm").cache_dir == cache


def test_register_creates_the_snapshot_dir(
    env: pytest.MonkeyPatch, registry: Any, state: Path
) -> None:
    """A state dir that does not exist yet is created at registration."""
    register()
    assert (state / "snapshots").is_dir()


def test_installed_but_unconfigured_plugin_stays_out_of_the_way(
    env: pytest.MonkeyPatch, registry: Any
) -> None:
    """With VLLM_PLUGINS unset (vLLM loads every plugin) and no drop dir configured,
    register() registers nothing and does not stop vLLM."""
    env.delenv("VLLM_PLUGINS")
    env.delenv("LORAWARM_CACHE_DIR")
    register()
    assert "lorawarm" not in registry.resolvers


def test_installed_plugin_ignores_vllms_own_resolver_directory(
    env: pytest.MonkeyPatch, registry: Any, cache: Path
) -> None:
    """With VLLM_PLUGINS unset, vLLM's VLLM_LORA_RESOLVER_CACHE_DIR (set for its filesystem
    resolver) does not activate the merely installed lorawarm plugin."""
    env.delenv("VLLM_PLUGINS")
    env.delenv("LORAWARM_CACHE_DIR")
    env.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache))
    register()
    assert "lorawarm" not in registry.resolvers


def test_installed_plugin_does_not_read_lorawarm_settings(
    env: pytest.MonkeyPatch, registry: Any
) -> None:
    """Merely installed (VLLM_PLUGINS unset, no LORAWARM_CACHE_DIR), the plugin reads no
    settings: a bad LORAWARM_* value meant for the daemon does not stop vLLM."""
    env.delenv("VLLM_PLUGINS")
    env.delenv("LORAWARM_CACHE_DIR")
    env.setenv("LORAWARM_MAX_LORA_RANK", "zero")
    register()
    assert "lorawarm" not in registry.resolvers


def test_lorawarm_cache_dir_activates_the_installed_plugin(
    env: pytest.MonkeyPatch, registry: Any, cache: Path
) -> None:
    """With VLLM_PLUGINS unset, setting LORAWARM_CACHE_DIR is asking for the plugin."""
    env.delenv("VLLM_PLUGINS")
    register()
    assert registry.get_resolver("lorawarm").cache_dir == cache


@pytest.mark.parametrize(
    ("plugins", "active"),
    [("lorawarm", True), ("other,lorawarm", True), ("other, lorawarm", False), ("", False)],
)
def test_vllm_plugins_is_split_as_vllm_splits_it(
    env: pytest.MonkeyPatch, registry: Any, cache: Path, plugins: str, *, active: bool
) -> None:
    """`lorawarm` counts as named in VLLM_PLUGINS exactly when vLLM would load it: split on
    commas, spaces not stripped."""
    env.setenv("VLLM_PLUGINS", plugins)
    env.delenv("LORAWARM_CACHE_DIR")
    env.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache))
    register()
    assert ("lorawarm" in registry.resolvers) is active


def test_enabled_plugin_without_cache_dir_stops_vllm(
    env: pytest.MonkeyPatch, registry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Named in VLLM_PLUGINS but without a drop dir, register() logs one error naming the
    variables and exits with 78 (EX_CONFIG)."""
    env.delenv("LORAWARM_CACHE_DIR")
    with pytest.raises(SystemExit) as exited:
        register()
    assert exited.value.code == EX_CONFIG
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "LORAWARM_CACHE_DIR" in errors[0]
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" in errors[0]
    assert "lorawarm" not in registry.resolvers


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "plain-file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LORAWARM_CACHE_DIR", lambda t: t / "missing", "does not exist"),
        ("LORAWARM_CACHE_DIR", _file, "is not a directory"),
        ("LORAWARM_STATE_DIR", _file, "cannot create the snapshot directory"),
        ("LORAWARM_STATE_DIR", lambda t: t / "drop" / "state", "must not be the cache dir"),
        ("LORAWARM_MAX_LORA_RANK", lambda t: "zero", "LORAWARM_MAX_LORA_RANK"),
    ],
    ids=["cache_missing", "cache_is_file", "state_unwritable", "state_in_cache", "bad_rank"],
)
def test_unusable_setting_is_one_clear_error(
    env: pytest.MonkeyPatch,
    registry: Any,
    tmp_path: Path,
    variable: str,
    value: Callable[[Path], object],
    message: str,
) -> None:
    """Each unusable setting raises PluginConfigError naming the problem, even when the plugin
    is merely installed, and register() turns it into exit 78."""
    env.setenv(variable, str(value(tmp_path)))
    with pytest.raises(PluginConfigError, match=message) as raised:
        build_resolver()
    assert str(raised.value).startswith("lorawarm vLLM plugin: ")
    assert "\n" not in str(raised.value)
    env.delenv("VLLM_PLUGINS")
    with pytest.raises(SystemExit) as exited:
        register()
    assert exited.value.code == EX_CONFIG
    assert "lorawarm" not in registry.resolvers


def test_runtime_updating_off_is_warned(
    env: pytest.MonkeyPatch, registry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Without VLLM_ALLOW_RUNTIME_LORA_UPDATING vLLM never asks resolvers; register() says so."""
    env.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    register()
    assert any(
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


def test_register_reads_no_env_in_the_resolver(
    env: pytest.MonkeyPatch, cache: Path, state: Path
) -> None:
    """The resolver class takes its settings by constructor only: changing the environment
    after construction changes nothing."""
    adapter(cache, base_model="org/tiny")
    resolver = LorawarmResolver(
        cache, SnapshotStore(state), RULES, policy=FitPolicy(base_model="org/other")
    )
    env.setenv("LORAWARM_BASE_MODEL_ALIASES", "org/tiny")
    env.setenv("LORAWARM_CACHE_DIR", os.devnull)
    assert asyncio.run(resolver.resolve_lora(MODEL, "a")) is None
