"""Injecting the agent into pods without editing their chart's templates.

    values.py       the chart's agent values (defaults = charts/sidecar/values.yaml), merged
    parameters.py   per-pod parameters (annotations, or helm-values flags) → values overrides
    builder.py      THE description of what injection adds (containers, volumes, mounts,
                    env), built from values exactly as charts/sidecar/templates/_sidecar.tpl
                    renders it; tests check the two stay equal
    mutate.py       a pod + an Injection → the injected pod (and the JSON Patch between them)
    review.py       AdmissionReview request → response (the webhook's decision)
    server.py       `config-agent inject`: the HTTPS admission webhook (uvicorn, TLS)
    helm_values.py  `config-agent helm-values`: the same Injection as Bitnami/Grafana values
"""

# Every annotation (and label) of ours starts with this. Here rather than in
# parameters.py so that the CLI's flag declarations (commands.py) need nothing else.
PREFIX = "config-agent.io/"
