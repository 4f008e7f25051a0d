"""A `config-agent run` process imports only what it uses (issue #21: a small sidecar).

Every module a pod's agent imports costs it memory and start time, so the agent
must not load what only other commands, or rarely used routes, need: the writer,
the injector and YAML, the demo, pydantic, the flag evaluator until a flag is
evaluated, the OpenAPI document until it is asked for. The test starts a real
agent with PYTHONPROFILEIMPORTTIME=1 (`-X importtime`: one stderr line per module,
also for imports done later at run time), uses it, and reads the lines. No time or
RSS bound here: bench/bench_footprint.py measures those.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import anyio

from agent.db.writer import ConfigWriter
from tests.servers import agent_process, free_port

# Whole libraries (any of their modules) an idle agent must not import.
UNUSED_LIBRARIES = {
    "pydantic", "pydantic_core", "pydantic_settings",  # settings are parsed without them
    "yaml", "jsonpatch",                                 # helm-values, the webhook
    "jsonschema", "referencing",                         # flag definitions are checked by writers
    "openfeature", "json_logic", "semver", "mmh3",       # the flag evaluator: on the first evaluation
}
# Our modules that other commands or rarely used routes need.
UNUSED_MODULES = {
    "agent.db.writer", "agent.db.migrate", "agent.db.roles", "agent.relay",
    "agent.demo", "agent.demo_servers", "agent.demo_view",
    "agent.inject.builder", "agent.inject.helm_values", "agent.inject.mutate",
    "agent.inject.parameters", "agent.inject.review", "agent.inject.server", "agent.inject.values",
    "agent.flags.evaluate", "agent.flags.flagset", "agent.flags.openapi", "agent.sinks.openapi",
}
FLAG = {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on"}


async def _seed(db_url: str, org: str) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        await writer.set(org, "ai", "threshold", 0.75, actor="test")
        # A flag service with an entry: still nothing of the evaluator until one is evaluated.
        await writer.set(org, "features", "new-ui", FLAG, actor="test")


def imported(log: Path) -> list[str]:
    """The modules named by the `import time:` lines of `log`, in import order."""
    names = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("import time:") and "imported package" not in line:
            names.append(line.rsplit("|", 1)[1].strip())
    return names


def unused(names: list[str]) -> list[str]:
    return sorted({n for n in names if n.split(".")[0] in UNUSED_LIBRARIES or n in UNUSED_MODULES})


def get(url: str, body: dict[str, object] | None = None) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
        document: dict[str, object] = json.loads(resp.read())
        return document


def test_an_agent_imports_the_evaluator_and_the_openapi_document_only_when_used(
        db_url: str, redis_url: str, org: str, tmp_path: Path) -> None:
    anyio.run(_seed, db_url, org)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({
        "PYTHONPROFILEIMPORTTIME": "1",
        "CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
        "CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_HTTP_PORT": str(port),
        "CONFIG_AGENT_METRICS_HOST": "127.0.0.1", "CONFIG_AGENT_METRICS_PORT": str(free_port()),
        "CONFIG_AGENT_OUTPUT_DIR": str(tmp_path / "out"),
        "CONFIG_AGENT_LOG_LEVEL": "warning",
    })
    log = tmp_path / "agent.log"
    with agent_process(env, url, log):
        assert get(f"{url}/v1/configs/ai/threshold")["value"] == 0.75
        idle = imported(log)
        assert "agent.app" in idle and "uvicorn" in idle, "no import lines: is -X importtime on?"
        assert unused(idle) == []

        evaluated = get(f"{url}/ofrep/v1/evaluate/flags/new-ui", {"context": {}})
        assert evaluated["value"] is True
        assert "openapi" in get(f"{url}/openapi.json")
        later = imported(log)[len(idle):]
    # What the two requests loaded, on demand: the evaluator and the OpenAPI document.
    assert {"agent.flags.flagset", "openfeature", "agent.sinks.openapi"} <= set(later), later
