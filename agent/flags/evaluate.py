"""One OFREP evaluation: a request body in, an OFREP result document out.

Error codes follow OFREP and flagd's OFREP service:

    PARSE_ERROR            the body is not a JSON object; or the stored definition is invalid
    INVALID_CONTEXT        `context` is not an object, or its `targetingKey` not a string
    TARGETING_KEY_MISSING  the flag buckets by targeting key (fractional) and none was given
    FLAG_NOT_FOUND         no such flag, or the flag is DISABLED (as flagd: "treated as if
                           it doesn't exist"; bulk answers leave it out)
    GENERAL                the evaluator failed (e.g. targeting chose an unknown variant)

TYPE_MISMATCH is the provider's to raise: OFREP requests carry no type, so the
provider compares the value it receives with the type it was asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode, OpenFeatureError

from agent.flags.flagset import Flag, FlagSet

# Metric label of a key that is not a flag: unknown keys must not grow the series.
UNKNOWN_FLAG = "(unknown)"
STATIC_VARIANT = "static"
# No float overflow, no NaN: one strict decoder for every request.
_STRICT_JSON = json.JSONDecoder(parse_constant=lambda name: _reject(name))


def _reject(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class RequestError(Exception):
    """A request-level OFREP error (the whole request fails, not one flag)."""

    def __init__(self, code: ErrorCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class Result:
    """One flag's answer: the OFREP document, its HTTP status, and the metric labels."""

    status: int
    document: dict[str, Any]
    flag_label: str
    variant: str
    reason: str
    error_code: str = ""


def parse_context(body: bytes) -> tuple[EvaluationContext, dict[str, Any]]:
    """The evaluation context of an OFREP request body, and the context as sent."""
    if not body.strip():
        return EvaluationContext(), {}
    try:
        document = _STRICT_JSON.decode(body.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(ErrorCode.PARSE_ERROR, "the request body is not JSON") from exc
    if not isinstance(document, dict):
        raise RequestError(ErrorCode.PARSE_ERROR, "the request body is not a JSON object")
    context = document.get("context", {})
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise RequestError(ErrorCode.INVALID_CONTEXT, "context must be a JSON object")
    attributes = dict(context)
    targeting_key = attributes.pop("targetingKey", None)
    if targeting_key is not None and not isinstance(targeting_key, str):
        raise RequestError(ErrorCode.INVALID_CONTEXT, "context.targetingKey must be a string")
    return EvaluationContext(targeting_key or None, attributes), context


def evaluate(flags: FlagSet, key: str, context: EvaluationContext) -> Result:
    """Evaluate flag `key` for `context`; never raises."""
    flag = flags.flags.get(key)
    if flag is None:
        return failure(404, key, UNKNOWN_FLAG, ErrorCode.FLAG_NOT_FOUND, f"flag {key!r} does not exist")
    if flag.disabled:
        result = failure(404, key, key, ErrorCode.FLAG_NOT_FOUND, f"flag {key!r} is disabled")
        return Result(result.status, result.document, key, "", "DISABLED", result.error_code)
    if flag.problem is not None:
        return failure(400, key, key, ErrorCode.PARSE_ERROR, f"flag {key!r} is not a valid flag "
                        f"definition: {flag.problem}")
    if flag.resolve is None:
        return _success(flag, flag.value, STATIC_VARIANT, "STATIC")
    if flag.needs_targeting_key and not context.targeting_key:
        return failure(400, key, key, ErrorCode.TARGETING_KEY_MISSING,
                        f"flag {key!r} is a percentage rollout: context.targetingKey is required")
    try:
        details = flag.resolve(key, flag.placeholder, context)
    except OpenFeatureError as exc:
        code = exc.error_code if exc.error_code in _OFREP_CODES else ErrorCode.GENERAL
        return failure(400, key, key, code, exc.error_message or str(code))
    except Exception as exc:  # noqa: BLE001 - a stranger's context must not break the API
        return failure(400, key, key, ErrorCode.GENERAL, f"flag {key!r} could not be evaluated: "
                        f"{type(exc).__name__}")
    if details.variant is None:
        # defaultVariant null and no rule matched: the code default (answered without a value).
        return _success(flag, None, "", str(details.reason))
    return _success(flag, details.value, details.variant, str(details.reason))


_OFREP_CODES = frozenset({ErrorCode.PARSE_ERROR, ErrorCode.TARGETING_KEY_MISSING,
                          ErrorCode.INVALID_CONTEXT, ErrorCode.GENERAL})


def _success(flag: Flag, value: Any, variant: str, reason: str) -> Result:
    document: dict[str, Any] = {"key": flag.key, "reason": reason, "variant": variant,
                                "metadata": flag.metadata}
    if value is not None:
        document["value"] = value
    return Result(200, document, flag.key, variant, reason)


def failure(status: int, key: str, label: str, code: ErrorCode, details: str) -> Result:
    """An OFREP error answer for flag `key`, counted under flag label `label`."""
    document = {"key": key, "errorCode": str(code), "errorDetails": details}
    return Result(status, document, label, "", "ERROR", str(code))
