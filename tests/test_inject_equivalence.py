"""One source of truth: the webhook's patch adds exactly what the chart's include path renders.

tests/inject/charts/include-app renders one pod bare (inject: false) or with the
named templates of charts/sidecar included (inject: true). For each case, the bare
pod goes through the webhook (review → JSONPatch → jsonpatch.apply_patch) with the
case's annotations and injector values, and must equal the included pod (the
marker annotation aside). Both pods pass kubernetes-validate --strict.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from agent.errors import UsageError
from agent.inject.parameters import INJECTED
from agent.inject.review import respond
from agent.inject.values import DEFAULTS, load_values, merged
from tests.inject_support import (
    CHART_DIR,
    FIXTURES,
    apply_response,
    chart_copy,
    parse_manifests,
    pod_template,
    review,
    validate,
)

SECRET = {"name": "app-secrets", "key": "k"}
# case: (namespace, the chart's configAgent values, the injector's values, the pod's annotations)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]] = {
    "native-defaults": ("org-acme", {"orgId": "acme"}, {}, {}),
    "classic-services-webhook-hook": (
        "org-acme",
        {"orgId": "acme", "mode": "classic", "services": ["ai", "features"],
         "hooks": {"webhook": "http://127.0.0.1:8080/-/reload"}},
        {},
        {"config-agent.io/mode": "classic", "config-agent.io/services": "ai,features",
         "config-agent.io/on-change-webhook": "http://127.0.0.1:8080/-/reload"},
    ),
    "org-annotation-signal-no-socket-secrets": (
        "team-payments",
        {"orgId": "globex", "outputDir": "/config", "socket": {"enabled": False},
         "hooks": {"exec": "kill -HUP 1", "signal": {"name": "HUP", "pidfile": "/var/run/config-agent/app.pid"}},
         "database": {"urlSecret": SECRET, "readUrlSecret": SECRET, "passwordSecret": SECRET},
         "redis": {"passwordSecret": SECRET, "caSecret": SECRET},
         "metrics": {"port": 9999}, "http": {"port": 8999}, "image": {"digest": "sha256:" + "a" * 64},
         "extraEnv": [{"name": "TZ", "value": "UTC"}], "resources": {"limits": {"memory": "128Mi"}},
         "flagServices": ["flags", "features"]},
        {"socket": {"enabled": False}, "flagServices": ["flags", "features"],
         "database": {"urlSecret": SECRET, "readUrlSecret": SECRET, "passwordSecret": SECRET},
         "redis": {"passwordSecret": SECRET, "caSecret": SECRET},
         "metrics": {"port": 9999}, "http": {"port": 8999}, "image": {"digest": "sha256:" + "a" * 64},
         "extraEnv": [{"name": "TZ", "value": "UTC"}], "resources": {"limits": {"memory": "128Mi"}}},
        {"config-agent.io/org": "globex", "config-agent.io/output-dir": "/config",
         "config-agent.io/on-change-exec": "kill -HUP 1", "config-agent.io/on-change-signal": "HUP",
         "config-agent.io/signal-pidfile": "/var/run/config-agent/app.pid"},
    ),
}


@pytest.fixture(scope="module")
def include_chart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = chart_copy(tmp_path_factory.mktemp("repo"), FIXTURES / "charts" / "include-app")
    with helm.Chart.load(path) as chart:
        yield chart


def rendered_pod(chart: Any, namespace: str, agent: dict[str, Any], annotations: dict[str, str],
                 *, inject: bool) -> dict[str, Any]:
    values = {"inject": inject, "podAnnotations": annotations, "configAgent": agent}
    return pod_template(parse_manifests(chart.render(values, name="app", namespace=namespace)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_webhook_patch_equals_the_include_path(include_chart: Any, case: str) -> None:
    namespace, agent, injector_values, annotations = CASES[case]
    bare = rendered_pod(include_chart, namespace, agent, annotations, inject=False)
    included = rendered_pod(include_chart, namespace, agent, annotations, inject=True)
    assert bare != included

    answer = respond(json.dumps(review(bare, namespace)).encode(), merged(DEFAULTS, injector_values))
    assert answer["response"]["allowed"] is True, answer["response"].get("status")
    injected = apply_response(bare, answer)
    assert injected["metadata"]["annotations"].pop(INJECTED) == "true"
    if not injected["metadata"]["annotations"]:
        del injected["metadata"]["annotations"]
    assert injected == included
    validate(injected)


def test_defaults_are_the_charts_values() -> None:
    """values.DEFAULTS is charts/sidecar/values.yaml, for every key that shapes an injected pod."""
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert {key: chart_values[key] for key in DEFAULTS} == DEFAULTS


def test_values_file_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "values.json"
    path.write_text('{"image": {"repository": "registry.example.com/config-agent"}}')
    values = load_values(path)
    assert values["image"] == {**DEFAULTS["image"], "repository": "registry.example.com/config-agent"}
    assert copy.deepcopy(values)["metrics"] == DEFAULTS["metrics"]


@pytest.mark.parametrize(("text", "message"), [
    ('{"mode": 5}', "mode must be a string"),
    ('{"mode": "sidecar"}', "mode 'sidecar' must be native or classic"),
    ('{"hooks": {"signal": {"nam": "HUP"}}}', "unknown key hooks.signal.nam"),
    ('{"metrics": {"port": "9790"}}', "metrics.port must be a number"),
    ('["not", "a", "map"]', "must hold a JSON object"),
    ("{", "is not JSON"),
])
def test_bad_values_file_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "values.json"
    path.write_text(text)
    with pytest.raises(UsageError) as excinfo:
        load_values(path)
    assert message in str(excinfo.value) and "(--values)" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
