"""OFREP on the local API (agent/flags/) over real TCP and Unix-socket connections.

The server runs in the test's event loop with a store fed Change objects, like
tests/test_api.py; the evaluation itself is the flagd evaluator library's. The
real OpenFeature SDKs against a real agent are in tests/test_flags_sdk.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import agent.flags.ofrep as ofrep
from agent.store import Store
from tests.agent_harness import Running, serving_api
from tests.builders import change

pytestmark = pytest.mark.anyio
ORG = "acme"
EVALUATE = "/ofrep/v1/evaluate/flags"

ROLLOUT = {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off",
           "targeting": {"fractional": [["on", 50], ["off", 50]]}}
BY_EMAIL = {"state": "ENABLED", "variants": {"acme": "blue", "others": "grey"}, "defaultVariant": "others",
            "targeting": {"if": [{"ends_with": [{"var": "email"}, "@acme.com"]}, "acme", None]}}
BY_VERSION = {"state": "ENABLED", "variants": {"new": 2, "old": 1}, "defaultVariant": "old",
              "targeting": {"if": [{"sem_ver": [{"var": "appVersion"}, ">=", "2.1.0"]}, "new",
                                   {"starts_with": [{"var": "region"}, "eu-"]}, "new", None]}}
DISABLED = {"state": "DISABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on"}


def flag_store() -> Store:
    """Flags in `features` (static and flagd definitions) and a plain entry elsewhere."""
    store = Store(ORG)
    store.apply(
        [
            change("features", "dark-mode", True, 1, 1),
            change("features", "greeting", "hello", 1, 2),
            change("features", "ratio", 0.25, 1, 3),
            change("features", "limits", {"rpm": 100}, 1, 4),
            change("features", "rollout", ROLLOUT, 1, 5),
            change("features", "theme", BY_EMAIL, 1, 6),
            change("features", "api-level", BY_VERSION, 1, 7),
            change("features", "old-banner", DISABLED, 1, 8),
            change("ai", "threshold", 0.9, 1, 9),
        ],
        revision=9,
        source="warmload",
    )
    return store


async def evaluate(running: Running, key: str, context: dict[str, Any] | None = None) -> httpx.Response:
    body = {} if context is None else {"context": context}
    return await running.tcp.post(f"{EVALUATE}/{key}", json=body)


def count(running: Running, name: str, **labels: str) -> float:
    return running.status.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def store() -> Store:
    return flag_store()


@pytest.fixture
async def running(store: Store, tmp_path: Path) -> AsyncIterator[Running]:
    async with serving_api(store, tmp_path) as running:
        yield running


async def test_plain_values_are_static_flags(running: Running) -> None:
    expected = {"dark-mode": True, "greeting": "hello", "ratio": 0.25, "limits": {"rpm": 100}}
    for key, value in expected.items():
        r = await evaluate(running, key)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json() == {"key": key, "value": value, "reason": "STATIC", "variant": "static",
                            "metadata": {"flagSetId": "features", "version": "1"}}
    # Entries of other services are not flags.
    r = await evaluate(running, "threshold")
    assert r.status_code == 404
    assert r.json()["errorCode"] == "FLAG_NOT_FOUND" and r.json()["key"] == "threshold"


async def test_targeting_by_context_attributes(running: Running) -> None:
    before = (await running.tcp.get("/v1/configs")).content
    r = await evaluate(running, "theme", {"targetingKey": "u1", "email": "ann@acme.com"})
    assert (r.json()["value"], r.json()["variant"], r.json()["reason"]) == ("blue", "acme", "TARGETING_MATCH")
    r = await evaluate(running, "theme", {"email": "bob@example.com"})
    assert (r.json()["value"], r.json()["variant"], r.json()["reason"]) == ("grey", "others", "DEFAULT")
    r = await evaluate(running, "theme")
    assert r.json()["value"] == "grey"
    cases = [({"appVersion": "2.1.0"}, 2), ({"appVersion": "v2.0.9"}, 1), ({"region": "eu-west-1"}, 2),
             ({"region": "us-east-1", "appVersion": "1.0"}, 1)]
    for context, value in cases:
        r = await evaluate(running, "api-level", context)
        assert r.status_code == 200 and r.json()["value"] == value, context
    # Evaluating changed nothing the API serves (the evaluator rewrites what it is given).
    assert (await running.tcp.get("/v1/configs")).content == before
    stored = running.store.snapshot.entries[("features", "theme")].value
    assert stored["defaultVariant"] == "others" and "default_variant" not in stored


async def test_fractional_rollout_is_even_stable_and_needs_a_targeting_key(running: Running) -> None:
    r = await evaluate(running, "rollout")
    assert r.status_code == 400
    assert r.json()["errorCode"] == "TARGETING_KEY_MISSING" and r.json()["key"] == "rollout"
    # The bulk path evaluates many keys cheaply; each answer carries every flag.
    first: dict[str, bool] = {}
    for i in range(2000):
        r = await running.tcp.post(EVALUATE, json={"context": {"targetingKey": f"user-{i}"}})
        flag = next(f for f in r.json()["flags"] if f["key"] == "rollout")
        first[f"user-{i}"] = flag["value"]
    share = sum(first.values()) / len(first)
    assert 0.46 <= share <= 0.54, share
    for key in list(first)[:200]:
        r = await evaluate(running, "rollout", {"targetingKey": key})
        assert r.json()["value"] is first[key]
        assert r.json()["reason"] == "TARGETING_MATCH"


async def test_disabled_flags_are_not_found_and_left_out_of_bulk(running: Running) -> None:
    r = await evaluate(running, "old-banner")
    assert r.status_code == 404
    assert r.json() == {"key": "old-banner", "errorCode": "FLAG_NOT_FOUND",
                        "errorDetails": "flag 'old-banner' is disabled"}
    keys = [f["key"] for f in (await running.tcp.post(EVALUATE, json={})).json()["flags"]]
    assert "old-banner" not in keys and "dark-mode" in keys
    assert count(running, "config_agent_flag_evaluations_total", flag="old-banner", variant="",
                         reason="DISABLED") == 2


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "PARSE_ERROR"),
        (b"[1, 2]", "PARSE_ERROR"),
        (b'{"context": NaN}', "PARSE_ERROR"),
        (b"\xff\xfe", "PARSE_ERROR"),
        (b"[" * 100_00 + b"]" * 100_00, "PARSE_ERROR"),
        (b'{"context": 5}', "INVALID_CONTEXT"),
        (b'{"context": ["a"]}', "INVALID_CONTEXT"),
        (b'{"context": {"targetingKey": 7}}', "INVALID_CONTEXT"),
    ],
)
async def test_malformed_requests_get_the_spec_error(running: Running, body: bytes, code: str) -> None:
    r = await running.tcp.post(f"{EVALUATE}/dark-mode", content=body)
    assert r.status_code == 400
    assert r.json()["errorCode"] == code and r.json()["key"] == "dark-mode" and r.json()["errorDetails"]
    r = await running.tcp.post(EVALUATE, content=body)
    assert r.status_code == 400
    assert r.json()["errorCode"] == code and "key" not in r.json()
    # The agent still answers, and nothing changed.
    assert (await evaluate(running, "dark-mode")).json()["value"] is True


async def test_what_is_not_an_evaluation_is_refused_in_json(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    r = await running.tcp.get(f"{EVALUATE}/dark-mode")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
    r = await running.tcp.post("/ofrep/v2/whatever", json={})
    assert r.status_code == 404
    r = await running.tcp.post(f"{EVALUATE}/dark-mode", content=b"{" + b" " * (ofrep.MAX_BODY_BYTES + 1) + b"}")
    assert r.status_code == 413
    # A body that trickles in is cut off (the deadline is shortened here, not faked).
    monkeypatch.setattr(ofrep, "BODY_TIMEOUT", 0.2)

    async def trickle() -> AsyncIterator[bytes]:
        yield b"{"
        await anyio.sleep(1)
        yield b"}"

    r = await running.tcp.post(f"{EVALUATE}/dark-mode", content=trickle())
    assert r.status_code == 408
    for key in ("no-such-flag", "x" * 500, "..%2F..", "ai/threshold"):
        r = await running.tcp.post(f"{EVALUATE}/{key}", json={})
        assert r.status_code == 404 and r.json()["errorCode"] == "FLAG_NOT_FOUND"
    # Unknown keys share one series: strangers cannot grow the metrics.
    assert count(running, "config_agent_flag_evaluations_total", flag="(unknown)", variant="",
                         reason="ERROR") == 4
    assert count(running, "config_agent_flag_errors_total", flag="(unknown)", code="FLAG_NOT_FOUND") == 4


async def test_a_definition_written_past_the_writer_is_a_parse_error(running: Running) -> None:
    running.store.apply([change("features", "broken", {"state": "ON", "variants": {"a": 1}}, 1, 10),
                         change("features", "wrong-variant", {"state": "ENABLED", "variants": {"a": 1},
                                "defaultVariant": "a", "targeting": {"if": [True, "zzz"]}}, 1, 11)],
                        revision=11, source="pubsub")
    r = await evaluate(running, "broken")
    assert r.status_code == 400 and r.json()["errorCode"] == "PARSE_ERROR"
    assert "state" in r.json()["errorDetails"]
    r = await evaluate(running, "wrong-variant")
    assert r.status_code == 400 and r.json()["errorCode"] == "GENERAL"
    flags = {f["key"]: f for f in (await running.tcp.post(EVALUATE, json={})).json()["flags"]}
    assert flags["broken"]["errorCode"] == "PARSE_ERROR" and flags["dark-mode"]["value"] is True


async def test_bulk_etag_follows_the_revision_and_the_context(running: Running) -> None:
    context = {"context": {"targetingKey": "u1", "email": "ann@acme.com"}}
    r = await running.tcp.post(EVALUATE, json=context)
    assert r.status_code == 200
    etag = r.headers["etag"]
    assert etag.startswith('"9-')
    flags = {f["key"]: f for f in r.json()["flags"]}
    assert flags["theme"]["value"] == "blue" and flags["greeting"]["value"] == "hello"
    r = await running.tcp.post(EVALUATE, json=context, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    other = await running.tcp.post(EVALUATE, json={"context": {"targetingKey": "u2"}},
                                   headers={"If-None-Match": etag})
    assert other.status_code == 200 and other.headers["etag"] != etag
    running.store.apply([change("features", "greeting", "bonjour", 2, 10)], revision=10, source="pubsub")
    r = await running.tcp.post(EVALUATE, json=context, headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.headers["etag"].startswith('"10-')
    assert {f["key"]: f for f in r.json()["flags"]}["greeting"]["value"] == "bonjour"
    # A change outside the flag services moves the revision too: one extra refetch, never a stale cache.
    running.store.apply([change("ai", "threshold", 0.5, 2, 11)], revision=11, source="pubsub")
    r = await running.tcp.post(EVALUATE, json=context, headers={"If-None-Match": r.headers["etag"]})
    assert r.status_code == 200


async def test_configuration_endpoint(running: Running) -> None:
    r = await running.tcp.get("/ofrep/v1/configuration")
    assert r.status_code == 200
    polling = r.json()["capabilities"]["cacheInvalidation"]["polling"]
    assert polling == {"enabled": True, "minPollingIntervalMs": 1000}
    r2 = await running.tcp.get("/ofrep/v1/configuration", headers={"If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304
    assert (await running.tcp.post("/ofrep/v1/configuration")).status_code == 405


async def test_metrics_count_by_flag_variant_and_reason(running: Running) -> None:
    for email in ("a@acme.com", "b@acme.com", "c@example.com"):
        await evaluate(running, "theme", {"email": email})
    await evaluate(running, "dark-mode")
    evaluations = "config_agent_flag_evaluations_total"
    assert count(running, evaluations, flag="theme", variant="acme", reason="TARGETING_MATCH") == 2
    assert count(running, evaluations, flag="theme", variant="others", reason="DEFAULT") == 1
    assert count(running, evaluations, flag="dark-mode", variant="static", reason="STATIC") == 1
    exposed = "\n".join(
        f"{s.name}{s.labels}" for m in running.status.metrics.registry.collect() for s in m.samples
        if s.name.startswith("config_agent_flag")
    )
    assert "acme.com" not in exposed and "example.com" not in exposed


async def test_same_answers_over_the_unix_socket(running: Running) -> None:
    requests = [
        ("POST", f"{EVALUATE}/theme", b'{"context": {"email": "a@acme.com"}}'),
        ("POST", f"{EVALUATE}/nope", b"{}"),
        ("POST", f"{EVALUATE}/rollout", b"{}"),
        ("POST", EVALUATE, b'{"context": {"targetingKey": "k"}}'),
        ("POST", EVALUATE, b"nope"),
        ("GET", "/ofrep/v1/configuration", b""),
    ]
    for method, path, body in requests:
        a = await running.tcp.request(method, path, content=body)
        b = await running.uds.request(method, path, content=body)
        assert (a.status_code, a.content) == (b.status_code, b.content), path
        assert a.headers.get("etag") == b.headers.get("etag")


@pytest.mark.parametrize("store", [Store(ORG)], ids=["unloaded"])
async def test_evaluations_before_the_first_load_are_503(running: Running) -> None:
    r = await evaluate(running, "dark-mode")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


async def test_hostile_context_values_neither_fail_nor_flood_the_log(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    contexts: list[dict[str, Any]] = [
        {"appVersion": "not-a-version"}, {"appVersion": None}, {"appVersion": {"a": [1]}},
        {"region": 5}, {"email": ["x"]}, {"targetingKey": "", "$flagd": {"flagKey": "other"}},
        {"region": "eu-" + "x" * 10_000},
    ]
    with caplog.at_level("DEBUG"):
        for context in contexts:
            for key in ("api-level", "theme"):
                r = await evaluate(running, key, context)
                assert r.status_code == 200, (context, r.text)
    assert [rec for rec in caplog.records if rec.levelno >= 30] == []
    # Lone surrogates are valid JSON escapes but not UTF-8; the evaluator may quote them back.
    running.store.apply([change("features", "echo", {"state": "ENABLED", "variants": {"a": "A"},
                                                     "defaultVariant": "a", "targeting": {"var": "pick"}}, 1, 10)],
                        revision=10, source="pubsub")
    body = b'{"context": {"targetingKey": "\\ud800", "pick": "\\udfff", "email": "\\ud800@acme.com"}}'
    r = await running.tcp.post(f"{EVALUATE}/echo", content=body)
    assert r.status_code == 400 and r.json()["errorCode"] == "GENERAL"
    r = await running.tcp.post(EVALUATE, content=body)
    assert r.status_code == 200 and r.headers["etag"]
    assert (await running.tcp.post(f"{EVALUATE}/theme", content=body)).json()["value"] == "blue"
