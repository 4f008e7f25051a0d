"""The examples in examples/ against a real `config-agent run`: each must see a change.

Every test starts the agent as a subprocess (real PostgreSQL and Redis), starts
an example as a subprocess, waits until it printed the current value, changes
the value with the CLI, and waits (bounded) for the example to print the new one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from agent.db.writer import ConfigWriter
from tests.output import OutputLines
from tests.servers import agent_process, free_port, run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEEN_WITHIN = 10.0


@dataclass(frozen=True)
class RunningAgent:
    """Where a test's agent serves, and how to change its values."""

    url: str
    socket_path: Path
    output_dir: Path
    db_url: str
    redis_url: str
    org: str

    def set(self, service: str, key: str, value: str) -> None:
        """`config-agent set` as a user types it (publishes to Redis directly)."""
        run_cli("set", self.org, service, key, value, check=True,
                env={"CONFIG_AGENT_DATABASE_URL": self.db_url,
                     "CONFIG_AGENT_REDIS_URL": self.redis_url})

    def value(self, service: str, key: str) -> str:
        with urllib.request.urlopen(f"{self.url}/v1/configs/{service}/{key}?format=raw",
                                    timeout=5) as resp:
            return str(resp.read().decode())


async def _seed(db_url: str, org: str) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        await writer.set(org, "ai", "threshold", 0.75, actor="test")
        await writer.set(org, "webhook", "url", "https://old.example.com", actor="test")


@pytest.fixture
def agent(db_url: str, redis_url: str, org: str, tmp_path: Path) -> Iterator[RunningAgent]:
    """`python -m agent run` serving HTTP, a Unix socket and files; stopped with SIGTERM."""
    anyio.run(_seed, db_url, org)
    # A short directory for the socket: Unix socket paths are limited to 107 bytes.
    short = Path(tempfile.mkdtemp(prefix="cae-"))
    port = free_port()
    running = RunningAgent(f"http://127.0.0.1:{port}", short / "agent.sock", tmp_path / "out",
                           db_url, redis_url, org)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({
        "CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
        "CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_HTTP_PORT": str(port),
        "CONFIG_AGENT_METRICS_PORT": str(free_port()),
        "CONFIG_AGENT_OUTPUT_DIR": str(running.output_dir),
        "CONFIG_AGENT_SOCKET_PATH": str(running.socket_path),
    })
    try:
        with agent_process(env, running.url, tmp_path / "agent.log"):
            yield running
    finally:
        shutil.rmtree(short, ignore_errors=True)


class Example(OutputLines):
    """An example program running as a subprocess; its stdout is read line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_")}
        full_env.update(env)
        super().__init__(subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))

    def expect(self, text: str, timeout: float = SEEN_WITHIN) -> str:
        """Wait for an output line containing `text`."""
        line = self.next_line(lambda candidate: text in candidate, timeout)
        if line is None:
            raise AssertionError(f"{text!r} not printed within {timeout}s; got {self.output}")
        return line

    def stop(self) -> str:
        """Stop the example; return its stderr (pipes closed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err


@contextmanager
def example(argv: list[str], env: dict[str, str]) -> Iterator[Example]:
    running = Example(argv, env)
    try:
        yield running
    finally:
        running.stop()


def test_python_longpoll_prints_the_new_value(agent: RunningAgent) -> None:
    argv = [sys.executable, str(EXAMPLES / "python" / "longpoll.py"), "ai", "threshold"]
    with example(argv, {"CONFIG_AGENT_URL": agent.url}) as ex:
        ex.expect("ai.threshold = 0.75 (version 1)")
        agent.set("ai", "threshold", "0.9")
        ex.expect("ai.threshold = 0.9 (version 2)")
        # The filter holds: another entry's change prints nothing.
        agent.set("webhook", "url", '"https://new.example.com"')
        agent.set("ai", "threshold", "0.95")
        ex.expect("ai.threshold = 0.95 (version 3)")
        assert not any("webhook" in line for line in ex.output)


def test_python_watch_files_reloads_on_the_data_swap(agent: RunningAgent) -> None:
    argv = [sys.executable, str(EXAMPLES / "python" / "watch_files.py"), str(agent.output_dir)]
    with example(argv, {}) as ex:
        ex.expect("ai.threshold = 0.75")
        ex.expect("# watching")
        agent.set("ai", "threshold", "0.9")
        ex.expect(": ai.threshold = 0.9")
        agent.set("webhook", "url", '"https://new.example.com"')
        ex.expect(': webhook.url = "https://new.example.com"')


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
@pytest.mark.parametrize("transport", ["tcp", "socket"])
def test_node_watch_follows_the_event_stream(agent: RunningAgent, transport: str) -> None:
    env = {"CONFIG_AGENT_URL": agent.url}
    if transport == "socket":
        env["CONFIG_AGENT_SOCKET"] = str(agent.socket_path)
    node = shutil.which("node") or "node"
    with example([node, str(EXAMPLES / "node" / "watch.mjs")], env) as ex:
        ex.expect("# read ai.threshold once: 0.75")
        # From the stream's first `snapshot` event: the watch is connected.
        ex.expect("ai.threshold = 0.75 (version 1)")
        agent.set("ai", "threshold", "0.9")
        ex.expect("change: ai.threshold = 0.9 (version 2,")
        run_cli("delete", agent.org, "webhook", "url", check=True,
                env={"CONFIG_AGENT_DATABASE_URL": agent.db_url,
                     "CONFIG_AGENT_REDIS_URL": agent.redis_url})
        ex.expect("change: webhook.url deleted (version 2,")


def _read_sh(agent: RunningAgent) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_")}
    env.update({"CONFIG_AGENT_URL": agent.url, "CONFIG_AGENT_SOCKET": str(agent.socket_path),
                "CONFIG_DIR": str(agent.output_dir)})
    result = subprocess.run(["sh", str(EXAMPLES / "shell" / "read.sh")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_shell_reads_over_tcp_socket_file_and_env(agent: RunningAgent) -> None:
    assert _read_sh(agent) == {"tcp": "0.75", "socket": "0.75", "file": "0.75", "env": "0.75"}
    agent.set("ai", "threshold", "0.9")
    deadline = time.monotonic() + SEEN_WITHIN
    while _read_sh(agent) != {"tcp": "0.9", "socket": "0.9", "file": "0.9", "env": "0.9"}:
        assert time.monotonic() < deadline, _read_sh(agent)
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_shell_env_file_is_safe_to_source(agent: RunningAgent) -> None:
    nasty = "it's $(touch pwned) `id` \"quoted\""
    run_cli("set", agent.org, "webhook", "url", "--string", nasty, check=True,
            env={"CONFIG_AGENT_DATABASE_URL": agent.db_url, "CONFIG_AGENT_REDIS_URL": agent.redis_url})
    deadline = time.monotonic() + SEEN_WITHIN
    while agent.value("webhook", "url") != nasty or "pwned" not in (
        agent.output_dir / "configs.env"
    ).read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    script = f'set -a; . "{agent.output_dir}/configs.env"; set +a; printf %s "$WEBHOOK_URL"'
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10,
                            cwd=agent.output_dir.parent)
    assert result.stdout == nasty
    assert not (agent.output_dir.parent / "pwned").exists()
