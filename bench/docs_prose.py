# ruff: noqa: E501  (Markdown prose cannot be wrapped everywhere)
"""The hand-kept prose of docs/benchmarks.md: why the figures are what they are, and the
findings of one-off diagnostic runs (dated, with their commands). Every table comes from
bench/results through bench/make_docs.py."""

ANALYSIS = """
## Where the time goes (issue #21, runs of 2026-12-03)

Written from the runs of 2026-12-03 on a quiet machine (the tables above are re-rendered from the
latest results). Compare each figure with the baseline of the same run, not with another day.

- **The fan-out headline** (`python -m bench.bench_baselines --kinds ours,listen --watchers 100,1000
  --changes 30 --skip-etcd`, 3 runs, medians; LISTEN/NOTIFY of the same run beside each): last of 100
  agents 32.7 ms (LISTEN 8.4 ms, 4.2× in the median run-to-run ratio), last of 1,000 agents 422 ms,
  p99 1,561 ms (LISTEN 102 ms, 4.4×), 0 missed. Before issue #21 (be5c37a, one run the same day):
  159 ms and 14,460 ms with 704 agent-changes missed (LISTEN 10 and 114 ms).
- **What made 1,000 pods 30× slower and lose changes.** Every delta read carried a count over
  `pg_stat_activity` (the free-slot guard of issue #10), which copies every backend's status entry:
  O(backends) per read, O(pods²) per change. The agent now samples it only when a connection opens
  and at most once a minute on a held one; `tests/test_read_cost.py` fails if a read's backend CPU
  with 400 idle clients exceeds 1.5× that with 10 (the old query: 2.0×). The benchmark agents also
  expected the relay's heartbeat that no process sent, so every agent resubscribed and replayed every
  15 s mid-run (562 "deaf" lines): the benchmarks now publish the heartbeat as a relay does
  (`bench.harness.Heartbeats`) and log no deaf or lost line on a healthy run.
- **Still 4× LISTEN/NOTIFY: CPU.** `bench_fanout_profile` at N = 1,000 counts 727 ms of CPU per change
  on 2 cores (floor 364 ms; last agent 529 ms): 460 µs per agent in the agents, 242 µs per agent in
  PostgreSQL, 25 ms in Redis. The same harness hosting LISTEN/NOTIFY watchers measured 130 µs per
  watcher and 105 µs per watcher in PostgreSQL (last watcher 135 ms). Per change an agent does what a
  LISTEN watcher does (wake on a message, one query, apply) plus a Redis pub/sub message through
  redis-py (≈ 50 µs: its Python layers around hiredis, 23 % of the profile) and its fleet report
  (now one SET instead of SET + ZADD). Measured with py-spy on one worker of 100 agents: the delta
  read through asyncpg ≈ 35 % of the agent's CPU (kernel loopback work included), the Redis receive
  16 %, the report 10 %, store and metrics 8 %, the event loop most of the rest.
- **PostgreSQL per read.** With 1,000 readers woken at once a delta read costs 157 µs of backend CPU
  (a `SELECT 1` 50 µs, the LISTEN baseline's row lookup 100 µs, the same delta read as superuser,
  without row-level security, 121 µs). Migration 003 took the tenant policy's lookup out of a
  SECURITY DEFINER function (175 → 157 µs); the rest of the RLS cost is its two initplans.
- **Relay outage.** 200 agents, relay SIGKILLed for 90 s: the busiest second saw 22 resubscribes and
  27 reader statements (before: 200 and 228, every 15 s), and changes published directly during the
  outage reached every agent (`bench_outage`, section above).
- **File sets.** Each change builds a new generation directory: one `mkdir` per service, a hard link
  per unchanged file, and an `fsync` of each *written* file (configs.json, configs.env, the changed
  entries). In the propagation benchmark, 100 agents share one disk and 10 processes, so their fsyncs
  queue. In a pod the chart mounts the output `emptyDir` with `medium: Memory`, where fsync is free.
- **Idle RSS and start.** 58.3 → 46.6 MiB and 646 → 348 ms (process start → `/readyz`): settings
  without pydantic (-8.9 MiB, -130 ms), and only what `run` uses is imported (no injector, YAML,
  webhook server; the flag evaluator on the first evaluation, the OpenAPI document on the first
  request). What is left is the libraries' import cost: `redis.asyncio` ≈ 139 ms of the start
  (asyncio, ssl, importlib.metadata), uvicorn ≈ 3.5 MiB and 30 ms (click, its reloader and
  watchfiles come with any uvicorn import), uvloop 1.2 MiB, prometheus-client's exposition servers
  1 MiB.
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
