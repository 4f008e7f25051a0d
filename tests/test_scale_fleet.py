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
def test_200_agents_direct_against_50_connections_all_converge_and_leave_room_for_another_client(
        tmp_path: Path) -> None:
    """Direct connections, more agents than slots: nobody starves, other clients keep a slot.

    Each change costs ~157 new backends here (43 slots for 200 agents), so convergence is
    bounded by the server's connect cost (~5 s on this 2-core machine even with no refusal,
    see docs/benchmarks.md); the < 5 s target holds with PgBouncer (the test below). The
    reader role's CONNECTION LIMIT (grant-reader --connection-limit) keeps slots for others.
    """
    run = run_scale(tmp_path, "direct", "--reader-connection-limit", "35", "--start-timeout", "90",
                    "--timeout", "15")
    assert run["missed"] == 0, f"{run['missed']} agent-changes not applied 15 s after the last change"
    assert run["last_agent_ms"]["max"] < 15000, run["last_agent_ms"]
    # Another role connected every 100 ms from the first change until every agent had the last.
    # One attempt can take over a second while 150 backends start, and a fast run ends in
    # under 3 s: at least one attempt per change, none refused.
    assert run["probe"]["attempts"] >= 3, run["probe"]
    assert run["probe"]["failures"] == 0, run["probe"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_200_agents_through_pgbouncer_against_50_connections_converge_within_5s(tmp_path: Path) -> None:
    """The recommended topology: 200 agents, max_connections = 50, PgBouncer in transaction mode."""
    run = run_scale(tmp_path, "pgbouncer", "--pool-size", "20", "--start-timeout", "90", "--timeout", "15")
    assert run["missed"] == 0
    assert run["last_agent_ms"]["max"] < 5000, run["last_agent_ms"]
    assert run["errors_start"]["prepared_statement"] == run["errors_changes"]["prepared_statement"] == 0
    assert run["errors_start"]["lines"] == run["errors_changes"]["lines"] == 0
    # The server sees PgBouncer's pool, not the fleet.
    assert run["max_reader_connections"] <= 20
    assert run["probe"]["failures"] == 0
