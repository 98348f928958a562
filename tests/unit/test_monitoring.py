"""The shipped Prometheus alerting rules and Grafana dashboard (monitoring/), checked with
Prometheus's own promtool (Debian's `prometheus` package; `make test` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorawarm.catalog import AdapterState
from lorawarm.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = MONITORING / "lorawarm-alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# Series of the object-storage sources (issue 14), exported by the sources' own module.
SOURCE_SERIES = {"lorawarm_source_up"}
# What Grafana puts in a query before Prometheus sees it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is missing: `make ops-tools` installs Debian's prometheus"
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel["targets"]]


def exported_series() -> set[str]:
    """Every series name lorawarm's registry can export (a counter's `_total`, a histogram's
    `_bucket`/`_sum`/`_count`), read from the registry itself."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the rules file (PromQL, templates, structure)."""
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_rules_unit_tests_pass() -> None:
    """`promtool test rules` passes: every alert fires after its `for`, not before, with the
    labels and annotations an operator is paged with."""
    result = promtool("test", "rules", "lorawarm-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_catch_a_wrong_rule(tmp_path: Path) -> None:
    """The unit tests are not vacuous: an alert that forgets `incompatible` adapters fails."""
    copy = tmp_path / "monitoring"
    shutil.copytree(MONITORING, copy)
    text = (copy / RULES.name).read_text()
    (copy / RULES.name).write_text(text.replace('"failed|incompatible"', '"failed"'))
    result = promtool("test", "rules", "lorawarm-alerts.test.yml", cwd=copy)
    assert result.returncode != 0
    assert "LorawarmAdaptersFailing" in result.stdout + result.stderr


def test_the_alerts_operators_need_are_shipped() -> None:
    """Server down, adapters failing or incompatible, collection held back, source failing,
    drop directory missing, and lorawarm itself down: each is a rule with a summary."""
    by_name = {rule["alert"]: rule for rule in rules()}
    assert set(by_name) == {
        "LorawarmDown",
        "LorawarmServerDown",
        "LorawarmAdaptersFailing",
        "LorawarmCollectionHeld",
        "LorawarmSourceFailing",
        "LorawarmDropDirMissing",
    }
    for rule in by_name.values():
        assert rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("warning", "critical")
    failing = by_name["LorawarmAdaptersFailing"]["expr"]
    assert f'state=~"{AdapterState.FAILED}|{AdapterState.INCOMPATIBLE}"' in failing


def test_every_series_read_is_one_lorawarm_exports() -> None:
    """Each lorawarm series the rules and the dashboard query is exported by lorawarm (or by
    its sources), so no alert or panel watches a name that never exists."""
    exprs = [rule["expr"] for rule in rules()] + dashboard_queries()
    used = {name for e in exprs for name in re.findall(r"\blorawarm_[a-z_]+", e)}
    assert used
    assert used - exported_series() - SOURCE_SERIES == set()


def test_dashboard_is_json_with_queries_promtool_parses(tmp_path: Path) -> None:
    """The dashboard is JSON whose every panel query, with Grafana's variables filled in as
    Grafana fills them, is PromQL that promtool parses."""
    queries = dashboard_queries()
    assert len(queries) >= 8
    filled = []
    for query in queries:
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, query
        filled.append(query)
    records = [{"record": f"lorawarm:panel_{i}", "expr": q} for i, q in enumerate(filled)]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("broken", ["sum by (state) (lorawarm_adapters", "rate(lorawarm_x[5m]"])
def test_promtool_refuses_a_broken_query(tmp_path: Path, broken: str) -> None:
    """The dashboard check above can fail: promtool refuses a query that does not parse."""
    path = tmp_path / "panels.yml"
    doc = {"groups": [{"name": "p", "rules": [{"record": "lorawarm:x", "expr": broken}]}]}
    path.write_text(yaml.safe_dump(doc))
    assert promtool("check", "rules", str(path), cwd=tmp_path).returncode != 0
