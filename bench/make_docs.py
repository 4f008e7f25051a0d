# ruff: noqa: E501  (Markdown prose and table rows cannot be wrapped)
"""Render docs/benchmarks.md from bench/results/*.json (the published full runs).

    python -m bench.make_docs [--results DIR] [--output FILE]

Every table in the document comes from a results file: a benchmark's own `report(doc)`
prints it (the tables its command prints), or a function here computes it from the
results (targets, local reads, writes). A section whose results file is missing is left
out. Only prose is kept here by hand: why the figures are what they are, and findings of
one-off diagnostic runs, each dated and with the command that produced it.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from bench import (
    bench_baselines,
    bench_fanout_profile,
    bench_flags,
    bench_fleet,
    bench_footprint,
    bench_propagation,
    bench_scale,
)
from bench.common import RESULTS, ROOT
from bench.docs_prose import ANALYSIS, OUTAGE_INTRO, SCALE_ANALYSIS, SCALE_SETUP

Doc = dict[str, Any]
Docs = dict[str, Doc]

HEADER = """# Benchmarks

Measured with the commands in `bench/` (see `bench/README.md`); every table below is
rendered by `python -m bench.make_docs` from `bench/results/*.json` of the latest full
run (each section names its command and when it ran). Latencies in milliseconds; "last"
= the last agent (or watcher) of N to get there, per change, then p50/p99/max over the
changes; headline figures are the median of the runs.

## Machine

{machine}

Private servers started by each command: PostgreSQL with `fsync = off`
(tests/servers.py settings, so commit time is CPU, not disk), `max_connections =
1200` (fewer in the scale-out benchmark), `pg_stat_statements`; Redis without
persistence; etcd single member. Everything (servers, agents, probes, writer) shares
the same {nproc} cores.

## Commands (full run)

```sh
{commands}
python -m bench.make_docs          # rewrites this file from bench/results/*.json
```

CI: `pytest tests/test_bench_smoke.py` runs each command with `--smoke`
(Debian packages: postgresql-15, redis-server, etcd-server) and checks that this file
is what `python -m bench.make_docs` renders from the committed results.
"""

# Why the figures are what they are: prose written from the runs of 2026-12-02 (the
# Targets table above it is rendered from whatever results are present).
def _capture(report: Callable[[Doc], None], doc: Doc) -> str:
    """What a benchmark's report(doc) prints: its Markdown tables."""
    out = io.StringIO()
    with redirect_stdout(out):
        report(doc)
    return out.getvalue()


def _command(doc: Doc) -> str:
    """The command line a results file was written by, as a reader would type it."""
    script, _, args = doc["command"].partition(" ")
    return f"python -m bench.{script.removesuffix('.py')} {args}".rstrip()


def _intro(heading: str, doc: Doc) -> str:
    return f"\n## {heading}\n\n`{_command(doc)}`, {doc['when']}\n"


def _find(doc: Doc | None, key: str, **match: Any) -> Doc | None:
    """The first row of doc[key] whose fields equal `match` (None: no such row or no doc)."""
    if doc is None:
        return None
    return next((row for row in doc.get(key, []) if all(row.get(k) == v for k, v in match.items())), None)


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


# -- sections ------------------------------------------------------------------------


def _propagation(doc: Doc) -> str:
    return _intro("Propagation (issues #3, #7.1)", doc) + _capture(bench_propagation.report, doc)


def _baselines(doc: Doc) -> str:
    return _intro("Baselines and database load (issues #7.2, #7.3)", doc) + _capture(bench_baselines.report, doc)


def _footprint(doc: Doc) -> str:
    return _intro("Footprint (issue #7.5)", doc) + _capture(bench_footprint.report, doc)


def _fanout(doc: Doc) -> str:
    return (_intro("Where the CPU goes when one change reaches N agents (issue #7)", doc)
            + _capture(bench_fanout_profile.report, doc))


def _http(doc: Doc) -> str:
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


def _writes(doc: Doc) -> str:
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


def _scale(doc: Doc) -> str:
    s = doc["settings"]
    heading = (f"Scale-out: {s['agents']} agents, fewer PostgreSQL slots than agents "
               "(issues #10.6, #10.7)")
    setup = SCALE_SETUP.format(max_connections=s["max_connections"], slots=s["max_connections"] - 3,
                               agents=s["agents"], processes=min(s["agents"], s["processes"]))
    return _intro(heading, doc) + setup + _capture(bench_scale.report, doc) + SCALE_ANALYSIS


