"""PROVISIONAL (replaced by the endpoint branch): what a server serves, from /v1/models."""

from __future__ import annotations

from collections.abc import Sequence

from lorawarm.server_facts import LearnedFrom, ServerFacts
from lorawarm.vllm_client import ModelEntry, VllmClient


async def learn(client: VllmClient, models: Sequence[ModelEntry] | None = None) -> ServerFacts:
    listed = await client.list_models() if models is None else models
    base = [m for m in listed if m.parent is None]
    return ServerFacts(
        learned_from=(LearnedFrom.MODELS,),
        model=next((m.root for m in base if m.root), None),
        served_model_names=tuple(m.id for m in base),
    )
