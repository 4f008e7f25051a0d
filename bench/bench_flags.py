#!/usr/bin/env python3
"""Benchmark OFREP evaluation of a targeting flag beside the plain-value GET, in the same run.

    python -m bench.bench_flags            3 runs × 10 s at 1,000 evaluations/s + 1,000 GETs/s
    python -m bench.bench_flags --smoke    1 run × 1 s (CI: checks it all runs)

Starts the agent's API (the real ApiServer: uvicorn + httptools + uvloop) in a
subprocess with a store of 1,000 entries, among them the flag `checkout` in service
`features`: a flagd definition whose targeting is `ends_with` on an attribute, else a
50/50 `fractional` on the targeting key (evaluated by the flagd evaluator library).

Open loop: requests are sent on a fixed schedule (`--rate` per second of each kind,
interleaved), `POST /ofrep/v1/evaluate/flags/checkout` with a new targeting key each
time and `GET /v1/configs/ai/threshold`, over 8 keep-alive connections per kind;
latency is measured from the scheduled send time (a late sender counts against us).
Then a closed loop (16 connections, as fast as the client goes) gives the most
evaluations/s this machine's 2 cores manage with the client on the same cores.
Prints tables and writes bench/results/flags.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import median_of_runs, print_table, summarize, write_result
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = 1000
CONNECTIONS = 8
CLOSED_CONNECTIONS = 16
EVALUATE_PATH = "/ofrep/v1/evaluate/flags/checkout"
GET_PATH = "/v1/configs/ai/threshold"
CHECKOUT = {
    "state": "ENABLED",
    "variants": {"new": "one-page", "old": "three-step"},
    "defaultVariant": "old",
    "targeting": {"if": [{"ends_with": [{"var": "email"}, "@acme.com"]}, "new",
                         {"fractional": [["new", 50], ["old", 50]]}]},
}

def evaluate_request(i: int) -> bytes:
    """One OFREP evaluation with a new targeting key (every 10th user is from acme.com)."""
    domain = "acme.com" if i % 10 == 0 else "example.com"
    body = json.dumps({"context": {"targetingKey": f"user-{i}", "email": f"user-{i}@{domain}"}}).encode()
    return (b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (EVALUATE_PATH.encode(), len(body), body))


def get_request(i: int) -> bytes:
    """The plain-value read an app makes instead of a flag."""
    return b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % GET_PATH.encode()


class Connection:
    """One keep-alive HTTP/1.1 connection; every answer of the API has a Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def open_loop(port: int, make: Callable[[int], bytes], rate: int, seconds: float,
                    t0: float) -> dict[str, Any]:
    """Send `rate` requests per second on a fixed schedule from `t0`; latencies from the schedule."""
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(await Connection.open(port))
    latencies: list[float] = []
    errors: list[str] = []
    variants: dict[str, int] = {}

    async def one(i: int, at: float) -> None:
        conn = await pool.get()
        try:
            status, body = await conn.request(make(i))
            latencies.append((loop.time() - at) * 1000)
            if status != 200:
                errors.append(f"{status} {body[:100]!r}")
            elif make is evaluate_request:
                variant = json.loads(body)["variant"]
                variants[variant] = variants.get(variant, 0) + 1
        finally:
            pool.put_nowait(conn)

    tasks = []
    total = int(rate * seconds)
    for i in range(total):
        at = t0 + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, at)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().close()
    elapsed = loop.time() - t0
    return {"sent": total, "achieved_per_s": round(total / elapsed, 1), "errors": len(errors),
            "first_errors": errors[:5], "latency_ms": summarize(latencies), "variants": variants}


