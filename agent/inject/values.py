"""The agent values an injection is built from: the chart's values, as a plain tree.

DEFAULTS equals the injection-related part of charts/sidecar/values.yaml (a test
checks it), so `config-agent inject` and `helm-values` without a values file add
what the chart adds with its defaults. The chart passes its own values to the
webhook as a JSON file (the injector ConfigMap), laid over these defaults.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from agent.errors import UsageError

Values = dict[str, Any]

# Keys of charts/sidecar/values.yaml that shape an injected pod (orgId has no default).
DEFAULTS: Values = {
    "mode": "native",
    "services": [],
    "flagServices": ["features"],
    "image": {"repository": "config-agent", "tag": "0.1.0", "digest": "", "pullPolicy": "IfNotPresent"},
    "database": {
        "urlSecret": {"name": "config-agent", "key": "database-url"},
        "readUrlSecret": {"name": "", "key": "database-read-url"},
        "passwordSecret": {"name": "", "key": "database-password"},
        "poolMode": "session",
    },
    "redis": {
        "urlSecret": {"name": "config-agent", "key": "redis-url"},
        "passwordSecret": {"name": "", "key": "redis-password"},
        "caSecret": {"name": "", "key": "ca.crt"},
        "channels": "auto",
    },
    "secretFileMode": 0o444,
    "http": {"port": 8790},
    "metrics": {"port": 9790, "host": "0.0.0.0"},
    "outputDir": "/etc/config-agent",
    "socket": {"enabled": True, "path": "/var/run/config-agent/agent.sock", "mode": "0660"},
    "stateDir": "/var/lib/config-agent",
    "emptyDirSizeLimit": "64Mi",
    "hooks": {"exec": "", "signal": {"name": "", "pidfile": ""}, "webhook": "", "debounce": 0.2, "timeout": 10},
    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
    "logFormat": "json",
    "logLevel": "info",
    "reconcileInterval": 300,
    "fallbackPollInterval": 5,
    "staleAfter": 600,
    "heartbeatInterval": 5,
    "lagChaseTimeout": 15,
    "fetchJitter": 0,
    "fleetReportInterval": 10,
    "extraEnv": [],
    "probes": {
        "startup": {"periodSeconds": 1, "failureThreshold": 120},
        "readiness": {"periodSeconds": 5, "failureThreshold": 3},
        "liveness": {"periodSeconds": 10, "failureThreshold": 3},
    },
}


def merged(base: Values, *overlays: Values) -> Values:
    """A deep copy of `base` with each overlay laid over it (maps merge, anything else replaces),
    the way Helm merges values files."""
    result = copy.deepcopy(base)
    for overlay in overlays:
        _merge_into(result, overlay)
    return result


def _merge_into(target: Values, overlay: Values) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def load_values(path: Path | None) -> Values:
    """DEFAULTS, with the JSON values file at `path` (the chart renders it with toJson) laid over them."""
    if path is None:
        return merged(DEFAULTS)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read the values file {path} (--values): {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"the values file {path} (--values) is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"the values file {path} (--values) must hold a JSON object")
    problem = _shape_problem(doc, DEFAULTS, "")
    if not problem and doc.get("mode", "native") not in ("native", "classic"):
        problem = f"mode {doc['mode']!r} must be native or classic"
    if problem:
        raise UsageError(f"the values file {path} (--values): {problem}")
    return merged(DEFAULTS, doc)


# Values passed through as Kubernetes objects, whose inner keys are not ours to check.
_OPAQUE = {"resources", "extraEnv"}
_JSON_TYPES = {dict: "map", list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def _shape_problem(doc: Values, defaults: Values, where: str) -> str | None:
    """The first key of `doc` that DEFAULTS does not have or whose JSON type differs
    (the chart's values.schema.json checked the rest when it rendered the file)."""
    for key, value in doc.items():
        path = f"{where}.{key}" if where else key
        if key == "orgId" and not where:
            continue
        if key not in defaults:
            return f"unknown key {path}"
        expected = defaults[key]
        same = (isinstance(value, bool) == isinstance(expected, bool)
                and (isinstance(value, int | float) and isinstance(expected, int | float)
                     or type(value) is type(expected)))
        if not same:
            return f"{path} must be a {_JSON_TYPES[type(expected)]}"
        if isinstance(value, dict) and key not in _OPAQUE:
            problem = _shape_problem(value, expected, path)
            if problem:
                return problem
    return None
