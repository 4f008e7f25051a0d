"""Real OpenFeature clients against a real agent: flags over OFREP, written with the CLI.

`python -m agent run` runs as a subprocess against the shared PostgreSQL and Redis;
the OpenFeature Python SDK with the PyPI `openfeature-provider-ofrep` provider (and,
in the Node test, the npm `@openfeature/server-sdk` with `@openfeature/ofrep-provider`,
examples/node/flags.mjs) evaluate the flags. Nobody here wrote those clients: what
they accept is what the agent must answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.contrib.tools.flagd.core import FlagdCore
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from agent.db.writer import ConfigWriter
from tests.servers import agent_process, free_port, run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROLLOUT_KEYS = 10_000
# The Python and Node server providers keep no cache: a write is seen by the next evaluation.
SEEN_WITHIN = 2.0

ROLLOUT = {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off",
           "targeting": {"fractional": [["on", 50], ["off", 50]]}}
THEME = {"state": "ENABLED", "variants": {"acme": "blue", "others": "grey"}, "defaultVariant": "others",
         "targeting": {"if": [{"ends_with": [{"var": "email"}, "@acme.com"]}, "acme", None]}}
FLAGS: dict[str, Any] = {
    "dark-mode": True,
    "greeting": "hello",
    "max-items": 25,
    "ratio": 0.5,
    "limits": {"rpm": 100, "burst": [1, 2]},
    "theme": THEME,
    "rollout": ROLLOUT,
}


@dataclass(frozen=True)
class FlagAgent:
    """A running agent and how to write to its org."""

    url: str
    db_url: str
    redis_url: str
    org: str

    def set(self, key: str, value: str) -> subprocess.CompletedProcess[str]:
        """`config-agent set ORG features KEY VALUE`, as a user types it."""
        return run_cli("set", self.org, "features", key, value,
                       env={"CONFIG_AGENT_DATABASE_URL": self.db_url, "CONFIG_AGENT_REDIS_URL": self.redis_url})


async def _seed(db_url: str, org: str) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        for key, value in FLAGS.items():
            await writer.set(org, "features", key, value, actor="test")
        await writer.set(org, "ai", "threshold", 0.75, actor="test")


@pytest.fixture
def flag_agent(db_url: str, redis_url: str, org: str, tmp_path: Path) -> Iterator[FlagAgent]:
    """`python -m agent run` with the flags seeded; stopped with SIGTERM."""
    anyio.run(_seed, db_url, org)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({"CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
                "CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_HTTP_PORT": str(port),
                "CONFIG_AGENT_METRICS_PORT": str(free_port())})
    url = f"http://127.0.0.1:{port}"
    with agent_process(env, url, tmp_path / "agent.log"):
        yield FlagAgent(url, db_url, redis_url, org)
    log_text = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log_text and "ERROR" not in log_text, log_text


@pytest.fixture
def client(flag_agent: FlagAgent) -> Iterator[OpenFeatureClient]:
    """An OpenFeature client whose provider is the PyPI OFREP provider, pointed at the agent."""
    api.set_provider(OFREPProvider(base_url=flag_agent.url, timeout=5))
    yield api.get_client()
    api.shutdown()


def wait_for(read: Any, expected: Any, timeout: float = SEEN_WITHIN) -> float:
    """Evaluate `read()` until it returns `expected`; return the seconds it took."""
    start = time.monotonic()
    while (got := read()) != expected:
        assert time.monotonic() - start < timeout, f"still {got!r}, not {expected!r}, after {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - start


def library_rollout(keys: list[str]) -> list[str]:
    """The keys flagd's evaluator library itself puts on `on`, computed here without the agent."""
    core = FlagdCore()
    core.set_flags({"flags": {"rollout": ROLLOUT}})
    return [key for key in keys if core.resolve_boolean_value("rollout", False, EvaluationContext(key)).value]


def rollout_digest(on_keys: list[str]) -> str:
    """The same digest examples/node/flags.mjs prints: which keys got `on`."""
    return hashlib.sha256("\n".join(sorted(on_keys)).encode()).hexdigest()[:16]


