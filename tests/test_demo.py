"""`config-agent demo` end to end: the real command, as a first-time user runs it.

No CONFIG_AGENT_DATABASE_URL / CONFIG_AGENT_REDIS_URL: the demo starts its own
PostgreSQL and Redis. We follow its printed instructions literally, then stop it
with SIGTERM and check that no process and no temporary directory is left.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.output import OutputLines
from tests.servers import free_port

START_TIMEOUT = 60.0


def _demo_binaries_missing() -> str | None:
    from agent.demo_servers import find_postgres_bin, find_redis_server
    from agent.errors import UsageError

    try:
        find_postgres_bin()
        find_redis_server()
    except UsageError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(_demo_binaries_missing() is not None,
                                reason=str(_demo_binaries_missing()))


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid → (ppid, start time) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def process_tree(root: int) -> dict[int, str]:
    """The process `root` and all its descendants: pid → start time (to spot pid reuse)."""
    table = _proc_table()
    found = {root: table[root][1]} if root in table else {}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, started) in table.items():
            if ppid in found and pid not in found:
                found[pid] = started
                grew = True
    return found


def still_running(tree: dict[int, str]) -> list[int]:
    """Pids of `tree` that still exist (same pid and start time), zombies excluded."""
    table = _proc_table()
    alive = []
    for pid, started in tree.items():
        if pid in table and table[pid][1] == started:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
    return alive


class Demo(OutputLines):
    """A running `python -m agent demo` whose stdout is read line by line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.facts: dict[str, str] = {}
        self.tries: list[str] = []
        super().__init__(proc)

    def on_line(self, line: str) -> None:
        if line.startswith("try: "):
            self.tries.append(line.removeprefix("try: "))
        elif ": " in line and not line[0].isdigit():
            name, _, value = line.partition(": ")
            self.facts.setdefault(name, value)

    def wait_for(self, predicate: Any, timeout: float) -> str:
        """The next output line for which `predicate(line)` holds."""
        line = self.next_line(predicate, timeout)
        if line is None:
            state = "exited" if self.proc.poll() is not None else "did not print the expected line"
            raise AssertionError(f"demo {state}; got {self.output}")
        return line

    def wait_ready(self) -> None:
        """Until the instructions are complete (the live view header follows them)."""
        self.wait_for(lambda line: line.startswith("Changes as the agent applies them"),
                      START_TIMEOUT)

    def try_starting(self, prefix: str) -> str:
        """The printed instruction that starts with `prefix`."""
        return next(t for t in self.tries if t.startswith(prefix))

    @property
    def temp_dir(self) -> Path:
        return Path(self.facts["temp dir"].split(" (")[0])

    def stop(self) -> int:
        """SIGTERM, then the exit code; the output is drained and the pipe closed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            self._reader.join(timeout=5)
            while True:
                try:
                    line = self.lines.get_nowait()
                except queue.Empty:
                    break
                if line is not None:
                    self.output.append(line)
            assert self.proc.stdout is not None
            self.proc.stdout.close()


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any CONFIG_AGENT_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update(extra)
    return env


@contextmanager
def demo(*args: str, env: dict[str, str] | None = None) -> Iterator[Demo]:
    """Start the demo, wait until it printed its instructions; kill it if the test failed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", *args],
        env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    running = Demo(proc)
    try:
        running.wait_ready()
        yield running
    finally:
        if proc.poll() is None:
            running.stop()
        elif proc.stdout is not None and not proc.stdout.closed:
            running.stop()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def get_over_socket(path: str, target: str) -> Any:
    """GET `target` over the agent's Unix socket (what `curl --unix-socket` does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def run_printed_command(command: str) -> subprocess.CompletedProcess[str]:
    """Run a `VAR=… VAR=… program args` line the way a shell would."""
    words = shlex.split(command)
    env = clean_env()
    while "=" in words[0] and not words[0].startswith(("/", "-")):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return subprocess.run(words, env=env, capture_output=True, text=True, timeout=60)


def wait_until(check: Any, timeout: float) -> float:
    """Poll `check()` until true; return the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - start


