"""PROVISIONAL (replaced by the per-server judging branch): whether one server can take one
adapter, decided from the server's facts before anything is sent."""

from __future__ import annotations

from dataclasses import dataclass

from lorawarm.inspection import Reason, Valid
from lorawarm.inspection.verdict import norm_model
from lorawarm.server_facts import ServerFacts


@dataclass(frozen=True)
class FitPolicy:
    base_model: str | None = None
    base_model_aliases: tuple[str, ...] = ()
    max_lora_rank: int | None = None
    served_model_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fit:
    ok: bool
    reason: Reason | None = None
    message: str | None = None
    warnings: tuple[tuple[str, str], ...] = ()


FITS = Fit(True)


def judge(adapter: Valid, facts: ServerFacts, policy: FitPolicy) -> Fit:
    names = facts.model_names | set(policy.served_model_names)
    if adapter.name in names:
        return Fit(False, Reason.NAME_IS_BASE_MODEL, f"{adapter.name!r} is a served model name")
    limit = policy.max_lora_rank or facts.max_lora_rank
    if limit is not None and adapter.rank > limit:
        return Fit(False, Reason.RANK_TOO_LARGE, f"rank {adapter.rank} > {limit}")
    accepted = {norm_model(n) for n in (*names, *policy.base_model_aliases)}
    base = adapter.base_model
    if policy.base_model is not None:
        accepted.add(norm_model(policy.base_model))
        if base is None or norm_model(base) not in accepted:
            return Fit(False, Reason.BASE_MODEL_MISMATCH, f"trained for {base!r}")
    elif base is None or norm_model(base) not in accepted:
        return Fit(True, warnings=(("base_model_differs", f"trained for {base!r}"),))
    return FITS
