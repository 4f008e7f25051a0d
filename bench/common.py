"""Shared pieces of the benchmarks: private servers, statistics, tables, result files.

Every benchmark runs against servers of its own (a private PostgreSQL cluster with
pg_stat_statements and room for 1,200 connections, a private Redis, and for the
etcd baseline a private etcd), all on loopback, so no other traffic distorts the
query counts. Results go to `bench/results/<name>.json` beside a printed table.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg

from agent.demo_servers import free_port
from tests.servers import PrivatePostgres, PrivateRedis, wait_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
READER_ROLE = "bench_reader"
PG_EXTRA_CONF = """
max_connections = 1200
shared_buffers = 256MB
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
pg_stat_statements.track_utility = on
"""


def raise_fd_limit() -> None:
    """Thousands of agents hold thousands of sockets: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class BenchPostgres(PrivatePostgres):
    """A private cluster with pg_stat_statements and max_connections = 1200."""

    def init(self) -> None:
        super().init()
        with open(self.data / "postgresql.conf", "a") as conf:  # later lines win
            conf.write(PG_EXTRA_CONF)

    @property
    def postgres_url(self) -> str:
        """Superuser URL of the `postgres` database (reading stats there adds no load to ours)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def reader_url(self) -> str:
        """URL of the tenant reader role the agents and baseline watchers log in with."""
        return f"postgresql://{READER_ROLE}@127.0.0.1:{self.port}/{self.dbname}"


class Servers:
    """PostgreSQL (migrated, seeded org, reader role) and Redis for one benchmark run."""

    def __init__(self, org: str = "bench") -> None:
        self.org = org
        self.smoke = False  # benchmarks shorten their intervals in --smoke runs
        self.tmp = Path(tempfile.mkdtemp(prefix="config-agent-bench-"))
        os.chmod(self.tmp, 0o755)
        self.pg = BenchPostgres(self.tmp / "pg")
        (self.tmp / "pg").mkdir()
        self.redis = PrivateRedis(self.tmp / "redis", extra=["--maxclients", "20000"])

    def __enter__(self) -> Servers:
        try:
            self.pg.init()
            self.pg.start()
            # migrate() calls anyio.run(): give it a thread without a running event loop.
            with ThreadPoolExecutor(1) as pool:
                pool.submit(self.pg.migrate).result()
            self.redis.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis.stop()
        self.pg.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def setup(self, entries: int) -> None:
        """Reader role for the org, pg_stat_statements, and `entries` seeded rows."""
        admin = await asyncpg.connect(self.pg.postgres_url)
        try:  # the view is per database, the counts are cluster-wide: read them from `postgres`
            await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        finally:
            await admin.close()
        db = await asyncpg.connect(self.pg.admin_url)
        try:
            await db.execute("SELECT config_agent_grant_reader($1, $2, NULL)", READER_ROLE, self.org)
            await seed(db, self.org, entries)
        finally:
            await db.close()


async def seed(db: asyncpg.Connection, org: str, entries: int) -> None:
    """Insert `entries` rows (service s0..s9, keys k0..) in one statement."""
    if entries <= 0:
        return
    await db.execute(
        """INSERT INTO service_configs (org_id, service, key, value)
           SELECT $1, 's' || (i % 10), 'k' || i, to_jsonb(i) FROM generate_series(0, $2 - 1) i
           ON CONFLICT DO NOTHING""",
        org, entries,
    )


async def statements_by_role(pg: BenchPostgres) -> dict[str, int]:
    """Statements executed so far per role (pg_stat_statements, updated at once)."""
    conn = await asyncpg.connect(pg.postgres_url)
    try:
        rows = await conn.fetch(
            """SELECT r.rolname, sum(s.calls)::bigint AS calls
                 FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
                 JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1
                GROUP BY r.rolname""", pg.dbname)
        return {r["rolname"]: int(r["calls"]) for r in rows}
    finally:
        await conn.close()


async def backends(pg: BenchPostgres, role: str = READER_ROLE) -> int:
    """Server backends (connections) currently held by `role`."""
    conn = await asyncpg.connect(pg.postgres_url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role))
    finally:
        await conn.close()


def summarize(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99/max/mean in milliseconds (nearest-rank percentiles)."""
    if not samples_ms:
        return {"n": 0}
    ordered = sorted(samples_ms)

    def pct(p: float) -> float:
        index = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
        return round(ordered[index], 3)

    return {
        "n": len(ordered),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": round(ordered[-1], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


def median_of_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The per-field median of several summaries (headline figures: median of ≥ 3 runs)."""
    out: dict[str, Any] = {}
    for field in ("n", "p50", "p90", "p99", "max", "mean"):
        values = [r[field] for r in runs if field in r]
        if values:
            out[field] = round(statistics.median(values), 3)
    out["runs"] = len(runs)
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    from tests.servers import _pg_bin

    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "missing"

    import asyncpg as apg
    import redis as rpy

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": version([_pg_bin("postgres"), "--version"]),
        "redis": version(["redis-server", "--version"]).split(" sha=")[0],
        "etcd": version(["etcd", "--version"]).splitlines()[0] if shutil.which("etcd") else "missing",
        "asyncpg": apg.__version__,
        "redis_py": rpy.__version__,
    }


def write_result(name: str, doc: dict[str, Any], *, smoke: bool) -> Path:
    """Write bench/results/<name>.json (smoke runs: <name>.smoke.json, not the published one).

    BENCH_RESULTS_DIR overrides the directory (the smoke test writes to a temporary one).
    """
    results = Path(os.environ.get("BENCH_RESULTS_DIR", RESULTS))
    results.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "smoke": smoke, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime()),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "machine": machine(), **doc}
    path = results / (f"{name}.smoke.json" if smoke else f"{name}.json")
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain Markdown table on stdout (pasted as-is into docs/benchmarks.md)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n### {title}\n")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def etcd_binary() -> str:
    """The etcd server binary; missing etcd is an error, never a silent skip."""
    found = shutil.which("etcd")
    if found is None:
        raise SystemExit("etcd not found: install the Debian package etcd-server "
                         "(or pass --skip-etcd to leave the etcd baseline out explicitly)")
    return found


class PrivateEtcd:
    """A single-member etcd on loopback ports of its own."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [etcd_binary(), "--data-dir", str(self.dir), "--name", "bench",
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-cluster", f"bench=http://127.0.0.1:{self.peer_port}",
             "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.client_port, timeout=20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_mib(pid: int) -> float:
    """VmRSS of a process in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def agent_env(servers: Servers, **settings: Any) -> dict[str, str]:
    """Environment for a `python -m agent …` subprocess (reader role, no metrics port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({
        "CONFIG_AGENT_DATABASE_URL": servers.pg.reader_url(),
        "CONFIG_AGENT_REDIS_URL": servers.redis.url,
        "CONFIG_AGENT_ORG_ID": servers.org,
        "CONFIG_AGENT_METRICS_PORT": "0",
        "CONFIG_AGENT_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
    })
    for name, value in settings.items():
        env[f"CONFIG_AGENT_{name.upper()}"] = str(value)
    return env
