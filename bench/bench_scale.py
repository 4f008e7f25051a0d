"""Scale-out (issue #10.6, #10.7): N agents against a PostgreSQL with fewer connection slots than agents.

    python -m bench.bench_scale                      # N = 200, every case below, 3 runs (~25 min)
    python -m bench.bench_scale --scenario direct --agents 200 --changes 3 --runs 1 --jitters 0.02
    python -m bench.bench_scale --smoke              # CI: N = 12, 2 changes, one run of each scenario

Diagnostic knobs (not defaults of the agent): --db-idle-timeout, --reader-connection-limit
(ALTER ROLE … CONNECTION LIMIT), --settle (seconds from ready to the first change),
--max-connections; --keep-logs DIR keeps every run's agent, relay and server logs.

Each case runs on fresh private servers: PostgreSQL with `max_connections` below N
(50 for N = 200; `superuser_reserved_connections` stays 3; `log_connections = on`),
Redis, and a relay process (`python -m agent relay`, direct to the primary, heartbeats
on) that publishes every change. The agents are in-process `Agent`s hosted by
`bench/worker.py` processes, each process logging to a file of its own.

  direct      agents → PostgreSQL; once per `--jitters` value (fetch_jitter 0, the
              default 0.02 and 0.05), so that the default is chosen from measurement
  pgbouncer   agents → PgBouncer (pool_mode = transaction, default_pool_size 20) →
              PostgreSQL, agents with database_pool_mode = transaction
  replica     agents read a streaming replica that applies commits 2 s late
              (recovery_min_apply_delay; CONFIG_AGENT_DATABASE_READ_URL); relay and
              writer use the primary

Once every agent is ready, the coordinator commits `--changes` changes about 1 s apart
(its own COMMIT timestamp) and, until the last one reached every agent, samples the
server the agents read from every 50 ms (backends of the reader role, from a
superuser connection opened before the agents) while a separate non-superuser role
(`probe_client`) connects and runs `SELECT 1` every 100 ms. Per change: convergence
(the last agent applied − COMMIT), reader backends at most, probe attempts and
failures; per run: lines in the agents' logs mentioning "too many clients",
"prepared statement", "error" or "failed" (at start and while the changes flowed),
and connections the server authorized and refused (its log), and the CPU the read
server and the agents spent meanwhile. Headline figures are the median over `--runs`.
`read_cost` (first run, before its agents start): the CPU of one delta read on a kept
connection and on a new one (what a crowded agent pays per change).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import asyncpg

from agent.settings import Settings
from bench.common import (
    READER_ROLE,
    BenchPostgres,
    Servers,
    agent_env,
    median_of_runs,
    print_table,
    proc_cpu_seconds,
    raise_fd_limit,
    summarize,
    write_result,
)
from bench.harness import TimedWriter, Worker, first_at_or_after, start_relay, start_workers, stop_all
from tests.scaleout import PrivatePgBouncer, PrivateReplica, TunedPostgres
from tests.servers import PrivatePostgres, PrivateRedis, stop_processes

SCENARIOS = ("direct", "pgbouncer", "replica")
ENTRIES = 10
PROCESSES = 10
PROBE_ROLE = "probe_client"
SAMPLE_EVERY = 0.05
PROBE_EVERY = 0.1
REPLICA_DELAY = "2s"
DEFAULT_JITTER = Settings().fetch_jitter
# What counts as an error line in an agent's log, by name (case-insensitive). PostgreSQL
# refuses a client with SQLSTATE 53300 in three wordings: "sorry, too many clients already"
# (every slot taken), "remaining connection slots are reserved for non-replication
# superuser connections" (only superuser_reserved_connections left) and "too many
# connections for role" (the role's CONNECTION LIMIT).
FULL = r"too many clients|remaining connection slots are reserved|too many connections for role"
ERROR_PATTERNS = {
    "too_many_clients": FULL,
    "prepared_statement": r"prepared statement",
    "error": r"error",
    "failed": r"failed",
}


@dataclass(frozen=True)
class Case:
    """One scenario with one fetch_jitter setting."""

    scenario: str
    jitter: float

    @property
    def name(self) -> str:
        return f"{self.scenario} jitter={self.jitter:g}"


class ScalePostgres(TunedPostgres, BenchPostgres):
    """BenchPostgres (pg_stat_statements, reader URL) with a low max_connections and
    every connection logged (TunedPostgres appends its lines last: they win)."""


class ScaleServers(Servers):
    """Servers of one case: PostgreSQL (few slots), Redis, and PgBouncer or a replica.

    Blocking: enter it outside the event loop (PrivatePostgres.migrate runs its own)."""

    def __init__(self, scenario: str, max_connections: int, pool_size: int) -> None:
        self.org = "bench"
        self.smoke = False
        self.scenario = scenario
        self.pool_size = pool_size
        self.tmp = Path(tempfile.mkdtemp(prefix="config-agent-scale-"))
        os.chmod(self.tmp, 0o755)
        (self.tmp / "pg").mkdir()
        self.pg = ScalePostgres(self.tmp / "pg", max_connections=max_connections,
                                settings={"log_connections": "on"})
        self.redis = PrivateRedis(self.tmp / "redis", extra=["--maxclients", "20000"])
        self.bouncer: PrivatePgBouncer | None = None
        self.replica: PrivateReplica | None = None

    def start_scale_out(self) -> None:
        """PgBouncer or the replica (blocking; after setup, so the replica has the roles)."""
        if self.scenario == "pgbouncer":
            (self.tmp / "pgbouncer").mkdir()
            self.bouncer = PrivatePgBouncer(self.tmp / "pgbouncer", "127.0.0.1", self.pg.port,
                                            default_pool_size=self.pool_size)
            self.bouncer.start()
        elif self.scenario == "replica":
            (self.tmp / "replica").mkdir()
            self.replica = PrivateReplica(self.pg, self.tmp / "replica", apply_delay=REPLICA_DELAY)
            self.replica.start()
            self.replica.wait_caught_up()

    def __enter__(self) -> ScaleServers:
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bouncer is not None:
            self.bouncer.destroy()
        if self.replica is not None:
            self.replica.destroy()
        super().__exit__(*exc)

    @property
    def read_port(self) -> int:
        """The PostgreSQL server the agents read from (directly or through PgBouncer)."""
        return self.replica.port if self.replica is not None else self.pg.port

    @property
    def read_log(self) -> Path:
        return (self.replica or self.pg).base / "log"

    def agent_settings(self, jitter: float, **extra: Any) -> dict[str, Any]:
        """CONFIG_AGENT_* settings of this scenario's agents."""
        settings: dict[str, Any] = {"fetch_jitter": jitter, **extra}
        if self.bouncer is not None:
            settings["database_url"] = self.bouncer.url(self.pg.dbname, user=READER_ROLE)
            settings["database_pool_mode"] = "transaction"
        if self.replica is not None:
            settings["database_read_url"] = (f"postgresql://{READER_ROLE}@127.0.0.1:"
                                             f"{self.replica.port}/{self.pg.dbname}")
        return settings


