"""A pod + an Injection → the injected pod, and the JSON Patch (RFC 6902) between them.

Placement, the same as the chart's include path:
  - the injection's init container goes FIRST among init containers (native mode:
    the agent itself; the app's own init containers and native sidecars start after
    its startup probe, so they can read the files too);
  - classic mode's agent container goes after the app's containers;
  - the volumes go after the pod's volumes;
  - every app container (spec.containers) gets the mounts and env after its own;
    an env name the container already sets keeps the container's value;
  - pod labels and the pod securityContext fields are set only where absent.
The pod is annotated with the marker `config-agent.io/injected`.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from agent.errors import UsageError
from agent.inject.builder import AGENT_CONTAINER, Injection
from agent.inject.parameters import INJECTED

Obj = dict[str, Any]


def inject(pod: Obj, injection: Injection, marker: str) -> Obj:
    """A copy of `pod` with `injection` added; UsageError (one line) when it cannot fit."""
    result = copy.deepcopy(pod)
    spec = result.setdefault("spec", {})
    app_containers = spec.get("containers") or []
    if not app_containers:
        raise UsageError("the pod has no containers to inject into")
    _check_free_names(spec, injection)
    if spec.get("hostNetwork"):
        # The agent's API and metrics ports would be the node's, shared by every such pod.
        raise UsageError("pods with hostNetwork: true cannot be injected (the agent's ports would be the node's)")
    _check_free_ports(spec, injection)
    if injection.containers and spec.get("restartPolicy") in ("Never", "OnFailure"):
        # A classic sidecar never exits, so the pod (a Job's) would never complete.
        raise UsageError(f"mode classic would keep a restartPolicy {spec['restartPolicy']} pod (a Job's) "
                         "running forever: use mode native")
    spec["initContainers"] = injection.init_containers + (spec.get("initContainers") or [])
    for container in app_containers:
        _add_to_app_container(container, injection)
    spec["containers"] = app_containers + injection.containers
    spec["volumes"] = (spec.get("volumes") or []) + injection.volumes
    security = spec.setdefault("securityContext", {})
    for key, value in injection.pod_security_context.items():
        security.setdefault(key, value)
    metadata = result.setdefault("metadata", {})
    labels = metadata.get("labels") or {}
    metadata["labels"] = {**injection.pod_labels, **labels}
    metadata["annotations"] = {**(metadata.get("annotations") or {}), INJECTED: marker}
    return result


def patch_for(pod: Obj, injected: Obj) -> list[Obj]:
    """The JSON Patch operations that turn `pod` into `injected`."""
    operations: list[Obj] = jsonpatch.make_patch(pod, injected).patch
    return operations


def already_has_agent(pod: Obj) -> bool:
    """True when a container named config-agent is in the pod (e.g. the chart's include path)."""
    return AGENT_CONTAINER in {c.get("name") for c in _containers(pod.get("spec") or {})}


def _containers(spec: Obj) -> list[Obj]:
    """Every container of a pod spec: init containers (native sidecars too), then app containers."""
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def _check_free_names(spec: Obj, injection: Injection) -> None:
    taken = {c.get("name") for c in _containers(spec)}
    for container in injection.added_containers:
        if container["name"] in taken:
            raise UsageError(f"the pod already has a container named {container['name']}")
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    for volume in injection.volumes:
        if volume["name"] in volumes:
            raise UsageError(f"the pod already has a volume named {volume['name']}")
    agent_paths = [m["mountPath"] for m in injection.added_containers[0]["volumeMounts"]]
    if len(set(agent_paths)) != len(agent_paths):
        raise UsageError(f"the agent's directories must differ, got {', '.join(agent_paths)}")


def _check_free_ports(spec: Obj, injection: Injection) -> None:
    agent = injection.added_containers[-1]
    agent_env = {e["name"]: e.get("value") for e in agent.get("env", [])}
    ours = {int(agent_env["CONFIG_AGENT_HTTP_PORT"]), int(agent_env["CONFIG_AGENT_METRICS_PORT"])}
    for container in _containers(spec):
        for port in container.get("ports") or []:
            if port.get("containerPort") in ours:
                raise UsageError(f"container {container.get('name')} uses port {port['containerPort']}, "
                                 "which the agent needs (http.port / metrics.port of the injector's values)")


def _add_to_app_container(container: Obj, injection: Injection) -> None:
    mounts = container.get("volumeMounts") or []
    paths = {m.get("mountPath") for m in mounts}
    for mount in injection.app_volume_mounts:
        if mount["mountPath"] in paths:
            raise UsageError(f"container {container.get('name')} already mounts something at {mount['mountPath']}")
    container["volumeMounts"] = mounts + injection.app_volume_mounts
    env = container.get("env") or []
    names = {e.get("name") for e in env}
    container["env"] = env + [e for e in injection.app_env if e["name"] not in names]
