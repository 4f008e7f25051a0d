"""`config-agent inject` as a process, over real HTTPS with a test CA (openssl CLI).

The must-hold: 200 concurrent AdmissionReviews are all answered, correctly, within
the webhook timeout the chart sets (injector.timeoutSeconds). Latencies are printed
(run with -s to see them). Bad requests get a 4xx with one line, never a 500.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from agent.inject import server
from agent.inject.values import DEFAULTS, merged
from tests.inject_support import CHART_DIR, agent_count, apply_response, load_pod, review

TIMEOUT = float(yaml.safe_load((CHART_DIR / "values.yaml").read_text())["injector"]["timeoutSeconds"])
CONFIG_AGENT = str(Path(sys.executable).parent / "config-agent")


def openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("openssl not found: apt-get install -y openssl")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA and a serving certificate for 127.0.0.1 (EC P-256, like cert-manager's ECDSA option)."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=config-agent-injector", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "1", "-extfile", "san.ext", cwd=d)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def webhook(pki: Path) -> Iterator[str]:
    """The webhook process; yields its base URL once /healthz answers over TLS."""
    port = free_port()
    values = pki / "values.json"
    values.write_text(json.dumps({"image": {"repository": "registry.example.com/config-agent"}}))
    log = pki / "webhook.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [CONFIG_AGENT, "inject", "--host", "127.0.0.1", "--port", str(port), "--values", str(values),
             "--tls-cert-file", str(pki / "tls.crt"), "--tls-key-file", str(pki / "tls.key"),
             "--log-level", "warning"],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        with httpx.Client(verify=ssl.create_default_context(cafile=pki / "ca.crt")) as client:
            while True:
                try:
                    if client.get(url + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the webhook did not answer /healthz within 20 s"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def tls(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki / "ca.crt")


def test_200_concurrent_reviews_within_the_timeout(webhook: str, tls: ssl.SSLContext) -> None:
    """200 reviews at once over 200 new TLS connections (handshakes included): the heavier case
    for the server. (A second burst on the same httpx client measures httpx, not the server: its
    pool went from 200 connections to 31 during that burst, whichever uvicorn loop/parser served.)"""
    pods = [load_pod(name) for name in ("deployment-pod", "init-and-native-sidecars", "job-pod", "not-annotated")]
    reviews = [review(pods[i % len(pods)], "org-acme") for i in range(200)]
    latencies: list[float] = []
    answers: list[dict[str, Any]] = [{} for _ in reviews]

    async def one(client: httpx.AsyncClient, index: int) -> None:
        started = time.perf_counter()
        response = await client.post(webhook + "/mutate", json=reviews[index], timeout=TIMEOUT)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        answers[index] = response.json()

    async def main() -> None:
        # One connection per review, as 200 API server requests in flight at once would open.
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(verify=tls, limits=limits) as client, anyio.create_task_group() as tg:
            for index in range(len(reviews)):
                tg.start_soon(one, client, index)

    started = time.perf_counter()
    anyio.run(main)
    wall = time.perf_counter() - started
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]
    print(f"\n200 concurrent reviews over TLS: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms, wall {wall:.2f} s (timeout {TIMEOUT:g} s)")
    assert latencies[-1] < TIMEOUT
    for index, result in enumerate(answers):
        pod = reviews[index]["request"]["object"]
        assert result["response"]["uid"] == reviews[index]["request"]["uid"]
        assert result["response"]["allowed"] is True
        patched = apply_response(pod, result)
        expected = 0 if pod["metadata"].get("name") == "plain" else 1
        assert agent_count(patched) == expected
        if expected:
            assert patched["spec"]["initContainers"][0]["image"] == "registry.example.com/config-agent:0.1.0"


BAD_REQUESTS = {
    "not json": ("POST", "/mutate", b"{not json", 400, "the body is not JSON"),
    "not a review": ("POST", "/mutate", b'{"kind": "Pod"}', 400, "not an AdmissionReview"),
    "old api version": ("POST", "/mutate", b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}',
                        400, "apiVersion must be admission.k8s.io/v1"),
    "no uid": ("POST", "/mutate", b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}',
               400, "no request.uid"),
    "object not a pod": ("POST", "/mutate", json.dumps(
        {**review({}, "x"), "request": {**review({}, "x")["request"], "object": ["a pod?"]}}).encode(),
        400, "request.object is not a pod"),
    "too large": ("POST", "/mutate", b" " * (4 * 1024 * 1024 + 1), 413, "larger than"),
    "GET on mutate": ("GET", "/mutate", b"", 405, "method GET not allowed"),
    "unknown path": ("POST", "/validate", b"{}", 404, "no such path"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_one_line(webhook: str, tls: ssl.SSLContext, case: str) -> None:
    method, path, body, status, text = BAD_REQUESTS[case]
    with httpx.Client(verify=tls) as client:
        response = client.request(method, webhook + path, content=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert text in error and "\n" not in error


def test_clients_that_do_not_trust_the_ca_are_refused(webhook: str) -> None:
    with httpx.Client(verify=ssl.create_default_context()) as client, pytest.raises(httpx.ConnectError):
        client.get(webhook + "/healthz")


def test_unusable_certificate_is_one_line_exit_2(pki: Path) -> None:
    result = subprocess.run(
        [CONFIG_AGENT, "inject", "--host", "127.0.0.1", "--port", str(free_port()),
         "--tls-cert-file", str(pki / "missing.crt"), "--tls-key-file", str(pki / "tls.key")],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tls-cert-file" in lines[0] and "missing.crt" in lines[0], result.stderr


def issue(pki: Path, name: str, common_name: str) -> tuple[Path, Path]:
    """Another serving certificate from the test CA."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}", cwd=pki)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext", cwd=pki)
    return pki / f"{name}.crt", pki / f"{name}.key"


def served_common_name(port: int, tls: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            tls.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        subject = dict(item for rdn in conn.getpeercert()["subject"] for item in rdn)
        return str(subject["commonName"])


def test_a_renewed_certificate_is_served_without_a_restart(
        pki: Path, tls: ssl.SSLContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cert-manager renews the Secret; the kubelet swaps the mounted files; new handshakes get the new one."""
    monkeypatch.setattr(server, "CERT_CHECK_INTERVAL", 0.05)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    for source, target in zip(issue(pki, "first", "first-cert"), (cert, key), strict=True):
        shutil.copy(source, target)

    async def main() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            port = await tg.start(partial(server.serve, merged(DEFAULTS), server.Tls(cert, key), "127.0.0.1", 0,
                                          stop=stop))
            assert await anyio.to_thread.run_sync(served_common_name, port, tls) == "first-cert"
            renewed = issue(pki, "second", "renewed-cert")
            for source, target in zip(renewed, (cert, key), strict=True):
                shutil.copy(source, target.with_suffix(".new"))
                os.replace(target.with_suffix(".new"), target)
            deadline = time.monotonic() + 5
            while await anyio.to_thread.run_sync(served_common_name, port, tls) != "renewed-cert":
                assert time.monotonic() < deadline, "the renewed certificate was not served within 5 s"
                await anyio.sleep(0.05)
            stop.set()

    anyio.run(main)
