"""`config-agent helm-values`: values for charts you do not own, equal to the webhook's injection.

The printed YAML (run as a process, parsed by PyYAML) is passed to a Bitnami-style
and a Grafana-style test chart (tests/inject/charts); the rendered pod must pass
kubernetes-validate --strict and equal the chart's bare pod after the webhook's patch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.inject.helm_values import to_yaml
from agent.inject.parameters import INJECTED
from agent.inject.review import respond
from agent.inject.values import DEFAULTS, merged
from tests.inject_support import FIXTURES, apply_response, parse_manifests, pod_template, review, validate

CONFIG_AGENT = str(Path(sys.executable).parent / "config-agent")
OPT_IN = {"podLabels": {"config-agent.io/inject": "true"}}
# case: (helm-values flags, the same parameters as pod annotations)
CASES: dict[str, tuple[list[str], dict[str, str]]] = {
    "native-defaults": ([], {}),
    "classic-services-hook": (
        ["--mode", "classic", "--services", "ai,features", "--on-change-webhook", "http://127.0.0.1:8080/reload"],
        {"config-agent.io/mode": "classic", "config-agent.io/services": "ai,features",
         "config-agent.io/on-change-webhook": "http://127.0.0.1:8080/reload"},
    ),
    "output-dir-signal": (
        ["--output-dir", "/config", "--on-change-signal", "HUP", "--signal-pidfile", "/var/run/config-agent/app.pid"],
        {"config-agent.io/output-dir": "/config", "config-agent.io/on-change-signal": "HUP",
         "config-agent.io/signal-pidfile": "/var/run/config-agent/app.pid"},
    ),
}


def helm_values(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CONFIG_AGENT, "helm-values", "--org", "acme", *flags],
                          capture_output=True, text=True, timeout=60, check=False)


def printed_values(flags: list[str], style: str) -> dict[str, Any]:
    result = helm_values(*flags, "--style", style)
    assert result.returncode == 0, result.stderr
    values: dict[str, Any] = yaml.safe_load(result.stdout)
    return values


@pytest.fixture(scope="module", params=["bitnami", "grafana"])
def styled_chart(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    with helm.Chart.load(FIXTURES / "charts" / f"{request.param}-style") as chart:
        yield request.param, chart


def render_pod(chart: Any, values: dict[str, Any]) -> dict[str, Any]:
    return pod_template(parse_manifests(chart.render(values, name="web", namespace="org-acme")))


def webhook_pod(bare: dict[str, Any], annotations: dict[str, str]) -> dict[str, Any]:
    pod = json.loads(json.dumps(bare))
    if annotations:
        pod["metadata"]["annotations"] = annotations
    answer = respond(json.dumps(review(pod, "org-acme")).encode(), merged(DEFAULTS))
    assert answer["response"]["allowed"] is True, answer["response"].get("status")
    injected = apply_response(pod, answer)
    del injected["metadata"]["annotations"][INJECTED]
    if annotations:
        injected["metadata"]["annotations"] = {}
    if not injected["metadata"].get("annotations"):
        injected["metadata"].pop("annotations", None)
    return injected


def comparable(pod: dict[str, Any], style: str) -> dict[str, Any]:
    """The pod with what the values path cannot set left out: the pod securityContext is
    the chart's own (the webhook only fills absent fields); Grafana renders its env map sorted."""
    pod = json.loads(json.dumps(pod))
    pod["spec"].pop("securityContext", None)
    if style == "grafana":
        for container in pod["spec"]["containers"]:
            container["env"] = sorted(container.get("env", []), key=lambda e: e["name"])
    return pod


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_render_the_webhooks_pod(styled_chart: tuple[str, Any], case: str) -> None:
    style, chart = styled_chart
    flags, annotations = CASES[case]
    values = merged(printed_values(flags, style), OPT_IN)
    with_agent = render_pod(chart, values)
    validate(with_agent)
    injected = webhook_pod(render_pod(chart, OPT_IN), annotations)
    assert comparable(with_agent, style) == comparable(injected, style)
    spec = with_agent["spec"]
    assert spec["initContainers"][0]["name"] in ("config-agent", "config-agent-init")
    if style == "bitnami":
        assert with_agent == {**injected, "spec": {**injected["spec"], "securityContext": spec["securityContext"]}}
        assert injected["spec"]["securityContext"] == {**spec["securityContext"], "seccompProfile": {
            "type": "RuntimeDefault"}}, "the webhook keeps the chart's fsGroup and adds only what is absent"


def test_grafana_extra_containers_is_a_string() -> None:
    values = printed_values(["--mode", "classic"], "grafana")
    assert isinstance(values["extraContainers"], str)
    (agent,) = yaml.safe_load(values["extraContainers"])
    assert agent["name"] == "config-agent" and agent["args"] == ["run"]
    assert printed_values([], "grafana")["extraContainers"] == "", "native mode: nothing among containers"


@pytest.mark.parametrize(("flags", "message"), [
    (["--mode", "both"], "--mode 'both' must be native or classic"),
    (["--services", "A B"], "'A B' is not a service name"),
    (["--on-change-webhook", "http://example.com/"], "--on-change-webhook must be a local URL"),
    (["--on-change-signal", "HUP"], "--signal-pidfile must be an absolute path with --on-change-signal"),
    (["--values", "/nonexistent/values.json"], "cannot read the values file /nonexistent/values.json (--values)"),
])
def test_bad_flags_are_one_line_exit_2(flags: list[str], message: str) -> None:
    result = helm_values(*flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), JSON_LIKE, max_size=5))
def test_printed_yaml_reads_back_unchanged(doc: dict[str, Any]) -> None:
    """Whatever the values hold (a hook command with quotes, colons, newlines, "yes"), PyYAML reads it back."""
    assert yaml.safe_load(to_yaml(doc)) == (doc or None)
