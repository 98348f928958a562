"""The differential: lorawarm's per-server verdict against what a real vLLM does with the adapter.

For each row of a table of real-world-shaped `adapter_config.json` variants (hub ids, quantized
variant ids, training paths, null bases, `lm_head`/`embed_tokens` targets, all-linear lists,
`peft_type` spellings, rank/alpha patterns, a rank above the server's `--max-lora-rank`,
adapters made for models of other dimensions or depth), a REAL PEFT adapter is built on a tiny
model, inspected by `lorawarm.inspection` as the daemon does with no settings (`Rules()`), and
judged by `lorawarm.fit.judge` against the facts `lorawarm.learn.learn` learned from the real
server (through lorawarm's endpoint in it). Then the same folder is sent to that server's
`POST /v1/load_lora_adapter`. lorawarm's "fits" must equal vLLM's 200, a refusal a refusal (with
the reason vLLM's message names), and vLLM must stay healthy after every load; an accepted
adapter must answer a completion.

One exception, declared per row (`stricter`): vLLM 0.32 copies each LoRA matrix into a slot
sized for its model, so it silently accepts (200) an adapter whose matrices are SMALLER than
the model's, or that has layers the model lacks, and serves an adapter made for another model.
lorawarm refuses those as `shape_mismatch`; the test asserts that vLLM really takes them, so
the claim stays checked.

One vLLM server per architecture (tiny Llama, Qwen2 and Mistral, `--max-lora-rank 8`), started
once and shared by its rows: run with the vLLM lock held
(`flock /tmp/lorawarm-vllm.lock pytest tests/e2e/test_fit_differential.py`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorawarm.fit import Fit, FitPolicy, judge
from lorawarm.inspection import Invalid, Reason, Rules, inspect_adapter
from lorawarm.learn import learn
from lorawarm.server_facts import LearnedFrom, ServerFacts
from lorawarm.vllm_client import VllmClient
from tests.support.models import ALL_LINEAR_MODULES, TINY_DIMS, make_adapter, make_model
from tests.support.vllm_server import VllmServer, completion

pytestmark = pytest.mark.e2e

MAX_LORA_RANK = 8
#: Models adapters are trained on: architecture and dimensions. The first three are served.
MODELS: Mapping[str, tuple[str, Mapping[str, int]]] = {
    "llama": ("llama", TINY_DIMS),
    "qwen2": (
        "qwen2",
        {
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    ),
    "mistral": ("mistral", {**TINY_DIMS, "num_key_value_heads": 2}),
    "llama-wide": ("llama", {**TINY_DIMS, "hidden_size": 512}),
    "llama-deep": ("llama", {**TINY_DIMS, "num_hidden_layers": 4}),
}
SERVED_NAME = {"llama": "tiny-llama", "qwen2": "tiny-qwen", "mistral": "tiny-mistral"}
DROP = object()  # a config value that removes the key
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Row:
    """One adapter and the server it is offered to."""

    id: str
    server: str
    trained_on: str = ""  # a key of MODELS; defaults to the server's own model
    lora: Mapping[str, Any] = field(default_factory=dict)  # make_adapter / LoraConfig options
    config: Mapping[str, Any] = field(default_factory=dict)  # adapter_config.json rewrites
    name: str = ""  # the lora_name; defaults to the id
    stricter: bool = False  # vLLM silently takes it; lorawarm refuses: shape_mismatch


ROWS = [
    # ---- tiny Llama (hidden 256, MLP 512, 2 layers, 4 kv heads): takes lm_head, embed_tokens
    Row("llama-hub-id", "llama", config={"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}),
    Row(
        "llama-bnb-4bit",
        "llama",
        config={"base_model_name_or_path": "unsloth/llama-3-8b-Instruct-bnb-4bit"},
    ),
    Row(
        "llama-kaggle-path",
        "llama",
        config={"base_model_name_or_path": "/kaggle/input/llama-3/transformers/8b-hf/1"},
    ),
    Row("llama-relative-path", "llama", config={"base_model_name_or_path": "../llama-7b-hf"}),
    Row("llama-null-base", "llama", config={"base_model_name_or_path": None}),
    Row("llama-served-model", "llama"),
    Row("llama-lm-head", "llama", lora={"target_modules": ["q_proj", "v_proj", "lm_head"]}),
    Row("llama-embed-tokens", "llama", lora={"target_modules": ["q_proj", "embed_tokens"]}),
    Row(
        "llama-all-linear-r8",
        "llama",
        lora={"target_modules": list(ALL_LINEAR_MODULES), "lora_alpha": 16},
    ),
    Row("llama-r16-above-max", "llama", lora={"r": 16, "lora_alpha": 32}),
    Row("llama-rank-pattern-above-max", "llama", lora={"r": 4, "rank_pattern": {"q_proj": 16}}),
    Row("llama-rslora-r2-alpha64", "llama", lora={"r": 2, "lora_alpha": 64, "use_rslora": True}),
    Row("llama-alpha-pattern", "llama", lora={"alpha_pattern": {"v_proj": 64}}),
    Row("llama-peft-type-lower", "llama", config={"peft_type": "lora"}),
    Row("llama-peft-type-title", "llama", config={"peft_type": "Lora"}),
    Row("llama-peft-type-missing", "llama", config={"peft_type": DROP}),
    Row("llama-peft-type-none", "llama", config={"peft_type": "none"}),
    Row("llama-bias-all", "llama", lora={"bias": "all"}),
    Row("llama-dora", "llama", lora={"use_dora": True}),
    Row("llama-named-as-served", "llama", name=SERVED_NAME["llama"]),
    Row("llama-from-wider-llama", "llama", trained_on="llama-wide"),
    Row("llama-from-deeper-llama", "llama", trained_on="llama-deep", stricter=True),
    Row(
        "llama-from-qwen2",
        "llama",
        trained_on="qwen2",
        config={"base_model_name_or_path": "Qwen/Qwen2-0.5B"},
        stricter=True,
    ),
    # ---- tiny Qwen2 (hidden 128, MLP 384, 3 layers, 2 kv heads): no LoRA on embeddings
    Row(
        "qwen2-all-linear-hub-id",
        "qwen2",
        lora={"target_modules": list(ALL_LINEAR_MODULES)},
        config={"base_model_name_or_path": "Qwen/Qwen2-0.5B-Instruct"},
    ),
    Row(
        "qwen2-bnb-4bit-null-type",
        "qwen2",
        config={"base_model_name_or_path": "unsloth/Qwen2-7B-bnb-4bit", "peft_type": None},
    ),
    Row("qwen2-lm-head", "qwen2", lora={"target_modules": ["q_proj", "lm_head"]}),
    Row("qwen2-embed-tokens", "qwen2", lora={"target_modules": ["v_proj", "embed_tokens"]}),
    Row("qwen2-r16-above-max", "qwen2", lora={"r": 16}),
    Row("qwen2-from-llama", "qwen2", trained_on="llama"),
    # ---- tiny Mistral (Llama's dimensions, 2 kv heads): no LoRA on lm_head or embed_tokens
    Row(
        "mistral-lm-head",
        "mistral",
        lora={"target_modules": [*ATTENTION, "lm_head"]},
        config={"base_model_name_or_path": "mistralai/Mistral-7B-v0.1"},
    ),
    Row("mistral-embed-tokens", "mistral", lora={"target_modules": ["q_proj", "embed_tokens"]}),
    Row(
        "mistral-all-linear-bnb-4bit",
        "mistral",
        lora={"target_modules": list(ALL_LINEAR_MODULES)},
        config={"base_model_name_or_path": "unsloth/mistral-7b-v0.3-bnb-4bit"},
    ),
    Row(
        "mistral-config-lists-lm-head-without-weights",
        "mistral",
        config={"target_modules": [*ATTENTION, "lm_head"]},
    ),
    Row("mistral-from-llama", "mistral", trained_on="llama"),
    Row("mistral-from-qwen2", "mistral", trained_on="qwen2", stricter=True),
]

#: vLLM's words for each refusal lorawarm can give (its 400/500 messages, vLLM 0.32).
VLLM_WORDS = {
    Reason.RANK_TOO_LARGE: "is greater than max_lora_rank",
    Reason.TARGET_MODULES_NOT_SUPPORTED: "expected target modules in",
    Reason.SHAPE_MISMATCH: "must match the size of tensor",
    Reason.NAME_IS_BASE_MODEL: "conflicts with a served base model",
    Reason.DORA_NOT_SUPPORTED: "does not yet support DoRA",
    Reason.BIAS_NOT_SUPPORTED: "Adapter bias is not supported",
}


class Servers:
    """One real vLLM per architecture, started when its first row needs it; the previous one is
    stopped first (two cores: one server at a time). Facts are learned once per server."""

    def __init__(self, models: Mapping[str, Path], root: Path) -> None:
        self.models = models
        self.root = root
        self.current: tuple[str, VllmServer, ServerFacts] | None = None

    def get(self, arch: str) -> tuple[VllmServer, ServerFacts]:
        if self.current is not None and self.current[0] == arch:
            return self.current[1], self.current[2]
        self.close()
        drop = self.root / f"drop-{arch}"
        drop.mkdir()
        server = VllmServer(
            self.models[arch],
            served_model_name=SERVED_NAME[arch],
            plugins=["lorawarm"],
            env={
                "LORAWARM_CACHE_DIR": str(drop),
                "LORAWARM_STATE_DIR": str(self.root / f"state-{arch}"),
                "VLLM_LORA_RESOLVER_CACHE_DIR": None,
            },
            extra_args=["--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", "2"],
        )
        server.start()
        try:
            server.wait_healthy()
            facts = asyncio.run(_learn(server.url))
        except BaseException:
            server.kill()
            raise
        self.current = (arch, server, facts)
        return server, facts

    def close(self) -> None:
        if self.current is not None:
            self.current[1].stop()
            self.current = None


async def _learn(url: str) -> ServerFacts:
    async with VllmClient(url) as client:
        return await learn(client)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fit-models")
    return {
        key: make_model(root / key, dims, architecture=arch) for key, (arch, dims) in MODELS.items()
    }


@pytest.fixture(scope="module")
def servers(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pool = Servers(models, tmp_path_factory.mktemp("fit-servers"))
    try:
        yield pool
    finally:
        pool.close()


def build(row: Row, models: Mapping[str, Path], adapters: Path) -> Path:
    """The row's adapter: real PEFT weights for its training model, then its config rewrites."""
    folder = make_adapter(models[row.trained_on or row.server], adapters / row.id, **row.lora)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for key, value in row.config.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def verdict(row: Row, folder: Path, facts: ServerFacts) -> Fit:
    """lorawarm's verdict with no settings: server-independent inspection, then `judge`."""
    result = inspect_adapter(folder, root=folder.parent, rules=Rules(), name=row.name or row.id)
    if isinstance(result, Invalid):
        return Fit(False, result.reason, result.message)
    return judge(result, facts, FitPolicy())


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_lorawarm_verdict_equals_vllms_load(
    row: Row, servers: Servers, models: dict[str, Path], tmp_path: Path
) -> None:
    """lorawarm's verdict for the adapter on this server equals what the real vLLM does with
        it (200 or a refusal naming the same reason), vLLM stays healthy either way, and a fitting
    adapter naming another base model carries the warning base_model_differs."""
    server, facts = servers.get(row.server)
    assert LearnedFrom.PLUGIN in facts.learned_from, facts  # the facts are vLLM's own
    folder = build(row, models, tmp_path)
    ours = verdict(row, folder, facts)
    name = row.name or row.id
    with httpx.Client(base_url=server.url, timeout=120) as http:
        answer = http.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)}
        )
        shown = f"vLLM {answer.status_code} {answer.text[:200]}"
        print(f"\n{row.id}: lorawarm {ours.reason or 'fits'}; {shown}")
        assert http.get("/health").status_code == 200, server.log_tail()
        if answer.status_code == 200:
            served = completion(server.url, name, "Hello world", max_tokens=2)
            assert served.status_code == 200, served.text
            http.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
    if row.stricter:
        assert answer.status_code == 200, answer.text  # vLLM takes an adapter of another model
        assert ours.reason == Reason.SHAPE_MISMATCH, ours
        return
    assert ours.ok == (answer.status_code == 200), (ours, answer.text)
    if ours.ok:  # a base named otherwise than --model is reported, never refused
        renamed = "base_model_name_or_path" in row.config
        assert [w.code.value for w in ours.warnings] == (["base_model_differs"] if renamed else [])
    if not ours.ok:
        assert ours.reason in VLLM_WORDS, ours
        assert VLLM_WORDS[ours.reason] in answer.json()["error"]["message"], (ours, answer.text)


def test_table_has_the_variety_it_claims() -> None:
    """The table spans ≥ 25 configs on three architectures, with accepted and refused rows."""
    assert len(ROWS) >= 25
    assert {r.server for r in ROWS} == {"llama", "qwen2", "mistral"}
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert sum(r.stricter for r in ROWS) < len(ROWS) // 4
