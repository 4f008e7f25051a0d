"""`config-agent helm-values`: the Injection as values of charts you do not own.

bitnami: the keys Bitnami's charts (and many that copy them) pass through
         common.tplvalues.render into the pod: initContainers, sidecars,
         extraVolumes, extraVolumeMounts and extraEnvVars (main container), podLabels.
grafana: Grafana's chart: extraInitContainers, extraContainers (a YAML *string*
         put through tpl), extraContainerVolumes, extraVolumeMounts, env (a map), podLabels.
Built by builder.build, like the webhook's patch, so both add the same objects.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.inject.builder import Injection

STYLES = ("bitnami", "grafana")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
# Words a YAML 1.1 reader takes for a boolean or null, in any case: quoted as keys.
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


def values_for(injection: Injection, style: str) -> dict[str, Any]:
    """The values tree for `style` (one of STYLES)."""
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


def to_yaml(node: Any, indent: int = 0) -> str:
    """Block-style YAML of JSON-like data; strings JSON-quoted (valid YAML double-quoted
    scalars), so no value is ever read back as another type, except multi-line map values
    that read back unchanged as a literal `|` block. Ends with a newline."""
    return "".join(line + "\n" for line in _lines(node, indent))


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")
        # YAML 1.1 readers (PyYAML) take 5e-324 for a string: give the mantissa a point.
        return mantissa + ("" if "." in mantissa or not e else ".0") + e + exponent
    if not isinstance(value, str):
        return json.dumps(value)
    # JSON's escapes are YAML's too, except surrogate pairs: escape by code point instead.
    return "".join(c if c.isprintable() else f"\\U{ord(c):08x}" for c in json.dumps(value, ensure_ascii=False))


def _key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) and key.lower() not in _YAML_WORDS else _scalar(key)


def _lines(node: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if _literal_block_fits(value):
                lines.append(f"{pad}{_key(key)}: |")
                lines += [f"{pad}  {line}" if line else "" for line in value.splitlines()]
            elif isinstance(value, dict | list) and value:
                lines.append(f"{pad}{_key(key)}:")
                lines += _lines(value, indent + 2)
            else:
                lines.append(f"{pad}{_key(key)}: {_empty_or_scalar(value)}")
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict | list) and item:
                inner = _lines(item, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {_empty_or_scalar(item)}")
    else:
        lines.append(pad + _scalar(node))
    return lines


def _literal_block_fits(value: Any) -> bool:
    """A multi-line string that reads back unchanged as a `|` block (Grafana's extraContainers)."""
    if not isinstance(value, str) or "\n" not in value.rstrip("\n") or not value.endswith("\n"):
        return False
    lines = value[:-1].split("\n")
    return (not value.endswith("\n\n") and not lines[0].startswith(" ") and "\t" not in value and "\r" not in value
            and all(line == line.rstrip() for line in lines))


def _empty_or_scalar(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)
