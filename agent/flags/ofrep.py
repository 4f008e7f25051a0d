"""The OpenFeature Remote Evaluation Protocol (OFREP) routes of the local API.

    POST /ofrep/v1/evaluate/flags/{key}   one flag: 200 result, 400/404 {key, errorCode, errorDetails}
    POST /ofrep/v1/evaluate/flags         every flag: {"flags": [...]}, ETag; If-None-Match → 304
    GET  /ofrep/v1/configuration          what this flag system supports (polling, types)

The bulk ETag is the snapshot revision plus a hash of the context: a client that
polls with If-None-Match gets 304 until a write changes the revision (or it sends
another context). Requests are bounded: a body of at most 64 KiB, received within
10 s. Nothing a client sends ends in a 500 or changes a value.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

import agent
from agent.metrics import Metrics
from agent.sinks.responses import (
    JSON,
    NO_CACHE,
    BadRequest,
    Receive,
    Scope,
    Send,
    check_read_method,
    etag_matches,
    header,
    loaded_snapshot,
    read_body,
    send_body,
    send_not_modified,
)
from agent.store import Snapshot, Store

# The evaluator (flagd's library: JSON Logic, semver, murmur3) is imported by the first
# evaluation: most agents serve no flags, and each pod pays its memory (issue #21).
if TYPE_CHECKING:
    from agent.flags.evaluate import Result
    from agent.flags.flagset import FlagSet

PREFIX = "/ofrep/"
EVALUATE = "/ofrep/v1/evaluate/flags"
CONFIGURATION = "/ofrep/v1/configuration"
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT = 10.0
# Providers that poll should not come more often than this (the agent answers a poll from
# memory, so this is about the app's network, not the agent's load).
MIN_POLLING_INTERVAL_MS = 1000
ALLOW_POST = (b"allow", b"POST")


def configuration_document() -> dict[str, Any]:
    """The `/ofrep/v1/configuration` answer (OFREP configurationResponse)."""
    return {
        "name": "config-agent",
        "capabilities": {
            "cacheInvalidation": {"polling": {"enabled": True, "minPollingIntervalMs": MIN_POLLING_INTERVAL_MS}},
            "flagEvaluation": {"supportedTypes": ["int", "float", "string", "boolean", "object"]},
        },
    }


class OfrepRoutes:
    """Serves the OFREP paths for one store."""

    def __init__(self, store: Store, metrics: Metrics, flag_services: Collection[str]) -> None:
        self._store = store
        self._flag_services = tuple(flag_services)
        # The evaluator logs a bad context value (a version that is not semver: with a
        # traceback) at ERROR, so any local process could flood our log; the answer says it.
        logging.getLogger("openfeature.contrib").setLevel(logging.CRITICAL)
        self._evaluations = metrics.flag_evaluations
        self._errors = metrics.flag_errors
        self._counters: dict[tuple[str, str, str], Counter] = {}
        self._error_counters: dict[tuple[str, str], Counter] = {}
        self._last: FlagSet | None = None
        self._configuration = dump_json(configuration_document()) + b"\n"
        self._configuration_etag = b'"%s"' % agent.__version__.encode()

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one request under /ofrep/ (BadRequest for paths and methods we do not serve)."""
        path: str = scope["path"]
        method: str = scope["method"]
        if path == CONFIGURATION:
            check_read_method(scope)
            await self._send_configuration(scope, send)
            return
        if path != EVALUATE and not path.startswith(EVALUATE + "/"):
            raise BadRequest("no such path", 404)
        if method != "POST":
            raise BadRequest(f"method {method} not allowed", 405, [ALLOW_POST])
        body = await read_body(receive, MAX_BODY_BYTES, BODY_TIMEOUT)
        if body is None:
            return  # the client went away
        snapshot = loaded_snapshot(self._store)
        if path == EVALUATE:
            await self._bulk(scope, send, snapshot, body)
        else:
            await self._single(send, snapshot, path[len(EVALUATE) + 1:], body)

    def flags(self, snapshot: Snapshot) -> FlagSet:
        """The flag set of `snapshot`, reusing unchanged flags of the last one."""
        from agent.flags.flagset import flag_set

        flags = flag_set(snapshot, self._flag_services, self._last)
        self._last = flags
        return flags

    async def _single(self, send: Send, snapshot: Snapshot, key: str, body: bytes) -> None:
        from agent.flags.evaluate import UNKNOWN_FLAG, RequestError, evaluate, failure, parse_context

        flags = self.flags(snapshot)
        try:
            context, _ = parse_context(body)
        except RequestError as exc:
            result = failure(400, key, key if key in flags.flags else UNKNOWN_FLAG, exc.code, exc.details)
        else:
            result = evaluate(flags, key, context)
        self._record(result)
        await send_body(send, result.status, dump_json(result.document), JSON)

    async def _bulk(self, scope: Scope, send: Send, snapshot: Snapshot, body: bytes) -> None:
        from agent.flags.evaluate import RequestError, evaluate, parse_context

        try:
            context, sent = parse_context(body)
        except RequestError as exc:
            document = {"errorCode": str(exc.code), "errorDetails": exc.details}
            await send_body(send, 400, dump_json(document), JSON)
            return
        flags = self.flags(snapshot)
        headers: list[tuple[bytes, bytes]] = [NO_CACHE]
        if not flags.time_dependent:
            etag = _bulk_etag(snapshot.revision, sent)
            if etag_matches(header(scope, b"if-none-match"), etag):
                await send_not_modified(send, etag)
                return
            headers.append((b"etag", etag))
        documents = []
        for key in sorted(flags.flags):
            result = evaluate(flags, key, context)
            self._record(result)
            if result.reason != "DISABLED":  # flagd leaves disabled flags out of bulk answers
                documents.append(result.document)
        await send_body(send, 200, dump_json({"flags": documents}), JSON, headers)

    async def _send_configuration(self, scope: Scope, send: Send) -> None:
        etag = self._configuration_etag
        if etag_matches(header(scope, b"if-none-match"), etag):
            await send_not_modified(send, etag)
            return
        await send_body(send, 200, self._configuration, JSON, [(b"etag", etag)])

    def _record(self, result: Result) -> None:
        # Children looked up once per label set: labels() takes a lock and builds a key.
        flag, variant, reason, error_code = result.flag_label, result.variant, result.reason, result.error_code
        ident = (flag, variant, reason)
        counter = self._counters.get(ident)
        if counter is None:
            counter = self._counters[ident] = self._evaluations.labels(flag=flag, variant=variant, reason=reason)
        counter.inc()
        if error_code:
            errors = self._error_counters.get((flag, error_code))
            if errors is None:
                errors = self._error_counters[(flag, error_code)] = self._errors.labels(flag=flag, code=error_code)
            errors.inc()


def dump_json(doc: Any) -> bytes:
    """JSON in ASCII: a context may hold lone surrogates (valid JSON escapes, not UTF-8), and
    the evaluator's error details may quote it."""
    return json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _bulk_etag(revision: int, context: dict[str, Any]) -> bytes:
    """`"<revision>-<context hash>"`: a new write or another context is a new answer."""
    canonical = json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()
    return b'"%d-%s"' % (revision, digest.encode())
