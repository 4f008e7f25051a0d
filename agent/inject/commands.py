"""The `inject` and `helm-values` commands: their flags and what they run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from agent.errors import UsageError
from agent.inject import PREFIX

# The commands import what they run: every CLI process (`run` in every pod included)
# builds the parser, and needs no more of the injector than these flags.

# The values layouts of `helm-values --style` (helm_values.values_for).
STYLES = ("bitnami", "grafana")

# helm-values flags → the parameter (annotation) names of parameters.py.
PARAMETER_FLAGS = (
    ("--org", "org", "ORG", "the tenant (required: there is no namespace to derive it from)"),
    ("--services", "services", "A,B", "comma-separated service filter (default: all)"),
    ("--mode", "mode", "native|classic", "native (default; Kubernetes >= 1.29) or classic"),
    ("--output-dir", "output-dir", "DIR", "directory of the shared file set (default /etc/config-agent)"),
    ("--on-change-webhook", "on-change-webhook", "URL", "local URL POSTed after the files changed"),
    ("--on-change-exec", "on-change-exec", "COMMAND", "shell command run in the agent container after a change"),
    ("--on-change-signal", "on-change-signal", "SIGNAL", "signal (e.g. HUP) sent to the pid in --signal-pidfile"),
    ("--signal-pidfile", "signal-pidfile", "FILE", "file holding the pid to signal"),
)


def add_parsers(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `inject` and `helm-values` to the CLI's subcommands."""
    text = ("serve the mutating admission webhook (HTTPS) that injects the agent into pods labelled "
            f"{PREFIX}inject: \"true\"")
    p = sub.add_parser("inject", help=text, description=text + "; parameters come from the pod's "
                       f"{PREFIX}* annotations, defaults from --values")
    common(p)
    p.add_argument("--tls-cert-file", type=Path, required=True, metavar="FILE",
                   help="PEM certificate (chain) to serve; re-read within 30 s when it changes")
    p.add_argument("--tls-key-file", type=Path, required=True, metavar="FILE",
                   help="PEM private key of the certificate")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8443, help="HTTPS port (default 8443)")
    _values_flag(p)

    text = "print Helm values that inject the agent through a chart's sidecar/extraVolumes values"
    p = sub.add_parser("helm-values", help=text, description=text + " (Bitnami-style or Grafana's)")
    common(p)
    for flag, name, metavar, help_text in PARAMETER_FLAGS:
        p.add_argument(flag, dest=f"param_{name}", metavar=metavar, default=None, required=flag == "--org",
                       help=f"{help_text} [annotation {PREFIX}{name}]")
    p.add_argument("--style", choices=STYLES, default="bitnami",
                   help="bitnami: initContainers/sidecars/extraVolumes/extraVolumeMounts/extraEnvVars; "
                        "grafana: extraInitContainers/extraContainers (a string)/extraContainerVolumes/"
                        "extraVolumeMounts/env (default bitnami)")
    _values_flag(p)


def _values_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--values", dest="agent_values", type=Path, default=None, metavar="FILE",
                   help="JSON file of the chart's agent values (image, Secret references, ports, …) "
                        "laid over charts/sidecar/values.yaml's defaults")


def cmd_helm_values(args: argparse.Namespace) -> int:
    """`config-agent helm-values`: print the values YAML."""
    from agent.inject.builder import build
    from agent.inject.helm_values import to_yaml, values_for
    from agent.inject.parameters import overrides
    from agent.inject.values import load_values, merged

    params = {name: getattr(args, f"param_{name}") for _, name, _, _ in PARAMETER_FLAGS
              if getattr(args, f"param_{name}") is not None}
    try:
        values = merged(load_values(args.agent_values), overrides(params, namespace=None))
    except UsageError as exc:  # the same checks as the annotations; name the flag instead
        raise UsageError(str(exc).replace(PREFIX, "--")) from exc
    print(to_yaml(values_for(build(values), args.style)), end="")
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    """`config-agent inject`: serve until SIGTERM."""
    from agent.cli import run_async
    from agent.inject.server import Tls, serve
    from agent.inject.values import load_values

    values = load_values(args.agent_values)
    tls = Tls(args.tls_cert_file, args.tls_key_file)

    async def go() -> None:
        await serve(values, tls, args.host, args.port)

    run_async(go)
    return 0
