"""The chart's injector (injector.enabled): rendered with both TLS sources, validated strictly.

Built-in kinds go through kubernetes-validate --strict (oldest and newest supported
Kubernetes); cert-manager's Certificate/Issuer and the PrometheusRule through the
subset of their CRD structure the chart uses. The alert is checked by promtool.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from agent.inject.review import respond
from agent.inject.values import DEFAULTS, load_values, merged
from tests.inject_support import CHART_DIR, ROOT, apply_response, parse_manifests, review
from tests.test_alerts import promtool
from tests.test_chart import validate_object

NAMESPACE = "config-agent-system"
ENABLED = {"orgId": "platform", "injector": {"enabled": True}}
CA_BUNDLE = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="
OWN_SECRET = {"orgId": "platform", "injector": {"enabled": True, "tls": {
    "source": "secret", "secretName": "injector-tls", "caBundle": CA_BUNDLE}}}
CLUSTER_ISSUER = {"orgId": "platform", "injector": {"enabled": True, "tls": {
    "certManager": {"issuerRef": {"name": "platform-ca", "kind": "ClusterIssuer"}}}},
    "monitoring": {"prometheusRule": {"enabled": True}}}
VARIANTS = {"cert-manager-self-signed": ENABLED, "cert-manager-cluster-issuer": CLUSTER_ISSUER,
            "own-secret": OWN_SECRET}

_NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
_META = {"type": "object", "required": ["name", "namespace"], "properties": {"name": _NAME}}
_ISSUER_REF = {"type": "object", "additionalProperties": False, "required": ["name"],
               "properties": {"name": _NAME, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                              "group": {"type": "string"}}}
# cert-manager.io/v1, the fields the chart sets (unknown ones are errors).
CERT_MANAGER_SCHEMAS = {
    "Certificate": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"}, "metadata": _META,
        "spec": {"type": "object", "additionalProperties": False, "required": ["secretName", "issuerRef"],
                 "properties": {
                     "secretName": _NAME, "commonName": {"type": "string", "maxLength": 64},
                     "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                     "duration": {"type": "string", "pattern": "^([0-9]+(h|m|s))+$"},
                     "renewBefore": {"type": "string", "pattern": "^([0-9]+(h|m|s))+$"},
                     "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                         "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                         "rotationPolicy": {"enum": ["Never", "Always"]}}},
                     "usages": {"type": "array", "items": {"enum": [
                         "server auth", "client auth", "digital signature", "key encipherment"]}},
                     "issuerRef": _ISSUER_REF}}}},
    "Issuer": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"}, "metadata": _META,
        "spec": {"type": "object", "additionalProperties": False, "required": ["selfSigned"],
                 "properties": {"selfSigned": {"type": "object"}}}}},
}


def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith("cert-manager.io/"):
        jsonschema.validate(obj, CERT_MANAGER_SCHEMAS[obj["kind"]])
    else:
        validate_object(obj)


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    return parse_manifests(chart.render(values, name="config-agent", namespace=NAMESPACE))


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The objects by kind (the PrometheusRules, of which there are two, left out)."""
    objects = [o for o in objects if o["kind"] != "PrometheusRule"]
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {o["kind"]: o for o in objects}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_injector_renders_valid_objects(chart: Any, variant: str) -> None:
    objects = render(chart, VARIANTS[variant])
    kinds = {o["kind"] for o in objects}
    assert {"MutatingWebhookConfiguration", "Deployment", "PodDisruptionBudget", "Service", "ConfigMap"} <= kinds
    for obj in objects:
        validate(obj)
    report = helm.lint(CHART_DIR, VARIANTS[variant], strict=True, namespace=NAMESPACE)
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report