def test_python_sdk_evaluates_every_type_and_sees_cli_changes(flag_agent: FlagAgent,
                                                              client: OpenFeatureClient) -> None:
    assert client.get_boolean_value("dark-mode", False) is True
    assert client.get_string_value("greeting", "x") == "hello"
    assert client.get_integer_value("max-items", 0) == 25
    assert client.get_float_value("ratio", 0.0) == 0.5
    assert client.get_object_value("limits", {}) == {"rpm": 100, "burst": [1, 2]}
    details = client.get_boolean_details("dark-mode", False)
    assert details.reason == Reason.STATIC and details.variant == "static"
    assert details.flag_metadata == {"flagSetId": "features", "version": "1"}

    # Unknown flags and type mismatches: the code default, with the error the SDK reports.
    missing = client.get_boolean_details("no-such-flag", True)
    assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    mismatch = client.get_boolean_details("greeting", False)
    assert (mismatch.value, mismatch.error_code) == (False, ErrorCode.TYPE_MISMATCH)
    keyless = client.get_boolean_details("rollout", False)
    assert (keyless.value, keyless.error_code) == (False, ErrorCode.TARGETING_KEY_MISSING)

    # Targeting by a context attribute.
    ann = EvaluationContext("ann", {"email": "ann@acme.com"})
    bob = EvaluationContext("bob", {"email": "bob@example.com"})
    theme = client.get_string_details("theme", "none", ann)
    assert (theme.value, theme.variant, theme.reason) == ("blue", "acme", Reason.TARGETING_MATCH)
    assert client.get_string_value("theme", "none", bob) == "grey"

    # `config-agent set` → the SDK sees it (the provider keeps no cache; the agent applies in ms).
    assert flag_agent.set("greeting", '"bonjour"').returncode == 0
    took = wait_for(lambda: client.get_string_value("greeting", "x"), "bonjour")
    print(f"greeting seen by the SDK {took * 1000:.0f} ms after `set` returned")
    new_theme = dict(THEME, targeting={"if": [{"starts_with": [{"var": "email"}, "bob@"]}, "acme", None]})
    assert flag_agent.set("theme", json.dumps(new_theme)).returncode == 0
    wait_for(lambda: client.get_string_value("theme", "none", bob), "blue")
    assert client.get_string_value("theme", "none", ann) == "grey"
    disabled = dict(THEME, state="DISABLED")
    assert flag_agent.set("theme", json.dumps(disabled)).returncode == 0
    wait_for(lambda: client.get_string_details("theme", "code-default", ann).error_code,
             ErrorCode.FLAG_NOT_FOUND)
    assert client.get_string_value("theme", "code-default", ann) == "code-default"


def test_cli_refuses_an_invalid_flag_definition_in_one_line(flag_agent: FlagAgent,
                                                            client: OpenFeatureClient) -> None:
    bad = {
        '{"state": "ON", "variants": {"a": true}, "defaultVariant": "a"}': "state: 'ON' is not one of",
        '{"state": "ENABLED", "variants": {"a": true, "b": 1}, "defaultVariant": "a"}': "variants must be",
        '{"state": "ENABLED", "variants": {"a": true}, "defaultVariant": "c"}': "defaultVariant 'c'",
        '{"state": "ENABLED", "variants": {"a": true}, "defaultVariant": "a", "targeting": {"nope": 1}}':
            "targeting",
    }
    for value, message in bad.items():
        proc = flag_agent.set("dark-mode", value)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("config-agent: error: invalid flag definition "
                                                       "features/dark-mode: "), proc.stderr
        assert message in lines[0]
    # Nothing was written: the flag is unchanged; outside the flag services any object goes.
    assert client.get_boolean_value("dark-mode", False) is True
    proc = run_cli("set", flag_agent.org, "ai", "rules", '{"state": "ON"}',
                   env={"CONFIG_AGENT_DATABASE_URL": flag_agent.db_url})
    assert proc.returncode == 0, proc.stderr


