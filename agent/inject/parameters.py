"""Per-pod parameters → overrides of the agent values, each checked with a one-line error.

The webhook reads them from a pod's annotations (`config-agent.io/<name>`), and
`helm-values` from its flags; both go through `overrides`, so a value one accepts
the other accepts too. The rules match charts/sidecar/values.schema.json.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent.errors import UsageError
from agent.inject import PREFIX
from agent.inject.values import Values

INJECT = PREFIX + "inject"       # "true" opts a pod in (a label, so objectSelector can match it)
INJECTED = PREFIX + "injected"   # the marker: set on the pods the webhook injected
# Parameter annotations (without the prefix) and the value each one sets.
PARAMETERS = ("org", "services", "mode", "output-dir",
              "on-change-webhook", "on-change-exec", "on-change-signal", "signal-pidfile")

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
NAMESPACE_ORG = re.compile(r"org-(?P<org>[a-z0-9][a-z0-9_.-]{0,62})")
LOCAL_URL = re.compile(r"https?://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?(/\S*)?")
SIGNAL = re.compile(r"(SIG)?[A-Z0-9]+")
ABSOLUTE_PATH = re.compile(r"/[A-Za-z0-9._/-]*")
# The agent owns these; an app's output directory may not be one of them or lie inside one.
RESERVED_DIRS = ("/tmp", "/var/lib/config-agent", "/var/run/secrets")


def org_for(params: Mapping[str, str], namespace: str | None) -> str:
    """The org: the `org` parameter, else the namespace `org-<org>`. A namespace named
    org-<x> may only serve org <x> (an annotation cannot point a pod at another tenant)."""
    from_namespace = NAMESPACE_ORG.fullmatch(namespace or "")
    org = params.get("org")
    if org is not None:
        if not NAME.fullmatch(org):
            raise UsageError(f"{PREFIX}org {org!r} is not an org name (a-z, 0-9, _ . -, at most 63)")
        if from_namespace and from_namespace["org"] != org:
            raise UsageError(f"{PREFIX}org {org!r} does not match namespace {namespace} "
                             f"(org {from_namespace['org']!r})")
        return org
    if from_namespace:
        return from_namespace["org"]
    raise UsageError(f"no org: annotate the pod {PREFIX}org or run it in a namespace named org-<org> "
                     f"(namespace is {namespace or 'unknown'!r})")


def overrides(params: Mapping[str, str], namespace: str | None) -> Values:
    """Values overrides for the parameters `params` (name → text, names from PARAMETERS)."""
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise UsageError(f"unknown annotation {PREFIX}{unknown[0]} (known: {', '.join(PARAMETERS)})")
    result: dict[str, Any] = {"orgId": org_for(params, namespace)}
    if "services" in params:
        services = [s.strip() for s in params["services"].split(",") if s.strip()]
        bad = [s for s in services if not NAME.fullmatch(s)]
        if bad or len(set(services)) != len(services):
            what = f"{bad[0]!r} is not a service name" if bad else "a service is named twice"
            raise UsageError(f"{PREFIX}services: {what} (comma-separated names: a-z, 0-9, _ . -)")
        result["services"] = services
    if "mode" in params:
        if params["mode"] not in ("native", "classic"):
            raise UsageError(f"{PREFIX}mode {params['mode']!r} must be native or classic")
        result["mode"] = params["mode"]
    if "output-dir" in params:
        result["outputDir"] = _output_dir(params["output-dir"])
    hooks: dict[str, Any] = {}
    if "on-change-webhook" in params:
        if not LOCAL_URL.fullmatch(params["on-change-webhook"]):
            raise UsageError(f"{PREFIX}on-change-webhook must be a local URL (http://127.0.0.1:PORT/…), "
                             f"got {params['on-change-webhook']!r}")
        hooks["webhook"] = params["on-change-webhook"]
    if "on-change-exec" in params:
        if not params["on-change-exec"].strip() or "\n" in params["on-change-exec"]:
            raise UsageError(f"{PREFIX}on-change-exec must be one non-empty command line")
        hooks["exec"] = params["on-change-exec"]
    signal, pidfile = params.get("on-change-signal"), params.get("signal-pidfile")
    if signal is not None or pidfile is not None:
        if not signal or not SIGNAL.fullmatch(signal):
            raise UsageError(f"{PREFIX}on-change-signal must be a signal name such as HUP, got {signal!r}")
        if not pidfile or not ABSOLUTE_PATH.fullmatch(pidfile):
            raise UsageError(f"{PREFIX}signal-pidfile must be an absolute path with {PREFIX}on-change-signal")
        hooks["signal"] = {"name": signal, "pidfile": pidfile}
    if hooks:
        result["hooks"] = hooks
    return result


def _output_dir(path: str) -> str:
    if not ABSOLUTE_PATH.fullmatch(path) or "/../" in path + "/" or path.rstrip("/") in ("", "/"):
        raise UsageError(f"{PREFIX}output-dir must be an absolute directory path other than /, got {path!r}")
    clean = path.rstrip("/")
    for reserved in RESERVED_DIRS:
        if clean == reserved or clean.startswith(reserved + "/") or reserved.startswith(clean + "/"):
            raise UsageError(f"{PREFIX}output-dir {path!r} collides with {reserved}, which the agent uses")
    return clean


def from_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """The parameter annotations of a pod, prefix removed (the opt-in and marker left out)."""
    return {key.removeprefix(PREFIX): value for key, value in annotations.items()
            if key.startswith(PREFIX) and key not in (INJECT, INJECTED)}
