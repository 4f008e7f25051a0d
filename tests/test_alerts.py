"""Alerts (charts/sidecar/files/alerts.yaml) and the Grafana dashboard, checked by promtool.

promtool comes from Debian's `prometheus` package (`apt-get install -y prometheus`);
when it is missing these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "charts" / "sidecar" / "files" / "alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"
DASHBOARD = ROOT / "charts" / "sidecar" / "files" / "dashboard.json"

# SPEC §5.
METRICS = (
    "config_version",
    "config_agent_revision",
    "config_agent_ready",
    "config_agent_stale",
    "config_agent_redis_connected",
    "config_agent_db_connected",
    "config_agent_last_sync_timestamp_seconds",
    "config_agent_propagation_seconds_bucket",
    "config_agent_updates_total",
    "config_agent_drift_total",
    "config_agent_messages_total",
)


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; fail (not skip) with the install hint when it is absent."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (Debian/Ubuntu)")
    return subprocess.run(
        [binary, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    # rule_files in the test file are relative to its directory.
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names - fires == set(), "alerts without a firing test"
    assert names - silent == set(), "alerts without a silent test"


# The alerts SPEC §5 promises, and what each must look at.
REQUIRED_ALERTS = {
    "ConfigAgentVersionDrift": (
        r"max by \(namespace, workload, org_id, service, key\) \(config_version\)",
        "2m",
    ),
    "ConfigAgentStale": (r"^config_agent_stale == 1$", "2m"),
    "ConfigAgentRedisDisconnected": (r"^config_agent_redis_connected == 0$", "5m"),
    "ConfigAgentDriftDetected": (r"increase\(config_agent_drift_total\[15m\]\)\) > 0", None),
    "ConfigAgentPropagationSlow": (
        r"histogram_quantile\(0\.99,\s*sum by \(le, namespace, workload\) "
        r"\(rate\(config_agent_propagation_seconds_bucket\[5m\]\)\)\s*\) > 0\.1",
        "5m",
    ),
    "ConfigAgentNotReady": (r"^config_agent_ready == 0$", "5m"),
    "ConfigAgentFleetBehind": (r"^max by \(org_id\) \(config_agent_fleet_behind\) > 0$", "5m"),
}


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_required_alert(name: str) -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert name in by_name
    rule = by_name[name]
    pattern, hold = REQUIRED_ALERTS[name]
    assert re.search(pattern, rule["expr"].strip(), re.MULTILINE), rule["expr"]
    assert rule.get("for") == hold
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# --- dashboard -----------------------------------------------------------------

# Grafana variables and their stand-ins so that promtool can parse the queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$workload": ".*",
}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def all_panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in doc["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def exprs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in all_panels(doc)
        for target in panel.get("targets", [])
    ]


def substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    """Every panel query as a recording rule: `promtool check rules` parses them all."""
    queries = exprs(dashboard())
    assert queries, "the dashboard has no queries"
    rules_file = tmp_path / "dashboard_rules.yaml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {"record": f"dashboard:query_{index}", "expr": substitute(expr)}
                            for index, (_, expr) in enumerate(queries)
                        ],
                    }
                ]
            }
        )
    )
    result = promtool("check", "rules", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_dashboard_structure() -> None:
    doc = dashboard()
    panels = all_panels(doc)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    assert doc["uid"] == "config-agent"
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "namespace", "workload"} <= variables
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    all_exprs = " ".join(expr for _, expr in exprs(doc))
    missing = [metric for metric in METRICS if not re.search(rf"\b{metric}\b", all_exprs)]
    assert not missing, f"metrics without a panel: {missing}"


def test_dashboard_has_the_promised_panels() -> None:
    titles = {panel["title"] for panel in all_panels(dashboard())}
    for expected in (
        "Versions per entry and pod",
        "Drift: entries whose pods disagree",
        "Propagation commit → applied (p50 / p99)",
        "Updates applied by source",
        "Redis connection",
        "PostgreSQL connection",
        "Stale flag",
        "Redis messages by result",
    ):
        assert expected in titles
    quantiles = [expr for title, expr in exprs(dashboard()) if title.startswith("Propagation")]
    assert any("histogram_quantile(0.5," in q for q in quantiles)
    assert any("histogram_quantile(0.99," in q for q in quantiles)