def test_webhook_configuration_and_its_safe_defaults(chart: Any) -> None:
    objects = by_kind(render(chart, ENABLED))
    (hook,) = objects["MutatingWebhookConfiguration"]["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Fail" and hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["timeoutSeconds"] == 5
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["objectSelector"] == {"matchLabels": {"config-agent.io/inject": "true"}}
    (excluded,) = hook["namespaceSelector"]["matchExpressions"]
    assert excluded == {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                        "values": [NAMESPACE, "kube-system"]}, "the injector never waits for itself"
    service, deployment = objects["Service"], objects["Deployment"]
    assert hook["clientConfig"]["service"] == {"name": service["metadata"]["name"], "namespace": NAMESPACE,
                                               "path": "/mutate", "port": 443}
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 2
    assert objects["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    for selector in (service["spec"]["selector"], objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["args"][0] == "inject"
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert pod["spec"]["automountServiceAccountToken"] is False, "the webhook needs no API access"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_cert_manager_certificate_and_ca_injection(chart: Any) -> None:
    objects = by_kind(render(chart, ENABLED))
    certificate, service = objects["Certificate"], objects["Service"]
    annotation = objects["MutatingWebhookConfiguration"]["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{NAMESPACE}/{certificate['metadata']['name']}"
    assert f"{service['metadata']['name']}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"]["name"] == objects["Issuer"]["metadata"]["name"]
    tls = [v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls[0]["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert "caBundle" not in objects["MutatingWebhookConfiguration"]["webhooks"][0]["clientConfig"]
    other = by_kind(render(chart, CLUSTER_ISSUER))
    assert "Issuer" not in other
    assert other["Certificate"]["spec"]["issuerRef"] == {"name": "platform-ca", "kind": "ClusterIssuer",
                                                         "group": "cert-manager.io"}


def test_own_secret_and_ca_bundle(chart: Any) -> None:
    objects = by_kind(render(chart, OWN_SECRET))
    assert not {"Certificate", "Issuer"} & objects.keys()
    hook = objects["MutatingWebhookConfiguration"]
    assert hook["webhooks"][0]["clientConfig"]["caBundle"] == CA_BUNDLE
    assert "annotations" not in hook["metadata"]
    tls = [v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls[0]["secret"]["secretName"] == "injector-tls"


def test_no_certificate_is_made_by_the_templates(chart: Any) -> None:
    """GitOps: two renders are identical and hold no key material; no gen* function is used."""
    for values in VARIANTS.values():
        first = chart.render(values, name="config-agent", namespace=NAMESPACE)
        assert first == chart.render(values, name="config-agent", namespace=NAMESPACE)
        assert not re.search(r"BEGIN [A-Z ]*(CERTIFICATE|PRIVATE KEY)", json.dumps(first))
    for template in (CHART_DIR / "templates").glob("*"):
        assert not re.search(r"\bgen(CA|SelfSignedCert|SignedCert|PrivateKey)\b", template.read_text()), template


def test_the_webhook_gets_this_releases_agent_values(chart: Any, tmp_path: Path) -> None:
    """values.json in the ConfigMap, read by `inject --values`, gives the chart's agent values."""
    def configmap_values(values: dict[str, Any]) -> dict[str, Any]:
        path = tmp_path / "values.json"
        path.write_text(by_kind(render(chart, values))["ConfigMap"]["data"]["values.json"])
        return load_values(path)

    assert configmap_values(ENABLED) == merged(DEFAULTS)
    passed = json.loads(by_kind(render(chart, ENABLED))["ConfigMap"]["data"]["values.json"])
    assert passed.keys() == DEFAULTS.keys(), "the chart passes every key the builder reads, and only those"
    custom = configmap_values({**ENABLED, "image": {"repository": "registry.example.com/ca", "tag": "9.9.9"},
                               "database": {"urlSecret": {"name": "reader", "key": "url"}},
                               "flagServices": ["flags", "features"]})
    assert custom["image"]["repository"] == "registry.example.com/ca"
    assert custom["flagServices"] == ["flags", "features"]
    assert custom["database"]["urlSecret"] == {"name": "reader", "key": "url"}


def test_the_injector_is_never_injected(chart: Any) -> None:
    """Its own pod, even labelled for injection and seen by the webhook, gets no patch."""
    template = by_kind(render(chart, ENABLED))["Deployment"]["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}
    pod["metadata"]["labels"]["config-agent.io/inject"] = "true"
    answer = respond(json.dumps(review(pod, NAMESPACE)).encode(), merged(DEFAULTS))
    assert answer["response"]["allowed"] is True and "patch" not in answer["response"]
    assert apply_response(pod, answer) == pod


@pytest.mark.parametrize(("values", "message"), [
    ({"failurePolicy": "Retry"}, r"at '/injector/failurePolicy': value must be one of 'Fail', 'Ignore'"),
    ({"timeoutSeconds": 31}, r"at '/injector/timeoutSeconds': maximum"),
    ({"tls": {"source": "secret"}}, r"at '/injector/tls/caBundle': minLength"),
    ({"objectSelector": {"matchLabels": None}}, r"at '/injector/objectSelector'"),
    ({"tls": {"source": "genCA"}}, r"at '/injector/tls/source': value must be one of"),
])
def test_bad_injector_values_fail_at_render(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.render({"orgId": "platform", "injector": {"enabled": True, **values}}, name="x", namespace="y")


# --- the missed-injection alert ------------------------------------------------

ALERTS = CHART_DIR / "files" / "injector-alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "promtool" / "injector_alerts_test.yaml"


def test_prometheus_rule_is_the_injector_alerts_file(chart: Any) -> None:
    rules = [o for o in render(chart, CLUSTER_ISSUER) if o["kind"] == "PrometheusRule"]
    injector = [r for r in rules if r["metadata"]["name"].endswith("-injector")]
    assert len(injector) == 1 and injector[0]["spec"] == yaml.safe_load(ALERTS.read_text())
    assert not [o for o in render(chart, ENABLED) if o["kind"] == "PrometheusRule"], "only when asked"


def test_injector_alert_passes_promtool() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0 and "SUCCESS: 1 rules found" in result.stdout, result.stdout + result.stderr
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    checks = [c for t in tests for c in t["alert_rule_test"]]
    assert any(c["exp_alerts"] for c in checks) and any(not c["exp_alerts"] for c in checks)
