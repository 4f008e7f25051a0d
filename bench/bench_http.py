#!/usr/bin/env python3
"""Benchmark the local API against nginx serving the same bytes as static files.

    python bench/bench_http.py            3 rounds × 10 s per target, medians
    python bench/bench_http.py --smoke    1 round × 1 s (CI: checks it all runs)

Starts the agent's API (uvicorn + httptools + uvloop, the real ApiServer) in a
subprocess with a store of 1,000 entries, and nginx (one worker, open_file_cache
on) serving the exact bytes of the same two responses from files. wrk runs 16
connections against GET /v1/configs/{service}/{key} and GET /v1/configs on both.
Prints a table and writes bench/results/http.json.

Needs: wrk and nginx (Debian: apt-get install -y wrk nginx-light).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "http.json"
ENTRIES = 1000
CONNECTIONS = 16
ENTRY_PATH = "/v1/configs/svc7/key7"
TARGETS = {"ratio_to_nginx": 0.2, "p99_ms": 3.0, "idle_rss_mb": 40.0}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    open_file_cache max=1000 inactive=60s;
    open_file_cache_valid 60s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/www;
        default_type application/json;
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


def wait_http(url: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fetch(url)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, seconds: int) -> dict[str, float]:
    """Run wrk; return requests/s and p99 latency in ms."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors on {url}:\n{out}")
    return {"rps": rps, "p99_ms": float(value) * _UNITS[unit]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 s: just prove it runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    rounds, seconds = (1, 1) if args.smoke else (args.rounds, args.seconds)
    missing = [
        tool for tool in ("wrk", "nginx")
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if missing:
        hint = "install with: apt-get install -y wrk nginx-light"
        print(f"bench_http: missing {', '.join(missing)}; {hint}", file=sys.stderr)
        return 2
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"

    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)
        api_port, nginx_port = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        api = subprocess.Popen([sys.executable, "-m", "bench.api_process", "--port", str(api_port),
                                "--entries", str(ENTRIES)], cwd=ROOT, env=env, stdout=subprocess.PIPE)
        nginx: subprocess.Popen[bytes] | None = None
        try:
            assert api.stdout is not None
            if api.stdout.readline().split()[:1] != [b"ready"]:
                raise RuntimeError("the API server did not start")
            api_base = f"http://127.0.0.1:{api_port}"
            entry_body, configs_body = fetch(api_base + ENTRY_PATH), fetch(api_base + "/v1/configs")
            www = tmp / "www"
            www.mkdir()
            (www / "entry.json").write_bytes(entry_body)
            (www / "configs.json").write_bytes(configs_body)
            for path in (www, www / "entry.json", www / "configs.json"):
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
            (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=nginx_port))
            nginx = subprocess.Popen([nginx_bin, "-c", str(tmp / "nginx.conf")], stderr=subprocess.DEVNULL)
            nginx_base = f"http://127.0.0.1:{nginx_port}"
            wait_http(nginx_base + "/entry.json")
            assert fetch(nginx_base + "/configs.json") == configs_body
            for _ in range(200):  # warm up caches before measuring idle memory
                fetch(api_base + ENTRY_PATH)
            idle_rss = rss_mb(api.pid)

            targets = {
                "entry": (api_base + ENTRY_PATH, nginx_base + "/entry.json"),
                "configs": (api_base + "/v1/configs", nginx_base + "/configs.json"),
            }
            samples: dict[str, list[dict[str, float]]] = {f"{s}_{n}": [] for n in targets for s in ("api", "nginx")}
            for _ in range(rounds):
                for name, (api_url, nginx_url) in targets.items():
                    samples[f"api_{name}"].append(wrk(api_url, seconds))
                    samples[f"nginx_{name}"].append(wrk(nginx_url, seconds))
            loaded_rss = rss_mb(api.pid)
        finally:
            for process in (api, nginx):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM if process is nginx else signal.SIGKILL)
                    process.wait(timeout=10)

    medians = {
        key: {metric: statistics.median(s[metric] for s in runs) for metric in ("rps", "p99_ms")}
        for key, runs in samples.items()
    }
    report: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full",
        "rounds": rounds,
        "seconds_per_run": seconds,
        "connections": CONNECTIONS,
        "entries": ENTRIES,
        "cpus": os.cpu_count(),
        "medians": medians,
        "runs": samples,
        "idle_rss_mb": round(idle_rss, 1),
        "rss_after_load_mb": round(loaded_rss, 1),
        "bytes": {"entry": len(entry_body), "configs": len(configs_body)},
    }
    verdicts: dict[str, bool] = {}
    print(f"{'target':<10}{'server':<8}{'req/s':>10}{'p99 ms':>9}{'ratio':>8}")
    for name in targets:
        api_m, nginx_m = medians[f"api_{name}"], medians[f"nginx_{name}"]
        ratio = api_m["rps"] / nginx_m["rps"]
        report[f"ratio_{name}"] = round(ratio, 3)
        verdicts[f"{name}: ratio >= {TARGETS['ratio_to_nginx']}"] = ratio >= TARGETS["ratio_to_nginx"]
        verdicts[f"{name}: p99 <= {TARGETS['p99_ms']} ms"] = api_m["p99_ms"] <= TARGETS["p99_ms"]
        print(f"{name:<10}{'api':<8}{api_m['rps']:>10.0f}{api_m['p99_ms']:>9.2f}{ratio:>8.2f}")
        print(f"{'':<10}{'nginx':<8}{nginx_m['rps']:>10.0f}{nginx_m['p99_ms']:>9.2f}{1:>8.2f}")
    verdicts[f"idle RSS <= {TARGETS['idle_rss_mb']} MB"] = idle_rss <= TARGETS["idle_rss_mb"]
    print(f"idle RSS {idle_rss:.1f} MB, after load {loaded_rss:.1f} MB ({ENTRIES} entries)")
    for label, ok in verdicts.items():
        print(f"  {'ok  ' if ok else 'MISS'} {label}")
    report["verdicts"] = verdicts
    # Smoke runs never overwrite the full figures; BENCH_RESULTS_DIR redirects (tests).
    out_dir = Path(os.environ.get("BENCH_RESULTS_DIR", RESULTS.parent))
    out = out_dir / ("http.smoke.json" if args.smoke else RESULTS.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
