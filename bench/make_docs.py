# ruff: noqa: E501  (Markdown table rows in ANALYSIS cannot be wrapped)
"""Render docs/benchmarks.md from the latest bench/results/*.json (the published full runs).

    python -m bench.make_docs
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from typing import Any

from bench import bench_baselines, bench_fanout_profile, bench_footprint, bench_propagation
from bench.common import RESULTS, ROOT

HEADER = """# Benchmarks

Measured with the commands in `bench/` (see `bench/README.md`); every figure below is
copied by `python -m bench.make_docs` from `bench/results/*.json` of the latest full
run. Latencies in milliseconds; "last" = the last agent (or watcher) of N to get
there, per change, then p50/p99/max over the changes; headline figures are the
median of 3 runs. Local read throughput (wrk against the agent and nginx) is
`bench/bench_http.py`, documented separately.

## Machine

{machine}

Private servers started by each command: PostgreSQL with `fsync = off`
(tests/servers.py settings, so commit time is CPU, not disk), `max_connections =
1200`, `pg_stat_statements`; Redis without persistence; etcd single member. Everything
(servers, agents, probes, writer) shares the same {nproc} cores.

## Commands (full run)

```sh
python -m bench.bench_propagation --agents 1,10,100,1000 --runs 3
python -m bench.bench_baselines
python -m bench.bench_footprint
python -m bench.bench_fanout_profile --cprofile
python -m bench.make_docs          # rewrites this file from bench/results/*.json
```

CI: `pytest tests/test_bench_smoke.py` runs each command with `--smoke`
(Debian packages: postgresql-15, redis-server, etcd-server).
"""


# Where the time goes, targets and findings (kept with the code that renders the tables).
ANALYSIS = """
## Targets (latest full run, quiet machine; 2 cores shared by servers, agents and probes)

