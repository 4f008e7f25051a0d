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
    except json.JSONDecodeError as exc:
        raise UsageError(f"values file {path} is not JSON: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"values file {path} must hold a JSON object")
    return merged(DEFAULTS, doc)
