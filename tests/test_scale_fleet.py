"""Issue #10's must-holds that need a fleet: 200 agents, PostgreSQL with 50 connection slots.

Each test runs `python -m bench.bench_scale` for one scenario, so the benchmark and these
checks are one piece of code, and asserts on the JSON it writes (see that module for
what is measured and how). The agents', relay's and server's logs of the run stay in
the test's tmp_path (`logs/`). Real servers started by the benchmark: PostgreSQL 15,
redis-server, pgbouncer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.bench_scale import DEFAULT_JITTER

ROOT = Path(__file__).resolve().parent.parent
AGENTS = 200
MAX_CONNECTIONS = 50


def run_scale(tmp_path: Path, scenario: str, *extra: str) -> dict[str, Any]:
    """One run of one scenario with 200 agents and 3 changes; its result, printed too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env["BENCH_RESULTS_DIR"] = str(tmp_path)
    argv = [sys.executable, "-m", "bench.bench_scale", "--scenario", scenario, "--jitters", str(DEFAULT_JITTER),
            "--agents", str(AGENTS), "--max-connections", str(MAX_CONNECTIONS), "--changes", "3", "--runs", "1",
            "--keep-logs", str(tmp_path / "logs"), *extra]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=165)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (case,) = json.loads((tmp_path / "scale.json").read_text())["cases"]
    run: dict[str, Any] = case["runs"][0]
    print({k: v for k, v in run.items() if k != "per_change"})
    return run


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_200_agents_against_50_connections_converge_within_5s_and_leave_room_for_another_client(
        tmp_path: Path) -> None:
    # The agents as deployed (default settings); the start is bounded so that a fleet that
    # cannot start fails here within the time budget instead of hanging.
    run = run_scale(tmp_path, "direct", "--start-timeout", "90", "--timeout", "15")
    assert run["missed"] == 0, f"{run['missed']} agent-changes not applied 15 s after the last change"
    assert run["last_agent_ms"]["max"] < 5000, run["last_agent_ms"]
    # Another role connected every 100 ms from the first change until every agent had the last.
    assert run["probe"]["attempts"] >= 10
    assert run["probe"]["failures"] == 0, run["probe"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_200_agents_through_pgbouncer_converge_without_prepared_statement_errors(tmp_path: Path) -> None:
    run = run_scale(tmp_path, "pgbouncer", "--pool-size", "20", "--start-timeout", "90", "--timeout", "15")
    assert run["missed"] == 0
    assert run["errors_start"]["prepared_statement"] == run["errors_changes"]["prepared_statement"] == 0
    assert run["errors_start"]["lines"] == run["errors_changes"]["lines"] == 0
    # The server sees PgBouncer's pool, not the fleet.
    assert run["max_reader_connections"] <= 20
    assert run["probe"]["failures"] == 0