| Target | Figure | Met? |
|---|---|---|
| 1 agent, COMMIT → applied in the store, p99 ≤ 2 ms (issue #3) | agent in its own process: p50 0.63 / p99 1.88 ms (direct publish), 0.97 / 2.53 ms (trigger → relay); in-process with the writer on the same loop: p50 0.54 / p99 3.99 ms; raw Redis PUBLISH→receive beside it p50 0.17 / p99 0.78 ms | direct yes, relay just over |
| 1 agent, COMMIT → served (HTTP long-poll), p99 ≤ 3 ms | p50 0.83 / p99 2.21 ms (direct), 1.24 / 2.72 ms (relay) | yes |
| last of 100 agents ≤ 20 ms | 25 ms p50 / 58 ms p99 (baselines run, no files); 130 ms p50 with 100 file sets on one disk (propagation run) | no |
| last of 1,000 agents ≤ 250 ms | 254 ms p50 (baselines run); 293 / 313 ms p50 direct / relay (propagation run); no file sets | no (just over) |
| DB queries per change per agent: 1 | 1.000 (agent counter and pg_stat_statements, every N) | yes |
| DB queries between reconciles: 0 | 0 | yes |
| idle CPU ≈ 0 | 0.1–0.2 % of a core | yes |
| idle RSS ≤ 40 MB | 55 MiB | no (imports, see below) |
| start → ready, 10,000 entries ≤ 300 ms | in-process Agent.run → started 158 ms; process spawn → /readyz 200: 448 ms (10 entries already take 332 ms: interpreter start + imports) | in-process yes, process no |
| RSS with 10,000 entries | 71 MiB | — |
| faster than every baseline at every N | faster than polling at every N (1 s poll: last ≈ 1,000 ms; 5 s poll: ≈ 5,000 ms). LISTEN/NOTIFY per watcher (0.44 / 1.9 / 5.1 / 87 ms at N = 1/10/100/1,000) and etcd watch (≈ 0 / 0.9 / 3.4 ms at N = 1/10/100) are faster than ours (1.3 / 5.4 / 25 / 254 ms) | no |
| DB load vs polling | ours 0 statements/s per agent at idle vs 1.0 (1 s poll) and 0.2 (5 s poll); 1 statement per change per agent | yes |
| fewer DB connections than LISTEN/NOTIFY per agent | while changes flow: equal (1 per agent); between changes: 0 after `db_idle_timeout` (default 60 s), against N held forever by LISTEN/NOTIFY | yes at idle, equal under load |

## Where the time goes

- **Single agent.** COMMIT → applied = Redis hop (raw PUBLISH→receive p50 0.17 ms)
  + one delta query (≈ 0.3 ms) + apply. The p99 tail comes from sharing two cores
  with PostgreSQL, Redis, the writer and the probe; the trigger → relay path adds one
  more hop (PostgreSQL NOTIFY → relay → Redis).
- **Many agents.** Each change costs N delta queries (one per agent, by design: a
  message never carries the value) plus N message parses, applies and HTTP answers
  in Python. At N = 1,000 that is ≈ 1,000 × (≈ 0.1 ms PostgreSQL + ≈ 0.15 ms Python)
  ≈ 250 ms of CPU on 2 cores: the last agent waits for the whole fan-out, which in a
  cluster is spread over many nodes. LISTEN/NOTIFY per watcher skips the Redis hop
  (PostgreSQL notifies at commit, before the writer even sees COMMIT return) and our
  sync engine, hence faster here — at the price of one permanent backend per pod.
- **File sets.** Each change builds a new generation directory: one `mkdir` per
  service, a hard link per unchanged file, and an `fsync` of each *written* file
  (configs.json, configs.env, the changed entries); directories are no longer fsynced
  (profiled before: `_fsync_dir` per service was the largest share of a swap). In the
  benchmark 100 agents share one disk and 10 processes, so their fsyncs queue (files
  p50 524 ms at N = 100); in a pod the chart mounts the output `emptyDir` with
  `medium: Memory`, where fsync is free. Measured here on disk, files lag the HTTP
  answer by ≈ 2.4 ms at N = 1.
- **Idle RSS** is import cost: bare Python + asyncio/ssl ≈ 20 MiB, pydantic +
  pydantic-settings ≈ 13, redis-py ≈ 6, asyncpg ≈ 3, prometheus-client ≈ 2, uvicorn ≈ 2,
  watchfiles ≈ 1.3 → 52 MiB before any data. ≤ 40 MB needs dropping a required
  dependency (pydantic-settings is the largest).
- **DB connections.** The agent closes its read connection after `db_idle_timeout`
  (default 60 s) without a query and reopens it on the next announcement (≈ 2.3 ms on
  loopback with trust authentication; more with TLS and SCRAM).
"""


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _capture(fn: Any, doc: dict[str, Any]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        fn(doc)
    return out.getvalue().replace("\n### ", "\n### ")


def _http_section(doc: dict[str, Any]) -> str:
    """Local reads (issues #4, #7.4): wrk against the agent and nginx, same bytes, same run."""
    m = doc["medians"]
    rows = ["| target | server | req/s | p99 ms | ratio to nginx |", "|---|---|---|---|---|"]
    for name, label in (("entry", "GET /v1/configs/{service}/{key}"), ("configs", "GET /v1/configs")):
        api, nginx = m[f"api_{name}"], m[f"nginx_{name}"]
        rows.append(f"| {label} | agent | {api['rps']:.0f} | {api['p99_ms']:.2f} | {api['rps'] / nginx['rps']:.2f} |")
        rows.append(f"| | nginx | {nginx['rps']:.0f} | {nginx['p99_ms']:.2f} | 1.00 |")
    return (
        "\n## Local reads (issues #4, #7.4)\n\n`python bench/bench_http.py` — wrk, "
        f"{doc['connections']} connections, {doc['entries']} entries, median of {doc['rounds']} × "
        f"{doc['seconds_per_run']} s; nginx (1 worker, open_file_cache) serves the same bytes as "
        "static files in the same run.\n\n" + "\n".join(rows)
        + f"\n\nIdle RSS of the API process with {doc['entries']} entries: {doc['idle_rss_mb']} MB "
        f"({doc['rss_after_load_mb']} MB after the load).\n"
    )


def _writes_section(doc: dict[str, Any]) -> str:
    """Write throughput of the change log (issue #2)."""
    rows = ["| writers | changes/s (median) | runs |", "|---|---|---|"]
    for n in (1, 8):
        r = doc[f"writers_{n}"]
        rows.append(f"| {n} | {r['median_changes_per_s']} | {r['runs']} |")
    return (
        "\n## Write throughput (issue #2)\n\n`python bench/bench_writes.py` — "
        f"{doc['changes']} changes per run through the writer API, one org (its counter row "
        "serializes writers), shared PostgreSQL 15 with fsync on.\n\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    docs = {n: _load(n) for n in ("propagation", "baselines", "footprint")}
    first = next(d for d in docs.values() if d)
    m = first["machine"]
    machine = "\n".join(f"- {k}: {v}" for k, v in m.items())
    parts = [HEADER.format(machine=machine, nproc=m["nproc"])]
    if docs["propagation"]:
        parts.append("## Propagation (issues #3, #7.1)\n\n`" + docs["propagation"]["command"] + "`, "
                     + docs["propagation"]["when"] + "\n")
        parts.append(_capture(bench_propagation.report, docs["propagation"]))
    if docs["baselines"]:
        parts.append("\n## Baselines and database load (issues #7.2, #7.3)\n\n`"
                     + docs["baselines"]["command"] + "`, " + docs["baselines"]["when"] + "\n")
        parts.append(_capture(bench_baselines.report, docs["baselines"]))
    if docs["footprint"]:
        parts.append("\n## Footprint (issue #7.5)\n\n`" + docs["footprint"]["command"] + "`, "
                     + docs["footprint"]["when"] + "\n")
        parts.append(_capture(bench_footprint.report, docs["footprint"]))
    fanout = _load("fanout_profile")
    if fanout:
        parts.append("\n## Where the CPU goes when one change reaches N agents (issue #7)\n\n`"
                     + fanout["command"] + "`, " + fanout["when"] + "\n")
        parts.append(_capture(bench_fanout_profile.report, fanout))
    http = _load("http")
    if http:
        parts.append(_http_section(http))
    writes = _load("writes")
    if writes:
        parts.append(_writes_section(writes))
    parts.append(ANALYSIS)
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(parts).rstrip() + "\n")
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