# -- measuring tools ----------------------------------------------------------------


SAMPLE_SQL = """
SELECT count(*) FILTER (WHERE usename = $1) AS reader,
       count(*) FILTER (WHERE usename = $1 AND state = 'idle') AS idle,
       count(*) FILTER (WHERE backend_type = 'client backend') AS clients
  FROM pg_stat_activity
"""


class Sampler:
    """Reader-role backends and all client backends of one server, every SAMPLE_EVERY s."""

    def __init__(self, port: int) -> None:
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        # (time, reader backends, of them idle, client backends of every role)
        self.samples: list[tuple[float, int, int, int]] = []
        self.conn: asyncpg.Connection | None = None

    async def open(self) -> None:
        self.conn = await asyncpg.connect(self.url)

    async def run(self, stop_at: float) -> None:
        assert self.conn is not None
        while time.monotonic() < stop_at:
            row = await self.conn.fetchrow(SAMPLE_SQL, READER_ROLE)
            assert row is not None
            self.samples.append((time.time(), int(row["reader"]), int(row["idle"]), int(row["clients"])))
            await anyio.sleep(SAMPLE_EVERY)

    def most(self, start: float, end: float, column: int = 1) -> int | None:
        """Most backends sampled in [start, end] (None: no sample in it)."""
        values = [int(s[column]) for s in self.samples if start <= s[0] <= end]
        return max(values) if values else None