def test_python_sdk_fractional_rollout_is_even_and_stable(flag_agent: FlagAgent,
                                                          client: OpenFeatureClient) -> None:
    keys = [f"user-{i}" for i in range(ROLLOUT_KEYS)]
    start = time.monotonic()
    on = [key for key in keys if client.get_boolean_value("rollout", False, EvaluationContext(key))]
    took = time.monotonic() - start
    share = len(on) / ROLLOUT_KEYS
    print(f"rollout: {share:.2%} on over {ROLLOUT_KEYS} keys, {ROLLOUT_KEYS / took:.0f} SDK evaluations/s")
    assert 0.48 <= share <= 0.52, share
    # Stable per key: again, after an unrelated write, and in the bulk answer.
    assert flag_agent.set("greeting", '"hi"').returncode == 0
    wait_for(lambda: client.get_string_value("greeting", "x"), "hi")
    again = [key for key in keys[:2000] if client.get_boolean_value("rollout", False, EvaluationContext(key))]
    assert again == [key for key in on if int(key.split("-")[1]) < 2000]
    assert rollout_digest(on) == rollout_digest(library_rollout(keys))


def _node_ready() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is not installed (scripts/test installs Debian's nodejs and npm)")
    if not (EXAMPLES / "node" / "node_modules" / "@openfeature" / "ofrep-provider").is_dir():
        pytest.fail("examples/node has no node_modules: run `npm ci` in examples/node (scripts/test does)")
    return node


def test_node_sdk_evaluates_flags_and_sees_cli_changes(flag_agent: FlagAgent) -> None:
    node = _node_ready()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_")}
    env["CONFIG_AGENT_URL"] = flag_agent.url
    proc = subprocess.Popen([node, str(EXAMPLES / "node" / "flags.mjs"), "--watch", "greeting"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("watching greeting") for line in lines):
            line = proc.stdout.readline()
            assert line, f"flags.mjs ended: {lines} {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line.strip())
            assert time.monotonic() < deadline
        output = "\n".join(lines)
        for expected in ("dark-mode = true (STATIC)", "greeting = hello (STATIC)", "max-items = 25 (STATIC)",
                         'limits = {"rpm":100,"burst":[1,2]} (STATIC)',
                         "theme for ann@acme.com = blue (TARGETING_MATCH, acme)",
                         "theme for bob@example.com = grey (DEFAULT, others)",
                         "no-such-flag = fallback (FLAG_NOT_FOUND)", "greeting as boolean = false (TYPE_MISMATCH)"):
            assert expected in output, output
        rollout = next(line for line in lines if line.startswith("rollout:"))
        print(rollout)
        on = int(rollout.split()[1])
        assert abs(on / ROLLOUT_KEYS - 0.5) <= 0.02, rollout
        # The same keys land on the same variant whichever SDK asks.
        keys = [f"user-{i}" for i in range(ROLLOUT_KEYS)]
        assert f"digest {rollout_digest(library_rollout(keys))}" in rollout, rollout
        assert flag_agent.set("greeting", '"bonjour"').returncode == 0
        start = time.monotonic()
        while (line := proc.stdout.readline().strip()) != "greeting = bonjour":
            assert line and time.monotonic() - start < SEEN_WITHIN + 1, line
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()



def test_bulk_polling_with_etag_sees_cli_changes(flag_agent: FlagAgent) -> None:
    """What a static-context (client-side) provider does: poll the bulk endpoint with If-None-Match."""
    body = json.dumps({"context": {"targetingKey": "ann", "email": "ann@acme.com"}}).encode()

    def poll(etag: str | None) -> tuple[int, str, dict[str, Any]]:
        headers = {"Content-Type": "application/json", **({"If-None-Match": etag} if etag else {})}
        request = urllib.request.Request(f"{flag_agent.url}/ofrep/v1/evaluate/flags", data=body, method="POST",
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.headers["ETag"], {f["key"]: f for f in json.loads(resp.read())["flags"]}
        except urllib.error.HTTPError as exc:  # urllib raises on 304
            assert exc.code == 304, exc.code
            etag_back = exc.headers["ETag"]
            exc.close()
            return 304, etag_back, {}

    status, etag, flags = poll(None)
    assert status == 200 and flags["theme"]["value"] == "blue" and flags["greeting"]["value"] == "hello"
    assert poll(etag)[0] == 304
    assert flag_agent.set("greeting", '"bonjour"').returncode == 0
    start = time.monotonic()
    while (answer := poll(etag))[0] == 304:
        assert time.monotonic() - start < SEEN_WITHIN
        time.sleep(0.01)
    assert answer[1] != etag and answer[2]["greeting"]["value"] == "bonjour"
    print(f"bulk poll saw the change {(time.monotonic() - start) * 1000:.0f} ms after `set` returned")
