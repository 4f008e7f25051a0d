"""The benchmarks keep working: each bench command in --smoke mode, and the JSON it writes.

Needs the same servers as the benchmarks (PostgreSQL 15 server binaries, redis-server)
and etcd (Debian `etcd-server`): a missing etcd fails here, it is never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = {"n", "p50", "p90", "p99", "max", "mean"}


def run_bench(name: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env["BENCH_RESULTS_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", f"bench.bench_{name}", "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| " in proc.stdout  # the table
    doc = json.loads((tmp_path / f"{name}.smoke.json").read_text())
    assert doc["smoke"] is True and doc["machine"]["nproc"] >= 1
    return doc


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_propagation_smoke(tmp_path: Path) -> None:
    doc = run_bench("propagation", tmp_path)
    for row in doc["in_process"]:
        assert SUMMARY <= row["commit_to_applied_ms"].keys()
        assert row["redis_publish_to_receive_ms"]["n"] > 0
        assert row["writer_transaction_ms"]["n"] > 0
        assert row["queries_per_change_agent_counter"] == 1
    assert {"queries", "cpu_percent", "rss_mib"} <= doc["idle"].keys()
    assert doc["idle"]["queries"] == 0
    for row in doc["fleet"]:
        assert row["timeouts"] == 0
        for field in ("last_applied_ms", "last_served_ms", "last_files_swapped_ms"):
            assert SUMMARY <= row[field].keys(), field
        assert row["statements_per_change_per_agent"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_baselines_smoke(tmp_path: Path) -> None:
    doc = run_bench("baselines", tmp_path)
    kinds = {r["kind"] for r in doc["results"]}
    assert kinds == {"ours", "listen", "poll1", "poll5", "etcd"}
    for row in doc["results"]:
        assert row["missed"] == 0, row
        assert SUMMARY <= row["last_watcher_ms"].keys()
        assert "pg_backends_held" in row and "statements_per_change_per_watcher" in row


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_footprint_smoke(tmp_path: Path) -> None:
    doc = run_bench("footprint", tmp_path)
    for case in doc["start"]:
        assert SUMMARY <= case["process_start_to_ready_ms"].keys()
        assert SUMMARY <= case["in_process_run_to_started_ms"].keys()
        assert case["rss_mib_median"] > 0
    assert doc["idle"]["queries"] == 0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_http_and_writes_smoke(tmp_path: Path, pg_admin_url: str) -> None:
    """wrk against the agent's API and nginx; write throughput with 1 and 8 writers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env["BENCH_RESULTS_DIR"] = str(tmp_path)
    for script in ("bench/bench_http.py", f"bench/bench_writes.py --database-url {pg_admin_url}"):
        proc = subprocess.run([sys.executable, *script.split(), "--smoke"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=80)
        assert proc.returncode == 0, script + proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "http.smoke.json").read_text())["medians"]
    assert json.loads((tmp_path / "writes.smoke.json").read_text())["writers_8"]["median_changes_per_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_fanout_profile_smoke(tmp_path: Path) -> None:
    """CPU per change by component beside the last-agent latency, and the workers' cProfile."""
    doc = run_bench("fanout_profile", tmp_path)
    (row,) = doc["results"]
    assert row["missed"] == 0 and SUMMARY <= row["last_agent_ms"].keys()
    assert set(row["cpu_ms_per_change"]) == {"agents", "postgresql", "redis", "writer"}
    # No CPU figure is asserted: /proc counts in 10 ms ticks, which a smoke run's few changes may not reach.
    assert row["reader_statements_per_change_per_agent"] >= 1
    profile = doc["profiles"]["2"]
    assert profile["profiled_us_per_change_per_agent"] > 0
    assert any(group.startswith("agent.") for group, _us, _share in profile["groups"])


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_scale_smoke(tmp_path: Path) -> None:
    """Agents with fewer PostgreSQL slots than agents: direct, through PgBouncer, from a lagging replica."""
    doc = run_bench("scale", tmp_path)
    cases = {case["scenario"]: case for case in doc["cases"]}
    assert set(cases) == {"direct", "pgbouncer", "replica"}
    for scenario, case in cases.items():
        (run,) = case["runs"]
        assert run["missed"] == 0, (scenario, run)
        assert SUMMARY <= run["last_agent_ms"].keys(), scenario
        assert run["errors_start"]["prepared_statement"] == run["errors_changes"]["prepared_statement"] == 0
        assert run["max_reader_connections"] is not None and run["probe"]["attempts"] > 0, scenario
    assert {"wall_ms", "agent_cpu_ms", "server_cpu_ms"} <= doc["read_cost"]["new"].keys()
    # PgBouncer holds at most its pool on the server, whatever the number of agents.
    assert cases["pgbouncer"]["runs"][0]["max_reader_connections"] <= doc["settings"]["pool_size"]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_fleet_smoke(tmp_path: Path) -> None:
    doc = run_bench("fleet", tmp_path)
    idle = doc["idle"]
    # 6 agents reporting every second: one SET + ZADD each per second, nothing else.
    assert idle["agents_listed"] == 6
    assert 0.5 <= idle["reports_per_agent_per_s"] <= 1.5, idle
    assert idle["set"] == idle["zadd"] and idle["other_commands"] == 0, idle
    for change in doc["changes"]:
        assert change["served"] == change["total"] == 6 and change["missing"] == 0
    assert SUMMARY <= doc["returned_after_last_ms"].keys()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_flags_smoke(tmp_path: Path) -> None:
    """OFREP evaluation of a targeting flag at 1,000/s beside the plain GET, without errors."""
    doc = run_bench("flags", tmp_path)
    (run,) = doc["runs"]
    for kind in ("evaluate", "get"):
        assert run["open_loop"][kind]["errors"] == 0, run["open_loop"][kind]["first_errors"]
        assert run["open_loop"][kind]["sent"] == doc["rate_per_s"] * doc["seconds"]
        assert SUMMARY <= run["open_loop"][kind]["latency_ms"].keys()
        assert run["closed_loop"][kind]["errors"] == 0 and run["closed_loop"][kind]["per_s"] > 0
    # Both variants were served: the targeting really ran.
    assert set(run["open_loop"]["evaluate"]["variants"]) == {"new", "old"}
    assert doc["errors"] == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_outage_smoke(tmp_path: Path) -> None:
    """The relay SIGKILLed: resubscribes and reader statements per second; direct publishes still arrive."""
    doc = run_bench("outage", tmp_path)
    assert doc["log_lines"]["healthy"] == {"deaf": 0, "lost": 0}
    assert len(doc["changes"]) == 3 and all(c["missed"] == 0 for c in doc["changes"]), doc["changes"]
    assert len(doc["per_second"]) >= doc["quiet_outage"]["seconds"]
    assert {"subscriptions", "connections", "reader_statements"} <= doc["per_second"][0].keys()


def test_docs_are_rendered_from_results(tmp_path: Path) -> None:
    """docs/benchmarks.md is what `python -m bench.make_docs` renders from bench/results: never edited by hand."""
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, "-m", "bench.make_docs", "--results", str(ROOT / "bench" / "results"),
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert out.read_text() == (ROOT / "docs" / "benchmarks.md").read_text(), (
        "docs/benchmarks.md is not what bench/results renders: run `python -m bench.make_docs`")


def test_make_docs_renders_each_results_file_alone(tmp_path: Path) -> None:
    """A section per results file present, and none for a missing one (an empty directory renders too)."""
    import shutil

    from bench.make_docs import SECTIONS, render

    empty = render(tmp_path)
    assert empty.startswith("# Benchmarks\n")
    present = [name for name, _section in SECTIONS if (ROOT / "bench" / "results" / f"{name}.json").exists()]
    assert present
    for name in present:
        one = tmp_path / name
        one.mkdir()
        shutil.copy(ROOT / "bench" / "results" / f"{name}.json", one)
        assert render(one).count("\n## ") > empty.count("\n## "), name