class Probe:
    """Another client of the server (a role that is not the readers'): connect + SELECT 1."""

    def __init__(self, port: int) -> None:
        self.url = f"postgresql://{PROBE_ROLE}@127.0.0.1:{port}/postgres"
        self.attempts: list[tuple[float, bool, float, str]] = []  # (start, ok, seconds, error)

    async def run(self, stop: anyio.Event, stop_at: float) -> None:
        while not stop.is_set() and time.monotonic() < stop_at:
            t0, m0 = time.time(), time.monotonic()
            error = ""
            try:
                conn = await asyncpg.connect(self.url, timeout=2)
                try:
                    await conn.fetchval("SELECT 1", timeout=2)
                finally:
                    await conn.close(timeout=2)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.attempts.append((t0, not error, time.monotonic() - m0, error))
            await anyio.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - m0)))

    def within(self, start: float, end: float) -> dict[str, Any]:
        picked = [a for a in self.attempts if start <= a[0] <= end]
        errors = sorted({a[3] for a in picked if a[3]})
        return {"attempts": len(picked), "failures": sum(1 for a in picked if not a[1]),
                "max_ms": round(max((a[2] for a in picked), default=0.0) * 1000, 1), "errors": errors[:3]}


def log_text(path: Path, start: int = 0, end: int | None = None) -> str:
    """Bytes `start`..`end` of a log file (a file offset taken earlier marks a moment)."""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(-1 if end is None else end - start).decode(errors="replace")


def count_errors(texts: list[str]) -> dict[str, int]:
    """Lines mentioning each of ERROR_PATTERNS, and lines mentioning any of them."""
    counts = dict.fromkeys(ERROR_PATTERNS, 0) | {"lines": 0}
    for text in texts:
        for line in text.lower().splitlines():
            hits = [name for name, pattern in ERROR_PATTERNS.items() if re.search(pattern, line)]
            for name in hits:
                counts[name] += 1
            counts["lines"] += bool(hits)
    return counts


def server_log_counts(text: str) -> dict[str, int]:
    """Connections of the reader role the server let in, and all it refused as full.

    A refusal for lack of a non-reserved slot (or over the role's CONNECTION LIMIT)
    comes after authentication: its backend logs "connection authorized" too, so a
    reader connection counts only if its process was not refused."""
    readers, refused = set(), set()
    for pid, level, message in re.findall(r"\[(\d+)\] (\w+):\s+(.*)", text):
        if message.startswith(f"connection authorized: user={READER_ROLE} "):
            readers.add(pid)
        elif level == "FATAL" and re.search(FULL, message):
            refused.add(pid)
    return {"reader_connects": len(readers - refused), "refused_too_many": len(refused)}