async def closed_loop(port: int, make: Callable[[int], bytes], seconds: float) -> dict[str, Any]:
    """As many requests as CLOSED_CONNECTIONS connections get answered in `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    latencies: list[float] = []
    errors = 0
    counter = iter(range(10**9))

    async def worker() -> None:
        nonlocal errors
        conn = await Connection.open(port)
        try:
            while loop.time() < deadline:
                start = loop.time()
                status, _ = await conn.request(make(next(counter)))
                latencies.append((loop.time() - start) * 1000)
                errors += status != 200
        finally:
            conn.close()

    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(CLOSED_CONNECTIONS)))
    return {"per_s": round(len(latencies) / (loop.time() - start), 1), "errors": errors,
            "latency_ms": summarize(latencies)}


async def one_run(port: int, rate: int, seconds: float) -> dict[str, Any]:
    """Both kinds at `rate` per second at once, then each alone in a closed loop."""
    conn = await Connection.open(port)
    for i in range(200):  # warm up: the first evaluation parses the flag, connections open
        for make in (evaluate_request, get_request):
            status, body = await conn.request(make(i))
            assert status == 200, body
    conn.close()
    t0 = asyncio.get_running_loop().time() + 0.2
    evaluations, gets = await asyncio.gather(open_loop(port, evaluate_request, rate, seconds, t0),
                                             open_loop(port, get_request, rate, seconds, t0 + 0.5 / rate))
    return {
        "open_loop": {"evaluate": evaluations, "get": gets},
        "closed_loop": {"evaluate": await closed_loop(port, evaluate_request, min(seconds, 5.0)),
                        "get": await closed_loop(port, get_request, min(seconds, 5.0))},
    }


def start_server(port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    argv = [sys.executable, "-m", "bench.api_process", "--port", str(port), "--entries", str(ENTRIES - 2),
            "--entry", "ai", "threshold", "0.9", "--entry", "features", "checkout", json.dumps(CHECKOUT)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.split()[:1] != ["ready"]:
        proc.kill()
        raise SystemExit(f"the API did not start: {line!r}")
    return proc


def report(doc: dict[str, Any]) -> None:
    """The tables of one result (also rendered into docs/benchmarks.md by bench.make_docs)."""
    runs = doc["runs"]
    rows = []
    for kind, label in (("evaluate", "POST /ofrep/…/checkout (targeting)"), ("get", f"GET {GET_PATH}")):
        lat = doc["medians"][f"open_loop_{kind}_ms"]
        rows.append([label, doc["rate_per_s"],
                     statistics.median(r["open_loop"][kind]["achieved_per_s"] for r in runs),
                     lat["p50"], lat["p99"], lat["max"],
                     doc["medians"][f"closed_loop_{kind}_per_s"],
                     sum(r[loop][kind]["errors"] for r in runs for loop in ("open_loop", "closed_loop"))])
    print_table(f"Flag evaluation beside the plain GET (median of {len(runs)} run(s), {doc['seconds']:g} s each)",
                ["request", "target/s", "achieved/s", "p50 ms", "p99 ms", "max ms", "closed loop/s", "errors"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 run of 1 s: just prove it runs")
    parser.add_argument("--runs", type=int, default=3, help="runs (headline figures: their median)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of open-loop load per run")
    parser.add_argument("--rate", type=int, default=1000, help="evaluations (and GETs) per second")
    args = parser.parse_args()
    runs_wanted, seconds = (1, 1.0) if args.smoke else (args.runs, args.seconds)
    port = free_port()
    server = start_server(port)
    runs = []
    try:
        for _ in range(runs_wanted):
            runs.append(asyncio.run(one_run(port, args.rate, seconds)))
            time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()

    def median_of(path: tuple[str, str]) -> dict[str, Any]:
        return median_of_runs([run[path[0]][path[1]]["latency_ms"] for run in runs])

    doc: dict[str, Any] = {
        "rate_per_s": args.rate, "seconds": seconds, "runs": runs, "entries": ENTRIES,
        "connections": {"open_loop": CONNECTIONS, "closed_loop": CLOSED_CONNECTIONS},
        "medians": {
            "open_loop_evaluate_ms": median_of(("open_loop", "evaluate")),
            "open_loop_get_ms": median_of(("open_loop", "get")),
            "closed_loop_evaluate_per_s": statistics.median(r["closed_loop"]["evaluate"]["per_s"] for r in runs),
            "closed_loop_get_per_s": statistics.median(r["closed_loop"]["get"]["per_s"] for r in runs),
        },
        "errors": sum(r[loop][kind]["errors"] for r in runs for loop in ("open_loop", "closed_loop")
                      for kind in ("evaluate", "get")),
    }
    report(doc)
    path = write_result("flags", doc, smoke=args.smoke)
    print(f"wrote {path}")
    return 0 if doc["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
