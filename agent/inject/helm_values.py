"""`config-agent helm-values`: the Injection as values of charts you do not own.

bitnami: the keys Bitnami's charts (and many that copy them) pass through
         common.tplvalues.render into the pod: initContainers, sidecars,
         extraVolumes, extraVolumeMounts and extraEnvVars (main container), podLabels.
grafana: Grafana's chart: extraInitContainers, extraContainers (a YAML *string*
         put through tpl), extraContainerVolumes, extraVolumeMounts, env (a map), podLabels.
Built by builder.build, like the webhook's patch, so both add the same objects.
"""

from __future__ import annotations

from typing import Any

import yaml

from agent.inject.builder import Injection


def values_for(injection: Injection, style: str) -> dict[str, Any]:
    """The values tree for `style` (one of commands.STYLES)."""
    if style == "bitnami":
        return {
            "initContainers": injection.init_containers,
            "sidecars": injection.containers,
            "extraVolumes": injection.volumes,
            "extraVolumeMounts": injection.app_volume_mounts,
            "extraEnvVars": injection.app_env,
            "podLabels": injection.pod_labels,
        }
    return {
        "extraInitContainers": injection.init_containers,
        "extraContainers": to_yaml(injection.containers) if injection.containers else "",
        "extraContainerVolumes": injection.volumes,
        "extraVolumeMounts": injection.app_volume_mounts,
        "env": {e["name"]: e["value"] for e in injection.app_env},
        "podLabels": injection.pod_labels,
    }


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper; multi-line strings as `|` blocks (Grafana's extraContainers)."""


def _string(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    # PyYAML falls back to a quoted scalar when a block would not read back unchanged.
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _string)


def to_yaml(node: Any) -> str:
    """Block-style YAML of JSON-like data, keys in their order, that PyYAML (and Helm) read
    back unchanged: strings like "yes" or "0660" quoted. Ends with a newline; an empty map
    or list is an empty document (nothing to add)."""
    if not node:
        return ""
    return yaml.dump(node, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=False,
                     width=1 << 30)