def server_cpu_seconds(postgres: PrivatePostgres) -> float:
    """CPU seconds of a PostgreSQL server so far: the postmaster, the backends it reaped
    (cutime + cstime: a connection per read ends within the window) and the live ones."""
    postmaster = int((postgres.data / "postmaster.pid").read_text().split()[0])
    ticks = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{postmaster}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = sum(int(x) for x in fields[11:15]) / ticks
    with open(f"/proc/{postmaster}/task/{postmaster}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    for pid in children:
        with contextlib.suppress(OSError):  # a backend that just ended is in cutime now
            total += proc_cpu_seconds(pid)
    return total


class LogMarks:
    """Where the agents' logs and the read server's log end at one moment."""

    def __init__(self, agent_logs: list[Path], server_log: Path) -> None:
        self.agent_logs, self.server_log = agent_logs, server_log
        self.agents = [p.stat().st_size for p in agent_logs]
        self.server = server_log.stat().st_size

    def agent_errors_since(self, earlier: LogMarks | None) -> dict[str, int]:
        return count_errors([log_text(p, earlier.agents[i] if earlier else 0, end)
                             for i, (p, end) in enumerate(zip(self.agent_logs, self.agents, strict=True))])

    def server_since(self, earlier: LogMarks) -> dict[str, int]:
        return server_log_counts(log_text(self.server_log, earlier.server, self.server))


class Fleet:
    """The worker processes' agents and, per agent, every (revision, time) it applied."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.seen: list[list[tuple[int, float]]] = []

    def collect(self) -> None:
        """Ask every worker what its agents applied since the last time (blocking)."""
        i = 0
        for w in self.workers:
            for got in w.dump():
                if i == len(self.seen):
                    self.seen.append([])
                self.seen[i].extend(got)
                i += 1

    def applied(self, revision: int) -> list[float | None]:
        """When each agent first held `revision` or a later one (None: not yet)."""
        return [first_at_or_after(s, revision) for s in self.seen]

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(w.proc.pid) for w in self.workers)


# -- one run of one case ------------------------------------------------------------


async def prepare(servers: ScaleServers, reader_limit: int | None) -> None:
    """Reader role (with a CONNECTION LIMIT if asked), seeded org and the probe's own login role."""
    await servers.setup(ENTRIES)
    admin = await asyncpg.connect(servers.pg.postgres_url)
    try:
        await admin.execute(f"CREATE ROLE {PROBE_ROLE} LOGIN")
        if reader_limit is not None:
            await admin.execute(f"ALTER ROLE {READER_ROLE} CONNECTION LIMIT {int(reader_limit)}")
    finally:
        await admin.close()


async def measure(servers: ScaleServers, case: Case, args: argparse.Namespace,
                  reads: int = 0) -> dict[str, Any]:
    """Start N agents, then make the changes; everything below is bounded in time.

    With `reads`, first measure what one delta read costs (read_cost), on the idle server."""
    await prepare(servers, args.reader_connection_limit)
    cost = await read_cost(servers, reads) if reads else None
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=servers.tmp))
    processes = min(args.agents, args.processes)
    sampler: Sampler | None = None
    workers: list[Worker] = []
    relay: list[subprocess.Popen[bytes]] = []
    with ExitStack() as files:
        err_paths = [logs / f"worker-{i}.log" for i in range(processes)]
        err_files: list[IO[Any]] = [files.enter_context(open(p, "w")) for p in err_paths]
        relay_log = files.enter_context(open(logs / "relay.log", "w"))

        async def start_relay_process() -> None:
            relay.append(await anyio.to_thread.run_sync(start_relay, servers, relay_log))

        # The coordinator's own connections come first, as the applications of a real
        # server would: the agents find the slots that are left.
        writer = await TimedWriter.open(servers.pg.admin_url)
        assert isinstance(writer, TimedWriter)
        try:
            async with anyio.create_task_group() as starting:  # the relay's start overlaps the rest
                starting.start_soon(start_relay_process)
                await anyio.to_thread.run_sync(servers.start_scale_out)
            extra = {} if args.db_idle_timeout is None else {"db_idle_timeout": args.db_idle_timeout}
            env = agent_env(servers, **servers.agent_settings(case.jitter, **extra))
            sampler, probe = Sampler(servers.read_port), Probe(servers.read_port)
            await sampler.open()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sampler.run, time.monotonic() + args.start_timeout + args.timeout + 60)
                t0 = time.time()
                workers = await anyio.to_thread.run_sync(lambda: start_workers(
                    "agents", args.agents, processes, env, "--start-together", stderr=err_files,
                    ready_timeout=args.start_timeout))
                started = time.time()
                await anyio.sleep(args.settle)
                doc = await _changes(servers, Fleet(workers), writer, sampler, probe, err_paths, args)
                doc |= {"start_s": round(started - t0, 2), "max_reader_connections_start": sampler.most(t0, started)}
                tg.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(stop_all, workers)
            await anyio.to_thread.run_sync(stop_processes, relay)
            await writer.close()
            if sampler is not None and sampler.conn is not None:
                await sampler.conn.close()
            if args.keep_logs is not None:  # the agents' and the server's logs, to read after
                shutil.copy(servers.read_log, logs / "postgresql.log")
                shutil.copytree(logs, args.keep_logs / f"{case.name.replace(' ', '-')}-{time.time():.0f}")
        relay_errors = count_errors([log_text(logs / "relay.log")])["lines"]
    return {
        "scenario": case.scenario, "fetch_jitter": case.jitter, "agents": args.agents,
        "processes": processes, "max_connections": args.max_connections,
        "reader_connection_limit": args.reader_connection_limit, "settle_s": args.settle,
        "db_idle_timeout": (Settings().db_idle_timeout if args.db_idle_timeout is None
                            else args.db_idle_timeout),
        "pool_size": args.pool_size if case.scenario == "pgbouncer" else None,
        "relay_error_lines": relay_errors, **doc, **({"read_cost": cost} if cost else {}),
    }


