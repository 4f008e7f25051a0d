# ruff: noqa: E501  (Markdown prose cannot be wrapped everywhere)
"""The hand-kept prose of docs/benchmarks.md: why the figures are what they are, and the
findings of one-off diagnostic runs (dated, with their commands). Every table comes from
bench/results through bench/make_docs.py."""

ANALYSIS = """
## Where the time goes (analysis of the full runs of 2026-12-02)

Written from the runs of 2026-12-02; the figures quoted here are that day's (the tables above are
re-rendered from the latest results). That machine was 2–4× slower on that day than in the run of
2026-11-27 (nginx served 42 k req/s against 98 k, the raw Redis PUBLISH→receive hop took 0.57 ms against
0.17 ms): compare each figure with the baseline of the same run, not with another day.

- **Single agent.** COMMIT → applied = Redis hop (raw PUBLISH→receive p50 0.57 ms on this day)
  + one delta query + apply. The p99 tail comes from sharing two cores with PostgreSQL, Redis, the
  writer and the probe; the trigger → relay path adds one more hop (PostgreSQL NOTIFY → relay → Redis).
- **Many agents: CPU-bound.** `bench_fanout_profile` adds up the CPU of every process taking part. At
  N = 100 one change costs 94 ms of CPU: 55 ms in the agents (553 µs per agent), 37 ms in PostgreSQL
  backends (367 µs per delta query, wake-up included), 0.7 ms in Redis, 1.7 ms in the writer. On 2 cores
  nothing can beat 47 ms, and the last agent got there in 52 ms. At N = 1,000 it is 750 ms of CPU per change
  (floor 375 ms) while changes arrive every 500 ms, so agents fall behind, coalesce and queue (1.6 s). The
  cProfile pass splits an agent's CPU per message into redis-py (19–22 % even with hiredis: its Python
  layers around the parser), builtins and asyncio (≈ 28 %), prometheus-client (9 %), json (8 %) and our
  own code (≈ 20 %, led by message validation). In a cluster the fan-out is spread over many nodes: what
  one node pays is (its agents) × ≈ 0.55 ms, plus ≈ 0.37 ms per agent on the PostgreSQL server, which is
  the figure to watch. LISTEN/NOTIFY per watcher skips the Redis hop and our sync engine, hence faster
  here, at the price of one permanent backend per pod.
- **Measured changes in this run.** The RLS lookup function is PL/pgSQL instead of a SECURITY DEFINER SQL
  function (PostgreSQL re-planned the SQL function's body in every query: the reader's delta query went
  from 240 to 120 µs of backend CPU in a tight loop). redis-py uses hiredis (redis-py with its pure-Python
  parser was 30 % of an agent's CPU per message). Metric children are looked up once. In the baselines runs of the
  same day before and after these changes: N = 100 81 → 54 ms, N = 1,000 2,236 → 1,344 ms. LISTEN/NOTIFY
  moved 15 → 18 and 227 → 210 ms over the same runs.
- **File sets.** Each change builds a new generation directory: one `mkdir` per service, a hard link
  per unchanged file, and an `fsync` of each *written* file (configs.json, configs.env, the changed
  entries). In the propagation benchmark, 100 agents share one disk and 10 processes, so their fsyncs
  queue. In a pod the chart mounts the output `emptyDir` with `medium: Memory`, where fsync is free.
- **Idle RSS** is import cost: bare Python 10.7 MiB, asyncio + ssl +9.3, pydantic-settings +13.7, redis
  +5.9, asyncpg +3.5, prometheus-client +2.1, uvicorn +3.4 → 52 MiB before any data. ≤ 40 MB needs dropping
  a required dependency (pydantic-settings is the largest).
- **DB connections.** The agent closes its read connection after `db_idle_timeout` (default 60 s)
  without a query and reopens it on the next announcement (a few ms on loopback with trust
  authentication; more with TLS and SCRAM).
"""

# How the scale-out benchmark runs a case (the figures come from scale.json's settings).
SCALE_SETUP = """
Each case runs on fresh private servers: PostgreSQL 15 with `max_connections = {max_connections}`
(`superuser_reserved_connections = 3`, so {slots} slots for non-superusers, 4 of them taken by the
coordinator's writer, sampler and the relay), Redis, a relay process that publishes every change,
and {agents} in-process agents in {processes} worker processes that all start at once. `pgbouncer`: the agents
connect through PgBouncer in front of the same server (transaction pooling, agents with
`database_pool_mode = transaction`); `replica`: the agents read a streaming replica that applies
commits late (`recovery_min_apply_delay`, `CONFIG_AGENT_DATABASE_READ_URL`), relay and writer use the
primary. The coordinator samples `pg_stat_activity` of the server the agents read from every 50 ms,
and a separate role (`probe_client`, "other client") connects and runs `SELECT 1` every 100 ms from
the first change until the last agent has the last one. "read server CPU s": every backend of the
server the agents read from (those that ended too), from the first change until the last agent had the
last one.
"""

