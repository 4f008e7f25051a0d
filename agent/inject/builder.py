"""What injection adds to a pod, built from agent values: the one source of truth.

Mirrors charts/sidecar/templates/_sidecar.tpl field for field (same names, same
string formatting as Helm's `quote`/`toString`); tests render the chart's include
path and `config-agent inject` for the same parameters and require equal pods.
The webhook (mutate.py) and `helm-values` (helm_values.py) both use `build`.
"""

from __future__ import annotations

import copy
import posixpath
from dataclasses import dataclass
from typing import Any

from agent.errors import UsageError
from agent.inject.values import Values

Obj = dict[str, Any]

AGENT_CONTAINER = "config-agent"
ONCE_CONTAINER = "config-agent-init"
SECRETS_DIR = "/var/run/secrets/config-agent"
OUTPUT_VOLUME = "config-agent-output"
RUN_VOLUME = "config-agent-run"
STATE_VOLUME = "config-agent-state"
TMP_VOLUME = "config-agent-tmp"
POD_LABELS = {"config-agent/role": "agent"}
CONTAINER_SECURITY_CONTEXT: Obj = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# config-agent.podSecurityContext: fsGroup lets the app (any UID) use the 0660 socket.
POD_SECURITY_CONTEXT: Obj = {
    "fsGroup": 65532,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class Injection:
    """Everything injection adds, as Kubernetes API objects (plain dicts)."""

    init_containers: list[Obj]   # first among the pod's init containers
    containers: list[Obj]        # after the app's containers (classic mode only)
    volumes: list[Obj]           # appended to the pod's volumes
    app_volume_mounts: list[Obj]  # appended to every app container
    app_env: list[Obj]           # appended to every app container
    pod_labels: dict[str, str]
    pod_security_context: Obj    # fields set only where the pod has none

    @property
    def added_containers(self) -> list[Obj]:
        """Every container injection adds; the agent itself is the last."""
        return self.init_containers + self.containers


def go_string(value: Any) -> str:
    """Helm's `toString` of a values number (float64 in Helm): 300 → "300", 0.2 → "0.2"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build(values: Values) -> Injection:
    """The Injection for `values` (the chart's agent values, orgId included)."""
    if not values.get("orgId"):
        raise UsageError("orgId is required: the tenant this agent serves (e.g. acme for namespace org-acme)")
    agent = _sidecar_container(values)
    if values["mode"] == "native":
        init, containers = [agent], []
    else:
        init, containers = [_once_container(values)], [agent]
    # A deep copy: the pods built from it must never share (and so alter) the values' objects.
    return copy.deepcopy(Injection(
        init_containers=init,
        containers=containers,
        volumes=_volumes(values),
        app_volume_mounts=_app_volume_mounts(values),
        app_env=_app_env(values),
        pod_labels=dict(POD_LABELS),
        pod_security_context=POD_SECURITY_CONTEXT,
    ))


def image(values: Values) -> str:
    """config-agent.image: repository@digest when pinned, else repository:tag."""
    img: dict[str, str] = values["image"]
    return f"{img['repository']}@{img['digest']}" if img.get("digest") else f"{img['repository']}:{img['tag']}"


def _run_dir(values: Values) -> str:
    return posixpath.dirname(str(values["socket"]["path"]))


def _secret_files(values: Values) -> list[tuple[str, str, Obj]]:
    """(volume, dir under SECRETS_DIR, secret ref) of each configured Secret file."""
    files = []
    for volume, directory, ref in (
        ("config-agent-db-password", "database", values["database"].get("passwordSecret")),
        ("config-agent-redis-password", "redis", values["redis"].get("passwordSecret")),
        ("config-agent-redis-ca", "redis-ca", values["redis"].get("caSecret")),
    ):
        if ref and ref.get("name"):
            files.append((volume, directory, ref))
    return files


def _value(name: str, value: Any) -> Obj:
    return {"name": name, "value": go_string(value)}


def _secret_ref(name: str, ref: Obj) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}}