async def _changes(servers: ScaleServers, fleet: Fleet, writer: TimedWriter, sampler: Sampler,
                   probe: Probe, err_paths: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Commit the changes, wait (bounded) until every agent has the last, and measure."""
    await anyio.to_thread.run_sync(fleet.collect)
    held_before = sampler.samples[-1][1] if sampler.samples else None
    before = LogMarks(err_paths, servers.read_log)
    read_server = servers.replica or servers.pg
    cpu0 = server_cpu_seconds(read_server), fleet.cpu_seconds()
    commits: list[tuple[int, float]] = []
    stop_probe = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe.run, stop_probe, time.monotonic() + args.changes * args.spacing + args.timeout + 5)
        await anyio.sleep(0.2)  # the probe's first attempts see the idle fleet
        for i in range(args.changes):
            result = await writer.set(servers.org, "s1", "k1", {"n": i}, actor="bench")
            commits.append((result.revision, writer.committed_at))
            await anyio.sleep(args.spacing)
        deadline = time.monotonic() + args.timeout
        while True:
            await anyio.to_thread.run_sync(fleet.collect)
            if None not in fleet.applied(commits[-1][0]) or time.monotonic() > deadline:
                break
            await anyio.sleep(0.25)
        await anyio.sleep(0.2)
        stop_probe.set()
    cpu1 = server_cpu_seconds(read_server), fleet.cpu_seconds()
    await anyio.sleep(0.3)  # the server logs the last disconnects
    end, after = time.time(), LogMarks(err_paths, servers.read_log)
    per_change = [_one_change(fleet, sampler, probe, commits, n, end) for n in range(len(commits))]
    every = [(t - committed) * 1000 for revision, committed in commits
             for t in fleet.applied(revision) if t is not None]
    first = commits[0][1]
    return {
        "changes": len(commits),
        "last_agent_ms": summarize([c["last_agent_ms"] for c in per_change if c["last_agent_ms"] is not None]),
        "every_agent_ms": summarize(every),
        "missed": sum(c["missed"] for c in per_change),
        "reader_connections_before": held_before,
        "max_reader_connections": sampler.most(first, end),
        "max_client_backends": sampler.most(first, end, column=3),
        "probe": probe.within(first, end),
        "errors_start": before.agent_errors_since(None),
        "errors_changes": after.agent_errors_since(before),
        "server_log_changes": after.server_since(before),
        # CPU seconds from the first change until the last agent had the last one: the
        # server the agents read from (every backend, also those that ended) and the agents.
        "read_server_cpu_s": round(cpu1[0] - cpu0[0], 2),
        "agents_cpu_s": round(cpu1[1] - cpu0[1], 2),
        "per_change": per_change,
    }


def _one_change(fleet: Fleet, sampler: Sampler, probe: Probe, commits: list[tuple[int, float]], n: int,
                end: float) -> dict[str, Any]:
    """Figures of change `n`, over its window: COMMIT → the last agent had it (or the next change)."""
    revision, committed = commits[n]
    got = [t for t in fleet.applied(revision) if t is not None]
    missed = len(fleet.seen) - len(got)
    window_end = max(got) if got and not missed else (commits[n + 1][1] if n + 1 < len(commits) else end)
    probe_window = probe.within(committed, max(window_end, committed + PROBE_EVERY))
    return {
        "revision": revision,
        "last_agent_ms": round((max(got) - committed) * 1000, 1) if got and not missed else None,
        "median_agent_ms": round((statistics.median(got) - committed) * 1000, 1) if got else None,
        "missed": missed,
        "max_reader_connections": sampler.most(committed, window_end + SAMPLE_EVERY),
        "probe_attempts": probe_window["attempts"], "probe_failures": probe_window["failures"],
        # (ms after COMMIT, reader backends, of them idle) until the last agent had it
        "reader_backends": [(round((t - committed) * 1000), reader, idle) for t, reader, idle, _
                            in sampler.samples if committed <= t <= window_end],
    }


def run_case(case: Case, args: argparse.Namespace, reads: int = 0) -> dict[str, Any]:
    """One run of one case on fresh servers (blocking: servers start outside the loop)."""
    t0 = time.monotonic()
    with ScaleServers(case.scenario, args.max_connections, args.pool_size) as servers:
        result: dict[str, Any] = anyio.run(measure, servers, case, args, reads, backend="asyncio",
                                           backend_options={"use_uvloop": True})
    result["wall_s"] = round(time.monotonic() - t0, 1)
    return result


# -- what one read costs: on a kept connection, and on a new one ----------------------


async def read_cost(servers: ScaleServers, reads: int) -> dict[str, Any]:
    """CPU of one delta read (the agent's PgSource) on a kept connection and on a new one
    (connect + read + close, as an agent does on a full server), agent side and server side."""
    from agent.sources.postgres import PgSource

    source = PgSource(servers.pg.reader_url(), servers.org)
    out: dict[str, Any] = {"reads": reads}
    try:
        await source.fetch_changes_since(0)
        for mode in ("kept", "new"):
            server0, client0, t0 = server_cpu_seconds(servers.pg), _own_cpu(), time.perf_counter()
            for _ in range(reads):
                await source.fetch_changes_since(0)
                if mode == "new":
                    await source.close()
            wall, client = time.perf_counter() - t0, _own_cpu() - client0
            server = server_cpu_seconds(servers.pg) - server0
            out[mode] = {"wall_ms": round(wall * 1000 / reads, 2), "agent_cpu_ms": round(client * 1000 / reads, 2),
                         "server_cpu_ms": round(server * 1000 / reads, 2)}
    finally:
        await source.close()
    return out


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- summary ------------------------------------------------------------------------


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return None if not present else statistics.median(present)


def summarize_case(case: Case, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline figures of a case: the median over its runs."""
    def med(*path: str) -> Any:
        values = []
        for run in runs:
            value: Any = run
            for part in path:
                value = value[part]
            values.append(value)
        return _median(values)

    return {
        "scenario": case.scenario, "fetch_jitter": case.jitter, "runs": runs,
        "median": {
            "last_agent_ms": median_of_runs([r["last_agent_ms"] for r in runs]),
            "every_agent_ms": median_of_runs([r["every_agent_ms"] for r in runs]),
            "missed": med("missed"),
            "start_s": med("start_s"),
            "max_reader_connections": med("max_reader_connections"),
            "max_reader_connections_start": med("max_reader_connections_start"),
            "reader_connections_before": med("reader_connections_before"),
            "errors_changes": {k: med("errors_changes", k) for k in runs[0]["errors_changes"]},
            "errors_start": {k: med("errors_start", k) for k in runs[0]["errors_start"]},
            "probe_attempts": med("probe", "attempts"), "probe_failures": med("probe", "failures"),
            "server_reader_connects": med("server_log_changes", "reader_connects"),
            "server_refused": med("server_log_changes", "refused_too_many"),
        },
    }


def cases(args: argparse.Namespace) -> list[Case]:
    found: list[Case] = []
    for scenario in args.scenario.split(","):
        if scenario not in SCENARIOS:
            raise SystemExit(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
        jitters = [float(j) for j in args.jitters.split(",")] if scenario == "direct" else [DEFAULT_JITTER]
        found.extend(Case(scenario, j) for j in jitters)
    return found


def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    results = []
    cost: dict[str, Any] = {}
    for case in cases(args):
        runs = []
        for run in range(args.runs):
            doc = run_case(case, args, reads=0 if cost else args.agents)
            cost = cost or doc.pop("read_cost")
            runs.append(doc)
            last = doc["last_agent_ms"]
            print(f"{case.name} run {run + 1}: last agent p50 {last.get('p50')} max {last.get('max')} ms, "
                  f"missed {doc['missed']}, reader backends ≤ {doc['max_reader_connections']}, "
                  f"error lines {doc['errors_changes']['lines']}, probe failures "
                  f"{doc['probe']['failures']}/{doc['probe']['attempts']}", flush=True)
        results.append(summarize_case(case, runs))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {"settings": settings, "agent_default_fetch_jitter": DEFAULT_JITTER, "read_cost": cost,
            "cases": results}


def _case_label(case: dict[str, Any], settings: dict[str, Any]) -> str:
    """The scenario as a reader of the table needs it (PgBouncer's pool, the replica's delay)."""
    if case["scenario"] == "pgbouncer":
        return f"pgbouncer (transaction pooling, pool {settings['pool_size']})"
    if case["scenario"] == "replica":
        return f"replica (applies commits {REPLICA_DELAY} late)"
    return case["scenario"]


def report(doc: dict[str, Any]) -> None:
    """The tables of one result (also rendered into docs/benchmarks.md by bench.make_docs)."""
    settings = doc["settings"]
    cost = doc["read_cost"]
    if cost:
        print_table(f"One delta read (ms per read, mean of {cost['reads']})",
                    ["connection", "wall", "agent CPU", "server CPU"],
                    [[mode, cost[mode]["wall_ms"], cost[mode]["agent_cpu_ms"], cost[mode]["server_cpu_ms"]]
                     for mode in ("kept", "new")])
    latency, server = [], []
    for case in doc["cases"]:
        m, runs = case["median"], case["runs"]
        last, every = m["last_agent_ms"], m["every_agent_ms"]
        label = _case_label(case, settings)
        latency.append([label, case["fetch_jitter"], len(runs), last.get("p50"), last.get("max"), every.get("p50"),
                        m["missed"], m["start_s"]])
        start, changes = m["errors_start"], m["errors_changes"]
        server.append([label, case["fetch_jitter"], m["max_reader_connections"], m["server_reader_connects"],
                       m["server_refused"], _median([r.get("read_server_cpu_s") for r in runs]),
                       _median([r.get("agents_cpu_s") for r in runs]),
                       f"{changes['too_many_clients']} ({start['too_many_clients']})",
                       changes["prepared_statement"], f"{changes['lines']} ({start['lines']})",
                       f"{m['probe_failures']}/{m['probe_attempts']}"])
    print_table(f"{settings['agents']} agents, max_connections {settings['max_connections']}, "
                f"{settings['changes']} changes {settings['spacing']:g} s apart: COMMIT → the last agent applied "
                "(ms, over the changes; median of runs)",
                ["case", "fetch_jitter s", "runs", "last p50", "last max", "every agent p50",
                 "missed", "start s"], latency)
    print_table("While the changes flowed: server connections, CPU, errors "
                "(median of runs; log lines while the changes flowed, at start in parentheses)",
                ["case", "fetch_jitter s", "reader backends max", "reader connects", "refused (server log)",
                 "read server CPU s", "agents CPU s", "log: too many clients", "log: prepared stmt",
                 "log: error lines", "other client failed/tries"], server)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated: direct,pgbouncer,replica")
    parser.add_argument("--jitters", default="0,0.02,0.05", help="fetch_jitter values of the direct scenario")
    parser.add_argument("--max-connections", type=int, help="PostgreSQL max_connections (default N / 4, ≥ 12)")
    parser.add_argument("--pool-size", type=int, default=20, help="PgBouncer default_pool_size")
    parser.add_argument("--processes", type=int, default=PROCESSES, help="worker processes hosting the agents")
    parser.add_argument("--db-idle-timeout", type=float,
                        help="the agents' db_idle_timeout (default: the agent's own default)")
    parser.add_argument("--reader-connection-limit", type=int,
                        help="ALTER ROLE <reader> CONNECTION LIMIT this (default: none)")
    parser.add_argument("--spacing", type=float, default=1.0, help="seconds between changes")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds from all ready to the first change")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="bound on the agents' start (s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="bound on convergence after the last change (s)")
    parser.add_argument("--keep-logs", type=Path, help="copy each run's agent, relay and server logs here")
    parser.add_argument("--smoke", action="store_true", help="N = 12, 2 changes, one run per scenario (CI)")
    args = parser.parse_args()
    if args.smoke:
        # Crowded too (12 agents, 5 slots left to them), but agents that got a slot give it
        # back 0.2 s after their last read: with the default 60 s the start alone takes 60 s.
        # 16 connections: 13 not reserved, 4 of them the coordinator's, 2–3 PgBouncer's auth_user.
        args.agents, args.changes, args.runs, args.jitters = 12, 2, 1, str(DEFAULT_JITTER)
        args.max_connections = 16
        args.pool_size, args.processes, args.timeout, args.start_timeout = 3, 1, 15.0, 20.0
        args.spacing, args.settle, args.db_idle_timeout = 0.5, 0.5, 0.2
    if args.max_connections is None:
        args.max_connections = max(12, args.agents // 4)
    doc = main(args)
    report(doc)
    print(f"\nwrote {write_result('scale', doc, smoke=args.smoke)}")


if __name__ == "__main__":
    cli()