# Why, and the findings of one-off diagnostic runs that no results file holds.
SCALE_ANALYSIS = """
**Why direct connections with more agents than slots take seconds.** A new connection costs the server
a forked backend, its start-up and the first query's catalog, plan and PL/pgSQL warm-up: the "new"
row of the delta-read table against the "kept" one. A refusal for lack of a non-reserved slot comes
after authentication, so it costs a forked backend too. Only as many agents as there are free slots can
hold a connection; every other agent connects, reads and closes for every change (the agent is
*crowded*: when a connect is refused, or a sample of the server's free slots — taken when a connection
opens and at most every 60 s ± 50 % on a held one, never on the read path — shows fewer than 5, it
gives its slot back after each read for 30 s and spreads its fetches over 1 s), and retries a refused
connect after 0.1 s doubling to 1 s with full jitter, logging one warning per crowded spell.
`grant-reader --connection-limit` caps the reader role below the free slots so that other clients
keep room. **PgBouncer** (transaction pooling in front of the same server) holds only its pool on the
server, refuses nothing and locks no one out: the recommended topology whenever a fleet has more pods
than the server has slots.

### Diagnostic runs of 2026-12-02 (one-off flags; no results file holds them)

Measured on 2026-12-02 with the code of that day, while other sessions shared the 2 cores (load
average 2–15): the runs of 13:18Z before the fixes (no crowded mode, no `grant-reader
--connection-limit`), those of 14:00–14:10Z ("after the fixes") with crowded mode but a busy backoff
of 0.25 → 2 s. Each is `python -m bench.bench_scale --scenario direct --agents 200 --max-connections 50
--changes 5 --runs 3` with the flags named (`--jitters 0.02` unless named; rebuilt from the flags the
hand-written section of that day listed, which did not keep the command lines). Figures: last agent
p50 / max over the changes.

- **fetch_jitter makes no measurable difference** (`--jitters 0,0.02,0.05`): 8,329 / 8,347 / 8,562 ms
  p50 against 50 slots, and with room for every agent (`--max-connections 300 --jitters 0,0.02,0.05`)
  232 / 250 / 308 ms (200 reader backends held, no error). The fleet's fetches are already spread by
  the Redis fan-out (tens of ms) and, when crowded, by seconds of connect backlog; the jitter only adds
  its mean. Hence `fetch_jitter = 0` by default.
- **Start: 69–72 s before the fixes.** The 43 agents that got a slot for their warm-load kept it for
  `db_idle_timeout` (60 s); the other 157 were refused and retried every ≤ 3 s (about 5,200 refused
  connections, one log line each) until those 43 closed. With `--db-idle-timeout 0.05` the start took
  15–20 s; after the fixes (crowded mode, one warning per spell) 12–14 s and ~150 log lines.
- **A new connection per agent per change costs seconds even when nothing is refused**
  (`--max-connections 300 --db-idle-timeout 0.05`, 2 runs): 4,800 / 5,600 ms.
- **Other clients were locked out.** The agents took all 43 non-reserved slots; the other client's
  connects failed in 20–35 % of attempts while changes flowed. `--reader-connection-limit 35
  --db-idle-timeout 0.05`: 8,290 / 10,795 ms and 0 failures in 62 attempts; after the fixes
  (`--jitters 0 --reader-connection-limit 35`): 9,602 / 11,941 ms, 0 failures in 71 attempts against
  18 in 83 without the limit.
- **Starvation before the fixes** (`--settle 35 --changes 3 --runs 1`, first change 35 s after the
  start): an agent that was never refused kept its idle connection for `db_idle_timeout`, so the first
  43 agents kept their slots idle and the other 157 never got in while changes kept arriving: 149
  agents had none of the 3 changes 60 s later (447 missed) and the other client was refused 479 times
  out of 491. Closing idle connections at once (`--settle 35 --db-idle-timeout 0.05 --runs 1`) removed
  it: 10,097 / 12,484 ms, 0 missed.
"""

OUTAGE_INTRO = """
The relay SIGKILLed while nothing changes, then changes published directly (COMMIT, then PUBLISH
from the writer) while it is still down, then the relay restarted. Per second after the kill:
resubscribes, new Redis connections and statements of the reader role. How the agents run (with a
heartbeat source or with heartbeats off) is in the command's docstring (`bench/bench_outage.py`).
"""
