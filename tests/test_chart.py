"""The Helm chart (charts/sidecar) and the example app chart, rendered offline.

Rendering uses Helm's own engine (PyPI ``helm-python-sdk``), every rendered
Kubernetes object is checked with ``kubernetes-validate --strict`` (offline
schemas), and the two custom resources (PodMonitor, PrometheusRule) against the
subset of their CRD structure this chart uses. No cluster, no helm binary, and
nothing from the ``agent`` package.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm  # PyPI helm-python-sdk (test extra): a missing tool fails, never skips
import jsonschema
import kubernetes_validate.utils as kubernetes_validate  # PyPI kubernetes-validate (test extra)
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = ROOT / "charts" / "sidecar"
EXAMPLE_DIR = ROOT / "examples" / "k8s" / "myapp"
# Native sidecars (restartPolicy: Always on init containers) need >= 1.29, the
# chart's kubeVersion; validate against the oldest supported and a current release.
KUBE_VERSIONS = ("1.29.0", "1.33.0")
ORG = {"orgId": "acme"}
ALL_FEATURES = {
    "orgId": "acme",
    "serviceAccount": {"create": True},
    "relay": {
        "enabled": True,
        "redis": {
            "passwordSecret": {"name": "relay-redis", "key": "password"},
            "caSecret": {"name": "redis-ca", "key": "ca.crt"},
        },
    },
    "migration": {
        "enabled": True,
        "database": {"passwordSecret": {"name": "owner-db", "key": "password"}},
    },
    "monitoring": {
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    },
}


# --- helpers -----------------------------------------------------------------


def parse_manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every object of a render, NOTES.txt and empty documents left out."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def render(chart: Any, values: dict[str, Any], namespace: str = "org-acme") -> list[dict[str, Any]]:
    """Render like `helm template` would (schema validation included)."""
    return parse_manifests(chart.render(values, name="release", namespace=namespace))


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of a kind."""
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, kind)["spec"]["template"]["spec"]
    return spec


def container(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    by_name = {c["name"]: c for c in containers}
    assert name in by_name, f"no container {name!r} in {sorted(by_name)}"
    return by_name[name]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")
    else:
        yield path, node


# Structure of the custom resources, restricted to what this chart renders
# (kubernetes-validate only knows built-in kinds). Unknown fields are errors.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["alert", "expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z]+$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-zA-Z_]\\w*$"},
        },
        "targetLabel": {"type": "string", "pattern": "^[a-zA-Z_]\\w*$"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
    },
}
POD_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": _STRING_MAP,
                        "matchExpressions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["key", "operator"],
                                "additionalProperties": False,
                                "properties": {
                                    "key": {"type": "string"},
                                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                    "values": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "maxLength": 15},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "relabelings": {"type": "array", "items": _RELABELING},
                        },
                    },
                },
            },
        },
    },
}
CUSTOM_SCHEMAS = {"PrometheusRule": PROMETHEUS_RULE_SCHEMA, "PodMonitor": POD_MONITOR_SCHEMA}