def _fleet(doc: Doc) -> str:
    return (_intro('Fleet reports: their idle cost and how exactly `set --wait` ends (README "Did every pod get it?")', doc)
            + _capture(bench_fleet.report, doc))


def _flags(doc: Doc) -> str:
    return (_intro("Flag evaluation: OFREP beside the plain-value GET (issue #12)", doc)
            + _capture(bench_flags.report, doc))


def _outage(doc: Doc) -> str:
    """Relay outage (issue #21.3). bench_outage is new: its report(doc) is used when it has one."""
    intro = _intro("Relay outage: resubscribes and replay reads per second (issue #21.3)", doc) + OUTAGE_INTRO
    try:
        module = importlib.import_module("bench.bench_outage")
    except ImportError:
        module = None
    report = getattr(module, "report", None)
    if report is None:
        return intro + "\n(`bench.bench_outage` has no `report(doc)`: its tables are not rendered.)\n"
    return intro + _capture(report, doc)


# -- targets: what each issue asked for, against the latest results -------------------


Target = tuple[str, str, str]  # target, figure, met?


def _single_agent(docs: Docs, field: str, label: str, limit: float) -> Target | None:
    p = docs.get("propagation")
    direct, relay = _find(p, "fleet", agents=1, path="direct"), _find(p, "fleet", agents=1, path="relay")
    if direct is None:
        return None
    figure = f"agent in its own process: p50 {_ms(direct[field]['p50'])} / p99 {_ms(direct[field]['p99'])} ms (direct publish)"
    if relay is not None:
        figure += f", {_ms(relay[field]['p50'])} / {_ms(relay[field]['p99'])} ms (trigger → relay)"
    hop = _find(p, "in_process", path="direct")
    if hop is not None:
        raw = hop["redis_publish_to_receive_ms"]
        figure += f"; raw Redis PUBLISH→receive in the same run p50 {_ms(raw['p50'])} / p99 {_ms(raw['p99'])} ms"
    return f"1 agent, COMMIT → {label}, p99 ≤ {limit:g} ms (issue #3)", figure, _yes(direct[field]["p99"] <= limit)


def _last_of(docs: Docs, n: int, limit: float, vs_listen: float, floor: float | None) -> list[Target]:
    b = docs.get("baselines")
    ours, listen = _find(b, "results", kind="ours", watchers=n), _find(b, "results", kind="listen", watchers=n)
    if ours is None:
        return []
    p50 = ours["last_watcher_ms"]["p50"]
    figure = f"{_ms(p50)} ms p50, {ours['missed']} missed (bench_baselines)"
    if listen is not None:
        figure += f"; LISTEN/NOTIFY {_ms(listen['last_watcher_ms']['p50'])} ms in the same run"
    fan = _find(docs.get("fanout_profile"), "results", agents=n)
    if fan is not None:
        figure += (f"; {_ms(fan['last_agent_ms']['p50'])} ms in the fan-out profile, whose CPU floor is "
                   f"{_ms(fan['cpu_bound_floor_ms'])} ms")
    rows = [(f"last of {n:,} agents ≤ {limit:g} ms (issue #7)", figure, _yes(p50 <= limit))]
    if listen is not None:
        ratio = p50 / listen["last_watcher_ms"]["p50"]
        met = ratio <= vs_listen and ours["missed"] == 0
        note = "" if met or floor is None or ratio > floor else f" (within the {floor:g}× floor)"
        rows.append((f"last of {n:,} agents ≤ {vs_listen:g}× LISTEN/NOTIFY of the same run, 0 missed (issue #21)",
                     f"{ratio:.2f}× ({_ms(p50)} / {_ms(listen['last_watcher_ms']['p50'])} ms), {ours['missed']} missed",
                     _yes(met) + note))
    return rows


def _statements(docs: Docs) -> list[Target]:
    ours = [r for r in (docs.get("baselines") or {}).get("results", []) if r["kind"] == "ours"]
    if not ours:
        return []
    per_n = ", ".join(f"{r['statements_per_change_per_watcher']:.3g} at N = {r['watchers']:,}" for r in ours)
    worst = max(r["statements_per_change_per_watcher"] for r in ours)
    return [("DB statements per change per agent: ≤ 1 (lagging agents coalesce changes into one read)",
             per_n + " (pg_stat_statements, bench_baselines)", _yes(worst <= 1.0))]


