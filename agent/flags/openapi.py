"""The OFREP routes in the local API's OpenAPI document (agent/sinks/openapi.py).

Shapes follow the OFREP OpenAPI spec (github.com/open-feature/protocol,
service/openapi.yaml): evaluationSuccess, evaluationFailure / flagNotFound,
bulkEvaluationSuccess / bulkEvaluationFailure, configurationResponse. The API's
own errors outside OFREP's (405, 408, 413, 503) keep the API's `{"error": …}` shape.
"""

from __future__ import annotations

from typing import Any

from agent.flags.ofrep import MAX_BODY_BYTES

_ERROR = {"$ref": "#/components/schemas/Error"}
_FAILURE = {"$ref": "#/components/schemas/OfrepEvaluationFailure"}
_SUCCESS = {"$ref": "#/components/schemas/OfrepEvaluationSuccess"}
_REQUEST = {
    "required": False,
    "description": f"OFREP evaluation request (at most {MAX_BODY_BYTES // 1024} KiB); an empty body is no context.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OfrepEvaluationRequest"}}},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_COMMON = {
    "408": _json(_ERROR, "The request body did not arrive within 10 s."),
    "413": _json(_ERROR, f"The request body is over {MAX_BODY_BYTES // 1024} KiB."),
    "503": _json(_ERROR, "The agent has not loaded its configuration yet (Retry-After: 1)."),
}
_IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "ETag of the answer the client holds; a match answers 304.",
    "schema": {"type": "string"},
}
_ETAG = {"ETag": {"description": "Changes with every write (and, for bulk, with the context).",
                  "schema": {"type": "string"}}}


def ofrep_paths() -> dict[str, Any]:
    """The three OFREP paths."""
    return {
        "/ofrep/v1/evaluate/flags/{key}": {
            "post": {
                "summary": "OFREP: evaluate one flag for a context (flags: the entries of CONFIG_AGENT_FLAG_SERVICES).",
                "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}],
                "requestBody": _REQUEST,
                "responses": {
                    "200": _json(_SUCCESS, "The evaluation (no `value`: use the code default)."),
                    "400": _json(_FAILURE, "PARSE_ERROR, INVALID_CONTEXT, TARGETING_KEY_MISSING or GENERAL."),
                    "404": _json(_FAILURE, "FLAG_NOT_FOUND: no such flag, or the flag is disabled."),
                    **_COMMON,
                },
            }
        },
        "/ofrep/v1/evaluate/flags": {
            "post": {
                "summary": "OFREP: evaluate every flag for a context (disabled flags left out).",
                "parameters": [_IF_NONE_MATCH],
                "requestBody": _REQUEST,
                "responses": {
                    "200": {**_json({"$ref": "#/components/schemas/OfrepBulkSuccess"}, "Every flag's evaluation."),
                            "headers": _ETAG},
                    "304": {"description": "The client holds this answer (If-None-Match)."},
                    "400": _json({"$ref": "#/components/schemas/OfrepBulkFailure"},
                                 "PARSE_ERROR or INVALID_CONTEXT: the request as a whole."),
                    **_COMMON,
                },
            }
        },
        "/ofrep/v1/configuration": {
            "get": {
                "summary": "OFREP: what this flag service supports (polling with ETag, every type).",
                # If-None-Match works here too; it is not listed because a header that takes any
                # string cannot be made invalid, and the fuzz tests want something to break.
                "description": "Answers with an ETag; `If-None-Match` with it answers 304.",
                "responses": {
                    "200": {**_json({"$ref": "#/components/schemas/OfrepConfiguration"}, "Capabilities."),
                            "headers": _ETAG},
                    "304": {"description": "Unchanged (If-None-Match)."},
                },
            }
        },
    }


_METADATA = {"type": "object", "additionalProperties": {"type": ["boolean", "string", "number"]}}

OFREP_SCHEMAS: dict[str, Any] = {
    "OfrepEvaluationRequest": {
        "type": "object",
        "properties": {
            "context": {
                "type": ["object", "null"],
                "description": "Evaluation context: `targetingKey` and any attributes the targeting reads "
                               "(null: no context).",
                "properties": {"targetingKey": {"type": ["string", "null"]}},
            }
        },
    },
    "OfrepEvaluationSuccess": {
        "type": "object",
        "required": ["key", "reason", "variant"],
        "properties": {
            "key": {"type": "string"},
            "value": {"description": "boolean, string, number or object (any JSON for a STATIC flag)"},
            "reason": {"type": "string", "enum": ["STATIC", "TARGETING_MATCH", "DEFAULT", "SPLIT", "UNKNOWN"]},
            "variant": {"type": "string", "description": "`static` for a plain value"},
            "metadata": _METADATA,
        },
    },
    "OfrepEvaluationFailure": {
        "type": "object",
        "required": ["key", "errorCode", "errorDetails"],
        "properties": {
            "key": {"type": "string"},
            "errorCode": {"type": "string", "enum": ["PARSE_ERROR", "TARGETING_KEY_MISSING", "INVALID_CONTEXT",
                                                    "GENERAL", "FLAG_NOT_FOUND"]},
            "errorDetails": {"type": "string"},
        },
    },
    "OfrepBulkSuccess": {
        "type": "object",
        "required": ["flags"],
        "properties": {"flags": {"type": "array", "items": {"anyOf": [_SUCCESS, _FAILURE]}}},
    },
    "OfrepBulkFailure": {
        "type": "object",
        "required": ["errorCode", "errorDetails"],
        "properties": {"errorCode": {"type": "string", "enum": ["PARSE_ERROR", "INVALID_CONTEXT"]},
                       "errorDetails": {"type": "string"}},
    },
    "OfrepConfiguration": {
        "type": "object",
        "required": ["name", "capabilities"],
        "properties": {"name": {"type": "string"}, "capabilities": {"type": "object"}},
    },
}