def _field_ref(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _env(values: Values) -> list[Obj]:
    """config-agent.env: the agent's settings; URLs only through secretKeyRef."""
    db, redis, hooks = values["database"], values["redis"], values.get("hooks")
    env = [_value("CONFIG_AGENT_ORG_ID", values["orgId"])]
    if values.get("services"):
        env.append(_value("CONFIG_AGENT_SERVICES", ",".join(values["services"])))
    env.append(_value("CONFIG_AGENT_FLAG_SERVICES", ",".join(values["flagServices"])))
    env.append(_secret_ref("CONFIG_AGENT_DATABASE_URL", db["urlSecret"]))
    if (db.get("readUrlSecret") or {}).get("name"):
        env.append(_secret_ref("CONFIG_AGENT_DATABASE_READ_URL", db["readUrlSecret"]))
    if (db.get("passwordSecret") or {}).get("name"):
        env.append(_value("CONFIG_AGENT_DATABASE_PASSWORD_FILE",
                          f"{SECRETS_DIR}/database/{db['passwordSecret']['key']}"))
    env.append(_secret_ref("CONFIG_AGENT_REDIS_URL", redis["urlSecret"]))
    if (redis.get("passwordSecret") or {}).get("name"):
        env.append(_value("CONFIG_AGENT_REDIS_PASSWORD_FILE", f"{SECRETS_DIR}/redis/{redis['passwordSecret']['key']}"))
    if (redis.get("caSecret") or {}).get("name"):
        env.append(_value("CONFIG_AGENT_REDIS_CA_FILE", f"{SECRETS_DIR}/redis-ca/{redis['caSecret']['key']}"))
    env += [_value("CONFIG_AGENT_HTTP_HOST", "127.0.0.1"),
            _value("CONFIG_AGENT_HTTP_PORT", int(values["http"]["port"]))]
    if values["socket"]["enabled"]:
        env += [_value("CONFIG_AGENT_SOCKET_PATH", values["socket"]["path"]),
                _value("CONFIG_AGENT_SOCKET_MODE", values["socket"]["mode"])]
    env += [
        _value("CONFIG_AGENT_OUTPUT_DIR", values["outputDir"]),
        _value("CONFIG_AGENT_STATE_DIR", values["stateDir"]),
        _value("CONFIG_AGENT_METRICS_HOST", values["metrics"]["host"]),
        _value("CONFIG_AGENT_METRICS_PORT", int(values["metrics"]["port"])),
        _value("CONFIG_AGENT_RECONCILE_INTERVAL", values["reconcileInterval"]),
        _value("CONFIG_AGENT_FALLBACK_POLL_INTERVAL", values["fallbackPollInterval"]),
        _value("CONFIG_AGENT_STALE_AFTER", values["staleAfter"]),
        _value("CONFIG_AGENT_HEARTBEAT_INTERVAL", values["heartbeatInterval"]),
        _value("CONFIG_AGENT_LAG_CHASE_TIMEOUT", values["lagChaseTimeout"]),
        _value("CONFIG_AGENT_FETCH_JITTER", values["fetchJitter"]),
        _value("CONFIG_AGENT_FLEET_REPORT_INTERVAL", values["fleetReportInterval"]),
        _field_ref("CONFIG_AGENT_AGENT_NAME", "metadata.name"),
        _field_ref("CONFIG_AGENT_AGENT_NAMESPACE", "metadata.namespace"),
        _value("CONFIG_AGENT_DATABASE_POOL_MODE", db.get("poolMode") or "session"),
        _value("CONFIG_AGENT_REDIS_CHANNELS", redis.get("channels") or "auto"),
        _value("CONFIG_AGENT_LOG_FORMAT", values["logFormat"]),
        _value("CONFIG_AGENT_LOG_LEVEL", values["logLevel"]),
    ]
    if hooks:
        if hooks.get("exec"):
            env.append(_value("CONFIG_AGENT_ON_CHANGE_EXEC", hooks["exec"]))
        if hooks["signal"].get("name"):
            if not hooks["signal"].get("pidfile"):
                raise UsageError("hooks.signal.pidfile is required with hooks.signal.name")
            env += [_value("CONFIG_AGENT_ON_CHANGE_SIGNAL", hooks["signal"]["name"]),
                    _value("CONFIG_AGENT_SIGNAL_PIDFILE", hooks["signal"]["pidfile"])]
        if hooks.get("webhook"):
            env.append(_value("CONFIG_AGENT_ON_CHANGE_WEBHOOK", hooks["webhook"]))
        env += [_value("CONFIG_AGENT_HOOK_DEBOUNCE", hooks["debounce"]),
                _value("CONFIG_AGENT_HOOK_TIMEOUT", hooks["timeout"])]
    env += [dict(e) for e in values.get("extraEnv") or []]
    return env


def _agent_volume_mounts(values: Values) -> list[Obj]:
    mounts: list[Obj] = [
        {"name": OUTPUT_VOLUME, "mountPath": values["outputDir"]},
        {"name": RUN_VOLUME, "mountPath": _run_dir(values)},
        {"name": STATE_VOLUME, "mountPath": values["stateDir"]},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    mounts += [{"name": volume, "mountPath": f"{SECRETS_DIR}/{directory}", "readOnly": True}
               for volume, directory, _ in _secret_files(values)]
    return mounts


def _container_base(values: Values) -> Obj:
    """config-agent.containerBase: shared by `run` (both modes) and `once`."""
    return {
        "image": image(values),
        "imagePullPolicy": values["image"]["pullPolicy"],
        "env": _env(values),
        "resources": values["resources"],
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "volumeMounts": _agent_volume_mounts(values),
    }


def _probe(path: str, probe: Obj, timeout: int) -> Obj:
    return {
        "httpGet": {"path": path, "port": "agent-metrics"},
        "periodSeconds": probe["periodSeconds"],
        "failureThreshold": probe["failureThreshold"],
        "timeoutSeconds": timeout,
    }


def _sidecar_container(values: Values) -> Obj:
    """config-agent.sidecarContainer: `config-agent run`, probes on the metrics port."""
    container: Obj = {"name": AGENT_CONTAINER, "args": ["run"]}
    if values["mode"] == "native":
        container["restartPolicy"] = "Always"
    probes = values["probes"]
    container.update(_container_base(values))
    container.update({
        "ports": [{"name": "agent-metrics", "containerPort": int(values["metrics"]["port"]), "protocol": "TCP"}],
        "startupProbe": _probe("/readyz", probes["startup"], 1),
        "readinessProbe": _probe("/readyz", probes["readiness"], 2),
        "livenessProbe": _probe("/healthz", probes["liveness"], 2),
    })
    return container


def _once_container(values: Values) -> Obj:
    """config-agent.onceContainer: classic mode writes the files before the app starts."""
    return {"name": ONCE_CONTAINER, "args": ["once"], **_container_base(values)}


def _volumes(values: Values) -> list[Obj]:
    size = values["emptyDirSizeLimit"]
    volumes: list[Obj] = [
        {"name": OUTPUT_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": size}},
        {"name": RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": STATE_VOLUME, "emptyDir": {"sizeLimit": size}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": size}},
    ]
    volumes += [{"name": volume, "secret": {"secretName": ref["name"], "defaultMode": int(values["secretFileMode"]),
                                            "items": [{"key": ref["key"], "path": ref["key"]}]}}
                for volume, _, ref in _secret_files(values)]
    return volumes


def _app_volume_mounts(values: Values) -> list[Obj]:
    """config-agent.appVolumeMounts: the file set read-only; the socket directory
    read-write only when the signal hook needs the app's pidfile there."""
    return [
        {"name": OUTPUT_VOLUME, "mountPath": values["outputDir"], "readOnly": True},
        {"name": RUN_VOLUME, "mountPath": _run_dir(values), "readOnly": not values["hooks"]["signal"].get("name")},
    ]


def _app_env(values: Values) -> list[Obj]:
    """config-agent.appEnv: where the app finds the agent (not CONFIG_AGENT_: that configures the agent)."""
    env = [_value("CONFIG_URL", f"http://127.0.0.1:{int(values['http']['port'])}"),
           _value("CONFIG_DIR", values["outputDir"])]
    if values["socket"]["enabled"]:
        env.append(_value("CONFIG_SOCKET", values["socket"]["path"]))
    return env