def _profile_cpu(docs: Docs) -> list[Target]:
    rows = (docs.get("fanout_profile") or {}).get("results", [])
    if not rows:
        return []
    figure = "; ".join(f"N = {r['agents']:,}: agents {r['agent_cpu_us_per_agent']:.0f} µs, PostgreSQL "
                       f"{r['postgresql_cpu_us_per_agent']:.0f} µs" for r in rows)
    met = all(r["agent_cpu_us_per_agent"] <= 150 and r["postgresql_cpu_us_per_agent"] <= 100 for r in rows)
    return [("agent CPU per change per agent ≤ 150 µs, PostgreSQL CPU per delta read ≤ 100 µs (issue #21)",
             figure + " (bench_fanout_profile)", _yes(met))]


def _idle(docs: Docs) -> list[Target]:
    f = docs.get("footprint")
    if f is None:
        return []
    idle = f["idle"]
    return [
        ("DB queries between reconciles: 0", f"{idle['queries']} in {idle['window_s']:g} s (bench_footprint)",
         _yes(idle["queries"] == 0)),
        ("idle CPU ≈ 0", f"{idle['cpu_percent']:g} % of a core", _yes(idle["cpu_percent"] <= 1.0)),
        ("idle RSS ≤ 45 MiB (issue #21; ≤ 40 MB in #7)", f"{idle['rss_mib']:g} MiB", _yes(idle["rss_mib"] <= 45)),
    ]


def _start(docs: Docs) -> list[Target]:
    f = docs.get("footprint")
    rows: list[Target] = []
    small, big = _find(f, "start", entries=10), _find(f, "start", entries=10000)
    if small is not None:
        ms = small["process_start_to_ready_ms"]["p50"]
        rows.append(("process start → /readyz ≤ 300 ms with 10 entries (issue #21)", f"{_ms(ms)} ms p50",
                     _yes(ms <= 300)))
    if big is not None:
        in_process, process = big["in_process_run_to_started_ms"]["p50"], big["process_start_to_ready_ms"]["p50"]
        rows.append(("start → ready with 10,000 entries ≤ 300 ms (issue #7)",
                     f"in-process Agent.run → started {_ms(in_process)} ms; process spawn → /readyz 200: {_ms(process)} ms",
                     _yes(in_process <= 300)))
        rows.append(("RSS with 10,000 entries", f"{big['rss_mib_median']:g} MiB", "—"))
    return rows


def _local_reads(docs: Docs) -> list[Target]:
    h = docs.get("http")
    if h is None:
        return []
    m = h["medians"]
    entry = m["api_entry"]["rps"] / m["nginx_entry"]["rps"]
    configs = m["api_configs"]["rps"] / m["nginx_configs"]["rps"]
    return [("local read ≥ 0.5× nginx (issue #21)",
             f"{entry:.2f}× for one entry, {configs:.2f}× for all configs (bench_http, same run)", _yes(entry >= 0.5))]


BASELINE_LABELS = {"listen": "LISTEN/NOTIFY per watcher", "etcd": "etcd watch", "poll1": "1 s poll",
                   "poll5": "5 s poll"}


