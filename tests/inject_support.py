"""Helpers of the tests/test_inject_*.py modules: AdmissionReviews, patches, validation, charts."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import helm_python as helm  # PyPI helm-python-sdk (test extra)
import jsonpatch
import kubernetes_validate.utils as kubernetes_validate
import pytest
import yaml

from tests.test_chart import KUBE_VERSIONS, parse_manifests

ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = ROOT / "charts" / "sidecar"
FIXTURES = Path(__file__).resolve().parent / "inject"
PODS = FIXTURES / "pods"

__all__ = ["KUBE_VERSIONS", "parse_manifests"]


def load_pod(name: str) -> dict[str, Any]:
    """A pod spec fixture of tests/inject/pods."""
    pod: dict[str, Any] = yaml.safe_load((PODS / f"{name}.yaml").read_text())
    return pod


def review(pod: dict[str, Any], namespace: str, *, operation: str = "CREATE") -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionReview for creating `pod`, as the API server sends it."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def apply_response(pod: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The pod after the API server applied the response's JSONPatch (if any)."""
    response = answer["response"]
    if "patch" not in response:
        return copy.deepcopy(pod)
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, operations)
    return patched


def validate(obj: dict[str, Any]) -> None:
    """kubernetes-validate --strict, oldest and newest Kubernetes the chart supports."""
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} @ {where}: {exc.message} (k8s {version})")


def chart_copy(tmp: Path, chart: Path) -> Path:
    """`chart` (which depends on ../charts/sidecar by a relative file:// URL) after
    `helm dependency update`, in a copy of the repository layout."""
    shutil.copytree(CHART_DIR, tmp / "charts" / "sidecar")
    target = tmp / chart.relative_to(ROOT)
    shutil.copytree(chart, target, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    helm.dependency_update(target)
    return target


def pod_template(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Deployment's pod template as a Pod object."""
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    template = copy.deepcopy(deployment["spec"]["template"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}


def agent_count(pod: dict[str, Any]) -> int:
    """How many containers named config-agent the pod has (init and regular)."""
    spec = pod["spec"]
    return sum(c["name"] == "config-agent" for c in spec.get("initContainers", []) + spec["containers"])
