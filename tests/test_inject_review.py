"""The webhook's decisions on AdmissionReviews built from real pod specs (tests/inject/pods).

Every patch is applied with jsonpatch the way the API server applies it, and the
result must pass kubernetes-validate --strict (oldest and newest supported
Kubernetes) with the agent exactly once — first among init containers in native
mode. Bad parameters are denied with one line naming what was wrong.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from agent.inject.builder import ONCE_CONTAINER
from agent.inject.parameters import INJECTED
from agent.inject.review import respond
from agent.inject.values import DEFAULTS, Values, merged
from tests.inject_support import agent_count, apply_response, load_pod, review, validate


def answer(pod: dict[str, Any], namespace: str = "org-acme", values: Values = DEFAULTS,
           operation: str = "CREATE") -> dict[str, Any]:
    response: dict[str, Any] = respond(json.dumps(review(pod, namespace, operation=operation)).encode(), values)
    return response


def injected(pod: dict[str, Any], namespace: str = "org-acme") -> dict[str, Any]:
    result = answer(pod, namespace)
    assert result["response"]["allowed"] is True, result["response"].get("status")
    assert "patch" in result["response"], "an opted-in pod gets a patch"
    return apply_response(pod, result)


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("name", ["deployment-pod", "init-and-native-sidecars", "job-pod"])
def test_injected_pods_are_valid_with_the_agent_once_and_first(name: str) -> None:
    pod = load_pod(name)
    result = injected(pod)
    validate(result)
    assert agent_count(result) == 1
    spec = result["spec"]
    first = spec["initContainers"][0]
    assert first["name"] == "config-agent" and first["restartPolicy"] == "Always"
    assert first["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "agent-metrics"}
    assert [c["name"] for c in spec["initContainers"][1:]] == [c["name"] for c in pod["spec"].get("initContainers", [])]
    assert [c["name"] for c in spec["containers"]] == [c["name"] for c in pod["spec"]["containers"]]
    assert first["securityContext"]["runAsNonRoot"] is True
    assert first["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert first["resources"] == DEFAULTS["resources"]
    for app in spec["containers"]:
        mounts = {m["mountPath"]: m for m in app["volumeMounts"]}
        assert mounts["/etc/config-agent"]["readOnly"] is True, app["name"]
        assert mounts["/var/run/config-agent"]["readOnly"] is True, app["name"]
        assert env(app)["CONFIG_URL"] == "http://127.0.0.1:8790"
        assert env(app)["CONFIG_SOCKET"] == "/var/run/config-agent/agent.sock"
    assert result["metadata"]["annotations"][INJECTED] == "true"
    assert result["metadata"]["labels"]["config-agent/role"] == "agent"
    assert env(first)["CONFIG_AGENT_ORG_ID"] == "acme", "org from the namespace org-acme"
    assert env(first)["CONFIG_AGENT_DATABASE_URL"] == {"secretKeyRef": {"name": "config-agent", "key": "database-url"}}


def test_the_pods_own_settings_are_kept() -> None:
    """An env the app sets itself wins; an fsGroup the pod has stays (the socket dir follows it)."""
    result = injected(load_pod("init-and-native-sidecars"))
    worker = result["spec"]["containers"][0]
    own = [e for e in worker["env"] if e["name"] == "CONFIG_DIR"]
    assert own == [{"name": "CONFIG_DIR", "value": "/opt/own-config"}]
    assert result["spec"]["securityContext"]["fsGroup"] == 2000
    assert result["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_deployment_pod_parameters_reach_the_agent() -> None:
    agent = injected(load_pod("deployment-pod"))["spec"]["initContainers"][0]
    assert env(agent)["CONFIG_AGENT_SERVICES"] == "ai,features"
    assert env(agent)["CONFIG_AGENT_ON_CHANGE_WEBHOOK"] == "http://127.0.0.1:8080/-/reload"


def test_classic_mode_adds_once_init_and_a_sidecar_container() -> None:
    pod = load_pod("deployment-pod")
    pod["metadata"]["annotations"]["config-agent.io/mode"] = "classic"
    result = injected(pod)
    validate(result)
    spec = result["spec"]
    assert spec["initContainers"][0]["name"] == ONCE_CONTAINER and spec["initContainers"][0]["args"] == ["once"]
    assert [c["name"] for c in spec["containers"]] == ["app", "config-agent"]
    assert "restartPolicy" not in spec["containers"][1]
    assert agent_count(result) == 1


def test_not_opted_in_gets_no_patch() -> None:
    pod = load_pod("not-annotated")
    pod["metadata"]["annotations"] = {"config-agent.io/mode": "bogus"}  # parameters alone do not opt in
    result = answer(pod)
    assert result["response"] == {"uid": result["response"]["uid"], "allowed": True}


def test_opt_in_by_annotation_too() -> None:
    pod = load_pod("not-annotated")
    pod["metadata"]["annotations"] = {"config-agent.io/inject": "true"}
    assert agent_count(injected(pod)) == 1


def test_already_injected_pod_is_left_alone() -> None:
    """Idempotent: a second review (reinvocationPolicy IfNeeded, or a re-created object) changes nothing."""
    once = injected(load_pod("deployment-pod"))
    again = answer(once)
    assert again["response"]["allowed"] is True and "patch" not in again["response"]
    assert apply_response(once, again) == once
    # A pod that got the agent from the chart's include path (no marker) is left alone too.
    del once["metadata"]["annotations"][INJECTED]
    assert "patch" not in answer(once)["response"]


def test_injector_pods_and_other_operations_are_never_injected() -> None:
    pod = load_pod("deployment-pod")
    own = copy.deepcopy(pod)
    own["metadata"]["labels"]["config-agent/role"] = "injector"
    assert "patch" not in answer(own)["response"]
    assert "patch" not in answer(pod, operation="UPDATE")["response"]


def test_injector_values_shape_the_agent() -> None:
    values = merged(DEFAULTS, {"image": {"repository": "registry.example.com/config-agent", "tag": "0.2.0"},
                               "database": {"urlSecret": {"name": "acme-reader", "key": "url"}}})
    result = apply_response(load_pod("job-pod"), answer(load_pod("job-pod"), values=values))
    agent = result["spec"]["initContainers"][0]
    assert agent["image"] == "registry.example.com/config-agent:0.2.0"
    assert env(agent)["CONFIG_AGENT_DATABASE_URL"] == {"secretKeyRef": {"name": "acme-reader", "key": "url"}}


def with_annotations(**annotations: str) -> dict[str, Any]:
    pod = load_pod("deployment-pod")
    pod["metadata"]["annotations"] = {f"config-agent.io/{k.replace('_', '-')}": v for k, v in annotations.items()}
    return pod


DENIED: dict[str, tuple[dict[str, Any], str, str]] = {
    "org not a name": (with_annotations(org="Acme Corp"), "org-acme", r"config-agent.io/org 'Acme Corp' is not"),
    "org of another tenant": (with_annotations(org="globex"), "org-acme", r"does not match namespace org-acme"),
    "no org at all": (with_annotations(), "default", r"no org: annotate the pod config-agent.io/org"),
    "bad service": (with_annotations(services="ai,Bad!"), "org-acme", r"'Bad!' is not a service name"),
    "service twice": (with_annotations(services="ai,ai"), "org-acme", r"a service is named twice"),
    "unknown mode": (with_annotations(mode="sidecar"), "org-acme", r"mode 'sidecar' must be native or classic"),
    "relative output dir": (with_annotations(output_dir="config"), "org-acme", r"output-dir must be an absolute"),
    "output dir on /tmp": (with_annotations(output_dir="/tmp/x"), "org-acme", r"collides with /tmp"),
    "remote hook": (with_annotations(on_change_webhook="https://evil.example.com/x"), "org-acme",
                    r"on-change-webhook must be a local URL"),
    "signal without pidfile": (with_annotations(on_change_signal="HUP"), "org-acme",
                               r"signal-pidfile must be an absolute path"),
    "multi-line exec": (with_annotations(on_change_exec="a\nb"), "org-acme", r"on-change-exec must be one"),
    "typo in a key": (with_annotations(orgid="acme"), "org-acme", r"unknown annotation config-agent.io/orgid"),
}


def _label_yes() -> dict[str, Any]:
    pod = load_pod("deployment-pod")
    pod["metadata"]["labels"]["config-agent.io/inject"] = "yes"
    return pod


def _volume_taken() -> dict[str, Any]:
    pod = load_pod("deployment-pod")
    pod["spec"]["volumes"] = [{"name": "config-agent-output", "emptyDir": {}}]
    return pod


def _mount_taken() -> dict[str, Any]:
    pod = load_pod("deployment-pod")
    pod["spec"]["volumes"] = [{"name": "own", "emptyDir": {}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "own", "mountPath": "/etc/config-agent"}]
    return pod


def _classic_job() -> dict[str, Any]:
    pod = load_pod("job-pod")
    pod["metadata"]["annotations"]["config-agent.io/mode"] = "classic"
    return pod


def _host_network() -> dict[str, Any]:
    pod = load_pod("deployment-pod")
    pod["spec"]["hostNetwork"] = True
    return pod


def _port_taken() -> dict[str, Any]:
    pod = load_pod("deployment-pod")
    pod["spec"]["containers"][0]["ports"].append({"name": "metrics", "containerPort": 9790})
    return pod


DENIED |= {
    "host network": (_host_network(), "org-acme", r"hostNetwork: true cannot be injected"),
    "port taken": (_port_taken(), "org-acme", r"container app uses port 9790, which the agent needs"),
    "inject label not a boolean": (_label_yes(), "org-acme", r'label config-agent.io/inject must be "true"'),
    "volume name taken": (_volume_taken(), "org-acme", r"already has a volume named config-agent-output"),
    "mount path taken": (_mount_taken(), "org-acme", r"container app already mounts something at /etc/config-agent"),
    "classic job": (_classic_job(), "org-acme", r"mode classic would keep a restartPolicy Never pod"),
}


@pytest.mark.parametrize("case", sorted(DENIED))
def test_bad_parameters_are_denied_with_one_line(case: str) -> None:
    pod, namespace, message = DENIED[case]
    response = answer(pod, namespace)["response"]
    assert response["allowed"] is False and "patch" not in response
    status = response["status"]
    assert status["code"] == 400
    assert "\n" not in status["message"] and len(status["message"]) < 300
    assert re.search(message, status["message"]), status["message"]


def test_org_from_annotation_outside_org_namespaces() -> None:
    agent = injected(with_annotations(org="globex"), namespace="payments")["spec"]["initContainers"][0]
    assert env(agent)["CONFIG_AGENT_ORG_ID"] == "globex"
