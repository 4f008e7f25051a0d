"""An AdmissionReview (admission.k8s.io/v1) request → the webhook's response.

Decision, in order (every "allow" without a patch leaves the pod unchanged):
  not a Pod CREATE                                  → allow
  not opted in (label or annotation inject: "true") → allow
  a pod of the injector itself (role injector)      → allow (never inject ourselves)
  already injected (marker) or has a config-agent   → allow (idempotent; re-invocation)
  bad parameters / the injection cannot fit          → deny, with one line saying what
  otherwise                                          → allow + JSONPatch
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

from agent.errors import UsageError
from agent.inject.builder import build
from agent.inject.mutate import already_has_agent, inject, patch_for
from agent.inject.parameters import INJECT, INJECTED, from_annotations, overrides
from agent.inject.values import Values, merged

log = logging.getLogger("agent.inject")

API_VERSION = "admission.k8s.io/v1"
ROLE_LABEL = "config-agent/role"
INJECTOR_ROLE = "injector"


class BadReview(UsageError):
    """The request body is not an AdmissionReview we can answer (no uid to answer to)."""


@dataclass(frozen=True)
class Decision:
    """What the webhook decided for one pod: allowed, why (when denied), and the patch."""

    allowed: bool
    message: str = ""
    patch: list[dict[str, Any]] | None = None


def decide(request: dict[str, Any], values: Values) -> Decision:
    """The decision for one AdmissionRequest, given the injector's agent values."""
    if (request.get("kind") or {}).get("kind") != "Pod" or request.get("operation") != "CREATE":
        return Decision(True)
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise BadReview("request.object is not a pod")
    metadata = pod.get("metadata") or {}
    labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
    try:
        if not _opted_in(labels, annotations):
            return Decision(True)
        if labels.get(ROLE_LABEL) == INJECTOR_ROLE or INJECTED in annotations or already_has_agent(pod):
            return Decision(True)
        namespace = request.get("namespace") or metadata.get("namespace")
        agent_values = merged(values, overrides(from_annotations(annotations), namespace))
        injected = inject(pod, build(agent_values), marker="true")
    except UsageError as exc:
        return Decision(False, message=str(exc))
    return Decision(True, patch=patch_for(pod, injected))


def _opted_in(labels: dict[str, str], annotations: dict[str, str]) -> bool:
    for where, value in (("label", labels.get(INJECT)), ("annotation", annotations.get(INJECT))):
        if value not in (None, "true", "false"):
            raise UsageError(f"{where} {INJECT} must be \"true\" or \"false\", got {value!r}")
    return "true" in (labels.get(INJECT), annotations.get(INJECT))


def respond(body: bytes, values: Values) -> dict[str, Any]:
    """The AdmissionReview response for a request body; BadReview when it is not one."""
    try:
        review = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadReview(f"the body is not JSON: {exc}") from exc
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise BadReview("the body is not an AdmissionReview")
    if review.get("apiVersion") != API_VERSION:
        raise BadReview(f"AdmissionReview apiVersion must be {API_VERSION}, got {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReview("the AdmissionReview has no request.uid")
    try:
        decision = decide(request, values)
    except BadReview:
        raise
    except Exception as exc:  # a bug must not become a 500 the API server cannot explain
        log.exception("injection failed for %s/%s", request.get("namespace"), request.get("name"))
        decision = Decision(False, message=f"config-agent injector failed: {type(exc).__name__}: {exc}")
    if not decision.allowed or decision.patch:
        obj = request.get("object")
        meta = (obj.get("metadata") if isinstance(obj, dict) else None) or {}
        pod = f"{request.get('namespace')}/{meta.get('name') or meta.get('generateName', '')}"
        if decision.allowed:
            log.info("injected the agent into pod %s", pod)
        else:
            log.info("denied pod %s: %s", pod, decision.message)
    response: dict[str, Any] = {"uid": request["uid"], "allowed": decision.allowed}
    if not decision.allowed:
        response["status"] = {"code": 400, "reason": "BadRequest", "message": decision.message.splitlines()[0]}
    elif decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(decision.patch).encode()).decode()
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