def validate_object(obj: dict[str, Any]) -> None:
    """kubernetes-validate --strict for built-in kinds; our CRD subset otherwise."""
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(obj, CUSTOM_SCHEMAS[obj["kind"]])
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} @ {where}: {exc.message} (k8s {version})"
            )


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sidecar_chart() -> Iterator[Any]:
    with helm.Chart.load(CHART_DIR) as chart:
        yield chart


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example chart after `helm dependency update`, in a copy of the layout
    (so that its file://../../../charts/sidecar still resolves and the repo stays clean)."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(CHART_DIR, root / "charts" / "sidecar")
    example = root / "examples" / "k8s" / "myapp"
    shutil.copytree(EXAMPLE_DIR, example, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    helm.dependency_update(example)
    return example


@pytest.fixture(scope="module")
def example_chart(example_dir: Path) -> Iterator[Any]:
    with helm.Chart.load(example_dir) as chart:
        yield chart


@pytest.fixture(scope="module")
def acme_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((EXAMPLE_DIR / "values-acme.yaml").read_text())
    return values


def with_agent(values: dict[str, Any], **agent: Any) -> dict[str, Any]:
    """Example-chart values with configAgent keys overridden."""
    merged: dict[str, Any] = json.loads(json.dumps(values))
    merged.setdefault("configAgent", {}).update(agent)
    return merged


# --- lint and validity ---------------------------------------------------------


@pytest.mark.parametrize("values", [ORG, ALL_FEATURES], ids=["defaults", "all-features"])
def test_helm_lint_sidecar_chart(values: dict[str, Any]) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace="org-acme")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_helm_lint_example_chart(example_dir: Path, acme_values: dict[str, Any]) -> None:
    assert helm.dependency_list(example_dir)[0]["status"] == "ok"
    report = helm.lint(example_dir, acme_values, strict=True, namespace="org-acme")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_defaults_add_nothing_until_asked(sidecar_chart: Any) -> None:
    """On its own with defaults the chart creates no object: injection is done by
    the app chart's includes; relay, migration and monitoring are opt-in."""
    assert render(sidecar_chart, ORG) == []


SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "sidecar-defaults": ("sidecar", ORG),
    "sidecar-all-features": ("sidecar", ALL_FEATURES),
    "example-native": ("example", {}),
    "example-classic": ("example", {"mode": "classic"}),
    "example-signal-hook-no-socket": (
        "example",
        {
            "socket": {"enabled": False},
            "hooks": {"signal": {"name": "HUP", "pidfile": "/var/run/config-agent/app.pid"}},
        },
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_is_valid(
    scenario: str, sidecar_chart: Any, example_chart: Any, acme_values: dict[str, Any]
) -> None:
    which, values = SCENARIOS[scenario]
    if which == "sidecar":
        objects = render(sidecar_chart, values, namespace="config-agent")
    else:
        objects = render(example_chart, with_agent(acme_values, **values))
    for obj in objects:
        validate_object(obj)


# --- the injected pod ------------------------------------------------------------

HARDENED = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def assert_hardened(c: dict[str, Any]) -> None:
    sc = c["securityContext"]
    for key, expected in HARDENED.items():
        assert sc.get(key) == expected, f"{c['name']}: securityContext.{key} = {sc.get(key)!r}"


def assert_probes_on_metrics_port(agent: dict[str, Any], port: int = 9790) -> None:
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports == {"agent-metrics": port}, "only the metrics port is exposed (API is loopback)"
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        http_get = agent[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert ports.get(http_get["port"], http_get["port"]) == port, (
            f"{probe} must use the metrics port"
        )
    env = env_of(agent)
    assert env["CONFIG_AGENT_METRICS_PORT"]["value"] == str(port)
    assert env["CONFIG_AGENT_HTTP_HOST"]["value"] == "127.0.0.1"


def assert_shared_volume(spec: dict[str, Any], agent: dict[str, Any], app: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in spec["volumes"]}
    agent_mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    app_mounts = {m["mountPath"]: m for m in app["volumeMounts"]}
    out = env_of(agent)["CONFIG_AGENT_OUTPUT_DIR"]["value"]
    assert out == "/etc/config-agent"
    assert agent_mounts[out]["name"] == app_mounts[out]["name"]
    assert "emptyDir" in volumes[app_mounts[out]["name"]]
    assert not agent_mounts[out].get("readOnly"), "the agent writes the file set"
    assert app_mounts[out]["readOnly"] is True, "the app only reads it"
    state = env_of(agent)["CONFIG_AGENT_STATE_DIR"]["value"]
    assert "emptyDir" in volumes[agent_mounts[state]["name"]]
    assert "/tmp" in agent_mounts, "read-only root filesystem needs a writable /tmp"


def test_native_mode_pod(example_chart: Any, acme_values: dict[str, Any]) -> None:
    objects = render(example_chart, acme_values)
    spec = pod_spec(objects)
    agent = spec["initContainers"][0]
    assert agent["name"] == "config-agent"
    assert agent["restartPolicy"] == "Always", "native sidecar"
    assert agent["args"] == ["run"]
    assert [c["name"] for c in spec["containers"]] == ["app"], "no agent among containers"
    assert_probes_on_metrics_port(agent)
    app = container(spec["containers"], "app")
    assert_shared_volume(spec, agent, app)
    assert_hardened(agent)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["fsGroup"] == 65532, "lets the app use the 0660 socket"
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["config-agent/role"] == "agent", "selected by the PodMonitor"
    env = env_of(agent)
    assert env["CONFIG_AGENT_ORG_ID"]["value"] == "acme"
    assert env["CONFIG_AGENT_SERVICES"]["value"] == "ai,features"
    assert env["CONFIG_AGENT_ON_CHANGE_WEBHOOK"]["value"] == "http://127.0.0.1:8080/-/reload"
    assert agent["resources"]["requests"] == {"cpu": "10m", "memory": "32Mi"}
    assert agent["resources"]["limits"] == {"memory": "64Mi"}
    app_env = env_of(app)
    assert app_env["CONFIG_URL"]["value"] == "http://127.0.0.1:8790"
    assert app_env["CONFIG_SOCKET"]["value"] == env["CONFIG_AGENT_SOCKET_PATH"]["value"]


def test_classic_mode_pod(example_chart: Any, acme_values: dict[str, Any]) -> None:
    spec = pod_spec(render(example_chart, with_agent(acme_values, mode="classic")))
    assert [c["name"] for c in spec["initContainers"]] == ["config-agent-init"]
    init = spec["initContainers"][0]
    assert init["args"] == ["once"], "writes the files before the app starts"
    assert "restartPolicy" not in init
    assert not {"startupProbe", "readinessProbe", "livenessProbe", "ports"} & init.keys()
    assert [c["name"] for c in spec["containers"]] == ["app", "config-agent"]
    agent = container(spec["containers"], "config-agent")
    assert agent["args"] == ["run"] and "restartPolicy" not in agent
    assert_probes_on_metrics_port(agent)
    assert_shared_volume(spec, agent, container(spec["containers"], "app"))
    assert env_of(init) == env_of(agent), "`once` and `run` see the same settings"
    assert init["volumeMounts"] == agent["volumeMounts"]
    for c in (init, agent):
        assert_hardened(c)


def test_custom_metrics_port_moves_the_probes(
    example_chart: Any, acme_values: dict[str, Any]
) -> None:
    spec = pod_spec(render(example_chart, with_agent(acme_values, metrics={"port": 9999})))
    assert_probes_on_metrics_port(spec["initContainers"][0], port=9999)


def test_socket_disabled_and_signal_hook(example_chart: Any, acme_values: dict[str, Any]) -> None:
    values = with_agent(
        acme_values,
        socket={"enabled": False},
        hooks={
            "signal": {"name": "HUP", "pidfile": "/var/run/config-agent/app.pid"},
            "exec": "true",
        },
    )
    spec = pod_spec(render(example_chart, values))
    agent, app = spec["initContainers"][0], container(spec["containers"], "app")
    env = env_of(agent)
    assert "CONFIG_AGENT_SOCKET_PATH" not in env and "CONFIG_SOCKET" not in env_of(app)
    assert env["CONFIG_AGENT_ON_CHANGE_SIGNAL"]["value"] == "HUP"
    assert env["CONFIG_AGENT_SIGNAL_PIDFILE"]["value"] == "/var/run/config-agent/app.pid"
    assert env["CONFIG_AGENT_ON_CHANGE_EXEC"]["value"] == "true"
    run_mount = {m["mountPath"]: m for m in app["volumeMounts"]}["/var/run/config-agent"]
    assert run_mount["readOnly"] is False, "the app writes its pidfile next to the socket"


def test_signal_hook_needs_a_pidfile(example_chart: Any, acme_values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError, match="hooks.signal.pidfile is required"):
        render(example_chart, with_agent(acme_values, hooks={"signal": {"name": "HUP"}}))


# --- secrets ---------------------------------------------------------------------

MARKER = "zz-marker-secret"


def test_credentials_only_through_secret_references(example_chart: Any) -> None:
    """Secret names carry a marker; it may appear only as a secretKeyRef name or a
    Secret volume's secretName, and no URL other than loopback ones is rendered."""
    ref = {"name": MARKER, "key": "k"}
    values = {
        "configAgent": {
            "orgId": "acme",
            "database": {"urlSecret": ref, "readUrlSecret": ref, "passwordSecret": ref},
            "redis": {"urlSecret": ref, "passwordSecret": ref, "caSecret": ref},
        }
    }
    objects = render(example_chart, values)
    spec = pod_spec(objects)
    agent = spec["initContainers"][0]
    for path, value in walk(objects):
        if isinstance(value, str) and MARKER in value:
            assert re.search(r"(secretKeyRef\.name|secret\.secretName)$", path), path
        if isinstance(value, str) and "://" in value:
            assert re.match(r"https?://127\.0\.0\.1[:/]", value), f"{path} = {value!r}"
    env = env_of(agent)
    for name in (
        "CONFIG_AGENT_DATABASE_URL",
        "CONFIG_AGENT_DATABASE_READ_URL",
        "CONFIG_AGENT_REDIS_URL",
    ):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": MARKER, "key": "k"}, name
        assert "value" not in env[name]
    secret_dirs = {
        m["mountPath"]: m
        for m in agent["volumeMounts"]
        if m["mountPath"].startswith("/var/run/secrets/")
    }
    for name in (
        "CONFIG_AGENT_DATABASE_PASSWORD_FILE",
        "CONFIG_AGENT_REDIS_PASSWORD_FILE",
        "CONFIG_AGENT_REDIS_CA_FILE",
    ):
        directory = str(Path(env[name]["value"]).parent)
        assert secret_dirs[directory]["readOnly"] is True, name
    app = container(spec["containers"], "app")
    assert all(not m["mountPath"].startswith("/var/run/secrets/") for m in app["volumeMounts"])
    secret_volumes = [v for v in spec["volumes"] if "secret" in v]
    assert len(secret_volumes) == 3 and all(
        v["secret"]["secretName"] == MARKER for v in secret_volumes
    )


# --- values schema -------------------------------------------------------------

INVALID = {
    "missing org": ({}, r"missing property 'orgId'"),
    "bad org": ({"orgId": "Acme Corp"}, r"at '/orgId': '.*' does not match pattern"),
    "metrics port too high": ({**ORG, "metrics": {"port": 70000}}, r"at '/metrics/port': maximum"),
    "http port zero": ({**ORG, "http": {"port": 0}}, r"at '/http/port': minimum"),
    "port not a number": (
        {**ORG, "metrics": {"port": "http"}},
        r"at '/metrics/port': got string, want integer",
    ),
    "unknown mode": (
        {**ORG, "mode": "sidecar"},
        r"at '/mode': value must be one of 'native', 'classic'",
    ),
    "plaintext database url": (
        {**ORG, "database": {"url": "postgresql://reader:hunter2@db/config"}},
        r"at '/database': additional properties 'url' not allowed",
    ),
    "plaintext redis password": (
        {**ORG, "redis": {"password": "hunter2"}},
        r"at '/redis': additional properties 'password' not allowed",
    ),
    "non-local webhook": (
        {**ORG, "hooks": {"webhook": "https://evil.example.com/hook"}},
        r"at '/hooks/webhook': .* does not match pattern",
    ),
    "unknown log format": ({**ORG, "logFormat": "xml"}, r"at '/logFormat': value must be one of"),
    "typo in a key": ({**ORG, "orgID": "acme"}, r"additional properties 'orgID' not allowed"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_values_fail_at_render_with_schema_message(sidecar_chart: Any, case: str) -> None:
    values, message = INVALID[case]
    with pytest.raises(helm.HelmValuesError, match=message) as excinfo:
        sidecar_chart.render(values, name="release", namespace="org-acme")
    assert "values don't meet the specifications of the schema" in str(excinfo.value)


def test_example_chart_checks_agent_values_with_the_same_schema(example_chart: Any) -> None:
    with pytest.raises(helm.HelmValuesError, match=r"missing property 'orgId'"):
        example_chart.render({}, name="myapp", namespace="org-acme")
    with pytest.raises(helm.HelmValuesError, match=r"value must be one of 'native', 'classic'"):
        example_chart.render({"configAgent": {"orgId": "acme", "mode": "both"}}, name="myapp")


# --- relay, migration, monitoring ------------------------------------------------


@pytest.fixture(scope="module")
def all_features(sidecar_chart: Any) -> list[dict[str, Any]]:
    return render(sidecar_chart, ALL_FEATURES, namespace="config-agent")


def test_relay_deployment_and_pdb(all_features: list[dict[str, Any]]) -> None:
    deployment = one(all_features, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    spec = deployment["spec"]["template"]["spec"]
    relay = container(spec["containers"], "relay")
    assert relay["args"] == ["relay"]
    env = env_of(relay)
    assert (
        env["CONFIG_AGENT_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
        == "config-agent-relay"
    )
    assert (
        env["CONFIG_AGENT_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "config-agent-relay"
    )
    assert env["CONFIG_AGENT_REDIS_CA_FILE"]["value"].endswith("/ca.crt")
    assert {p["containerPort"] for p in relay["ports"]} == {9790}
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert_hardened(relay)
    assert spec["automountServiceAccountToken"] is False
    pdb = one(all_features, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_migration_job_is_a_pre_install_hook(all_features: list[dict[str, Any]]) -> None:
    job = one(all_features, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    spec = job["spec"]["template"]["spec"]
    migrate = container(spec["containers"], "migrate")
    assert migrate["args"] == ["migrate"]
    assert (
        env_of(migrate)["CONFIG_AGENT_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
        == "config-agent-owner"
    )
    assert spec["restartPolicy"] == "Never"
    # The release's ServiceAccount does not exist yet when a pre-install hook runs.
    assert spec["serviceAccountName"] == "default"
    assert_hardened(migrate)
    account = one(all_features, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    relay_spec = pod_spec(all_features)
    assert relay_spec["serviceAccountName"] == account["metadata"]["name"]


def test_prometheus_rule_is_the_alerts_file(all_features: list[dict[str, Any]]) -> None:
    rule = one(all_features, "PrometheusRule")
    expected = yaml.safe_load((CHART_DIR / "files" / "alerts.yaml").read_text())
    assert rule["spec"] == expected


def test_pod_monitor_scrapes_agent_and_relay_ports(
    all_features: list[dict[str, Any]], example_chart: Any, acme_values: dict[str, Any]
) -> None:
    monitor = one(all_features, "PodMonitor")["spec"]
    endpoint_ports = {e["port"] for e in monitor["podMetricsEndpoints"]}
    agent_pod = one(render(example_chart, acme_values), "Deployment")["spec"]["template"]
    relay_pod = one(all_features, "Deployment")["spec"]["template"]
    for pod in (agent_pod, relay_pod):
        names = {
            p["name"]
            for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert names & endpoint_ports, f"no scraped port among {names}"
        (expression,) = monitor["selector"]["matchExpressions"]
        assert pod["metadata"]["labels"][expression["key"]] in expression["values"]
    for endpoint in monitor["podMetricsEndpoints"]:
        assert endpoint["path"] == "/metrics"
        (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "workload"]
        assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    assert agent_pod["metadata"]["labels"]["app.kubernetes.io/name"] == "myapp"


def test_dashboard_config_map(all_features: list[dict[str, Any]]) -> None:
    config_map = one(all_features, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (payload,) = config_map["data"].values()
    assert json.loads(payload) == json.loads((CHART_DIR / "files" / "dashboard.json").read_text())


def test_image_tag_follows_app_version(sidecar_chart: Any) -> None:
    assert sidecar_chart.values["image"]["tag"] == sidecar_chart.metadata["appVersion"]


def test_readme_snippet_uses_the_documented_context() -> None:
    """The copy-paste snippet in charts/sidecar/README.md is the example's Deployment pattern."""
    readme = (CHART_DIR / "README.md").read_text()
    deployment = (EXAMPLE_DIR / "templates" / "deployment.yaml").read_text()
    for name in ("initContainers", "containers", "volumes", "appVolumeMounts"):
        assert f'include "config-agent.{name}" $ca' in readme, name
        assert f'include "config-agent.{name}" $ca' in deployment, name
    assert '$ca := dict "Values" .Values.configAgent' in readme


def test_pod_monitor_workload_label_is_configurable(sidecar_chart: Any) -> None:
    values = {
        **ORG,
        "monitoring": {
            "podMonitor": {"enabled": True, "workloadLabel": "app.kubernetes.io/instance"}
        },
    }
    monitor = one(render(sidecar_chart, values), "PodMonitor")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        (relabel,) = endpoint["relabelings"]
        assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]
        assert relabel["targetLabel"] == "workload"