def _baseline_targets(docs: Docs) -> list[Target]:
    b = docs.get("baselines")
    if b is None:
        return []
    results = b["results"]
    ours = {r["watchers"]: r["last_watcher_ms"]["p50"] for r in results if r["kind"] == "ours"}
    if not ours:
        return []
    parts, slower = [], []
    for kind, label in BASELINE_LABELS.items():
        theirs = {r["watchers"]: r["last_watcher_ms"]["p50"] for r in results if r["kind"] == kind}
        if not theirs:
            continue
        parts.append(f"{label} {' / '.join(_ms(v) for v in theirs.values())} ms at N = "
                     f"{'/'.join(f'{n:,}' for n in theirs)}")
        beaten = [n for n, v in theirs.items() if n in ours and v <= ours[n]]
        if beaten:
            slower.append(f"{label} at N = {'/'.join(f'{n:,}' for n in beaten)}")
    figure = (f"ours {' / '.join(_ms(v) for v in ours.values())} ms at N = {'/'.join(f'{n:,}' for n in ours)}; "
              + "; ".join(parts))
    rows = [("faster than every baseline at every N (last p50)", figure,
             "yes" if not slower else "no: " + ", ".join(slower) + " as fast or faster")]
    idle = {r["kind"]: r["idle_statements_per_s_per_watcher"] for r in results
            if r.get("idle_statements_per_s_per_watcher") is not None}
    if "ours" in idle:
        polls = {k: v for k, v in idle.items() if k.startswith("poll")}
        rows.append(("DB load at idle below polling",
                     f"ours {idle['ours']:g} statements/s per agent at idle"
                     + "".join(f", {BASELINE_LABELS[k]} {v:.2g}" for k, v in polls.items()),
                     _yes(all(idle["ours"] < v for v in polls.values()))))
    n = max(ours)
    listen = _find(b, "results", kind="listen", watchers=n)
    held = _find(b, "results", kind="ours", watchers=n)
    if listen is not None and held is not None:
        ours_held, listen_held = held["pg_backends_held"], listen["pg_backends_held"]
        rows.append(("fewer DB connections than LISTEN/NOTIFY per agent",
                     f"while changes flow at N = {n:,}: ours {ours_held}, LISTEN/NOTIFY {listen_held}; between changes "
                     "the agent closes its connection after `db_idle_timeout` (default 60 s; not measured here), "
                     "LISTEN/NOTIFY holds N forever",
                     "yes under load" if ours_held < listen_held else "at idle only; equal or more under load"))
    return rows


def _targets(docs: Docs) -> str:
    rows: list[Target] = []
    for field, label, limit in (("last_applied_ms", "applied in the store", 2.0),
                                ("last_served_ms", "served (HTTP long-poll)", 3.0)):
        row = _single_agent(docs, field, label, limit)
        if row is not None:
            rows.append(row)
    rows += _last_of(docs, 100, 20, 1.5, None) + _last_of(docs, 1000, 250, 1.0, 2.0)
    rows += _statements(docs) + _profile_cpu(docs) + _idle(docs) + _start(docs) + _local_reads(docs)
    rows += _baseline_targets(docs)
    if not rows:
        return ""
    table = ["| Target | Figure | Met? |", "|---|---|---|", *(f"| {t} | {f} | {m} |" for t, f, m in rows)]
    return ("\n## Targets\n\nEach figure is read from the results rendered above (the benchmark named, "
            "or the nearest section); 2 cores shared by servers, agents and probes.\n\n" + "\n".join(table) + "\n")


# -- the document ---------------------------------------------------------------------


# In document order: results file name → its section. http and writes are run as scripts.
SECTIONS: list[tuple[str, Callable[[Doc], str]]] = [
    ("propagation", _propagation), ("baselines", _baselines), ("footprint", _footprint),
    ("fanout_profile", _fanout), ("http", _http), ("writes", _writes), ("scale", _scale),
    ("fleet", _fleet), ("flags", _flags), ("outage", _outage),
]
SCRIPTS = {"http": "python bench/bench_http.py", "writes": "python bench/bench_writes.py"}


def _header(docs: Docs) -> str:
    measured = [d for d in docs.values() if "machine" in d]
    m = measured[0]["machine"] if measured else {}
    machine = "\n".join(f"- {k}: {v}" for k, v in m.items()) or "- (no results file names one)"
    if measured:
        machine += f"\n\n(as `{measured[0]['benchmark']}.json` recorded it; each results file records its own)"
    commands = "\n".join(SCRIPTS[name] if name in SCRIPTS else _command(doc) for name, doc in docs.items())
    return HEADER.format(machine=machine, nproc=m.get("nproc", "?"), commands=commands)


def render(results: Path) -> str:
    """The whole document from the results files in `results` (missing ones are left out)."""
    docs: Docs = {}
    for name, _section in SECTIONS:
        path = results / f"{name}.json"
        if path.exists():
            docs[name] = json.loads(path.read_text())
    parts = [_header(docs)]
    for name, section in SECTIONS:
        if name == "scale":  # the analysis of the sections above comes before the scale-out runs
            parts += [part for part in (_targets(docs), ANALYSIS) if part]
        if name in docs:
            parts.append(section(docs[name]))
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of the <name>.json results")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    args.output.write_text(render(args.results))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