def test_demo_follows_its_own_instructions_and_cleans_up() -> None:
    port = free_port()
    started = time.monotonic()
    with demo("--http-port", str(port)) as d:
        startup = time.monotonic() - started
        assert startup < 30, f"demo took {startup:.1f}s to come up"
        url = d.try_starting("curl -s http").split()[-1]
        assert url == f"http://127.0.0.1:{port}/v1/configs"
        doc = get_json(url)
        assert doc["org_id"] == "acme"
        values = {(s, k): e["value"] for s, keys in doc["configs"].items() for k, e in keys.items()}
        assert values == {
            ("ai", "threshold"): 0.75,
            ("email", "max_retries"): 3,
            ("webhook", "url"): "https://old.example.com",
            ("features", "dark_mode"): False,
        }
        socket_path = shlex.split(d.try_starting("curl -s --unix-socket"))[3]
        assert get_over_socket(socket_path, "/v1/configs/ai/threshold")["value"] == 0.75
        files = Path(d.facts["files"])
        assert (files / "ai" / "threshold").read_text() == "0.75"
        tree = process_tree(d.proc.pid)
        assert len(tree) >= 3, "expected the demo plus PostgreSQL and Redis children"

        set_command = d.try_starting("CONFIG_AGENT_DATABASE_URL=")
        assert set_command.endswith("set acme ai threshold 0.9")
        result = run_printed_command(set_command)
        assert result.returncode == 0, result.stderr
        committed = time.monotonic()
        wait_until(lambda: get_json(f"{url}/ai/threshold")["value"] == 0.9, 1.0)
        wait_until(lambda: (files / "ai" / "threshold").read_text() == "0.9", 1.0 -
                   (time.monotonic() - committed))
        line = d.wait_for(lambda line: "ai.threshold = 0.9" in line, 5)
        assert " v2 " in f"{line} " and "commit→applied" in line

        temp_dir = d.temp_dir
        assert temp_dir.is_dir()
        tree = process_tree(d.proc.pid) | tree
        assert d.stop() == 0
    assert d.output[-1] == f"demo stopped; removed {temp_dir}"
    assert not temp_dir.exists()
    assert still_running(tree) == [], "demo left processes behind"


def test_second_demo_starts_right_after_the_first() -> None:
    port = free_port()
    for _ in range(2):
        with demo("--http-port", str(port)) as d:
            assert get_json(f"http://127.0.0.1:{port}/v1/configs")["revision"] == 4
            tree = process_tree(d.proc.pid)
            assert d.stop() == 0
        assert still_running(tree) == []
        assert not d.temp_dir.exists()


def test_busy_http_port_is_replaced_by_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with demo("--http-port", str(busy)) as d:
            assert any(line.startswith(f"note: HTTP port {busy} is in use") for line in d.output)
            url = d.facts["http"]
            assert url != f"http://127.0.0.1:{busy}"
            assert get_json(f"{url}/v1/configs")["org_id"] == "acme"
            assert d.stop() == 0


def test_sigterm_while_starting_still_cleans_up() -> None:
    # A short TMPDIR of our own: the demo's temp dir must be gone from it afterwards
    # (and the agent's Unix socket path must stay under the 107-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="cad-"))
    tmp.chmod(0o755)  # when root, the demo's PostgreSQL account must enter it
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--http-port", str(free_port())],
        env=clean_env(TMPDIR=str(tmp)), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )
    d = Demo(proc)
    try:
        # Stop it as soon as it has a child (initdb or PostgreSQL): mid-start.
        tree: dict[int, str] = {}

        def has_child() -> bool:
            assert proc.poll() is None, "the demo exited by itself"
            tree.update(process_tree(proc.pid))
            return len(tree) > 1

        wait_until(has_child, 30)
        proc.send_signal(signal.SIGTERM)
        assert d.stop() == 0
        assert still_running(tree) == []
        assert list(tmp.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_demo_uses_configured_servers_and_seeds_only_once(db_url: str, redis_url: str,
                                                           org: str) -> None:
    env = clean_env(CONFIG_AGENT_DATABASE_URL=db_url, CONFIG_AGENT_REDIS_URL=redis_url,
                    CONFIG_AGENT_ORG_ID=org)
    with demo("--http-port", str(free_port()), env=env) as d:
        assert "PostgreSQL from CONFIG_AGENT_DATABASE_URL" in d.output[0]
        assert "Redis from CONFIG_AGENT_REDIS_URL" in d.output[0]
        assert not (d.temp_dir / "pg").exists()
        set_command = d.try_starting("CONFIG_AGENT_DATABASE_URL=")
        assert f"set {org} ai threshold 0.9" in set_command
        assert run_printed_command(set_command).returncode == 0
        d.wait_for(lambda line: "ai.threshold = 0.9" in line, 5)
        assert d.stop() == 0
    with demo("--http-port", str(free_port()), env=env) as d:
        # The org already had entries: not seeded again, the change survives.
        doc = get_json(d.facts["http"] + "/v1/configs")
        assert doc["configs"]["ai"]["threshold"]["value"] == 0.9
        assert d.stop() == 0


def test_unreachable_database_is_one_line_and_exit_1() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cad-"))
    tmp.chmod(0o755)  # else, as root, the demo would fall back to /tmp
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agent", "demo", "--http-port", str(free_port())],
            env=clean_env(TMPDIR=str(tmp), CONFIG_AGENT_DATABASE_URL=(
                f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")),
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 1
        assert result.stderr.startswith("config-agent: error: cannot connect to PostgreSQL")
        assert len(result.stderr.strip().splitlines()) == 1
        assert list(tmp.iterdir()) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux only")
def test_servers_die_with_a_killed_demo() -> None:
    """Even SIGKILL (no cleanup code runs) leaves no PostgreSQL or Redis behind."""
    with demo("--http-port", str(free_port())) as d:
        children = {pid: started for pid, started in process_tree(d.proc.pid).items()
                    if pid != d.proc.pid}
        d.proc.kill()
        d.stop()
        wait_until(lambda: still_running(children) == [], 15)
        # The directory is left behind in this case; tidy up after the test.
        shutil.rmtree(d.temp_dir, ignore_errors=True)
