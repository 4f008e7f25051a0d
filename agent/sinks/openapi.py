"""The OpenAPI 3.1 description of the local API, served at `/openapi.json`.

Hand-written (there is no framework to derive it from) and checked against the
running server by tests/test_openapi_fuzz.py. Kept in Python rather than a JSON
file so it ships inside the package without package-data entries.
"""

from __future__ import annotations

from typing import Any

import agent
from agent.flags.openapi import OFREP_SCHEMAS, ofrep_paths
from agent.model import NAME_RE

MAX_WAIT_SECONDS = 300

_NAME = {"type": "string", "pattern": NAME_RE.pattern}
_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERROR, description)


_NOT_MODIFIED = {"description": "The client already holds this revision (If-None-Match)."}
_NOT_LOADED = _error("The agent has not loaded its configuration yet (Retry-After: 1).")
_ETAG = {
    "ETag": {"description": 'The snapshot revision, e.g. "1042".', "schema": {"type": "string"}}
}
_IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": 'ETag of the copy the client holds, e.g. "1042"; a match answers 304.',
    "schema": {"type": "string"},
}


def openapi_document() -> dict[str, Any]:
    """The document (a fresh dict each call; the app serializes it once)."""
    entry = {"$ref": "#/components/schemas/Entry"}
    service = {"type": "object", "additionalProperties": entry}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "config-agent local API",
            "version": agent.__version__,
            "description": "Runtime settings of one org, served from the agent's memory. Any "
                           "path may also answer, as JSON errors: 400 (malformed request), 408 (no "
                           "complete request head in time), 431 (request head over 64 KiB) and "
                           "503 (too many connections).",
        },
        "paths": {
            "/v1/configs": {
                "get": {
                    "summary": "Every entry of the org; long-poll with after and wait.",
                    "parameters": [
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "description": "Answer once the revision exceeds this (long-poll).",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                        },
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "Seconds to wait with `after` (default 30); then 304.",
                            "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
                        },
                        _IF_NONE_MATCH,
                    ],
                    "responses": {
                        "200": {
                            **_json({"$ref": "#/components/schemas/Document"}, "The document."),
                            "headers": _ETAG,
                        },
                        "304": _NOT_MODIFIED,
                        "400": _error("A query parameter is invalid."),
                        "503": _error("Not loaded yet, shutting down, or (with `after`) too many "
                                      "long-polls and watches open (Retry-After: 1)."),
                    },
                }
            },
            "/v1/configs/{service}": {
                "get": {
                    "summary": "The entries of one service.",
                    "parameters": [
                        {"name": "service", "in": "path", "required": True, "schema": _NAME},
                        _IF_NONE_MATCH,
                    ],
                    "responses": {
                        "200": {**_json(service, "Entries by key."), "headers": _ETAG},
                        "304": _NOT_MODIFIED,
                        "404": _error("No such service."),
                        "503": _NOT_LOADED,
                    },
                }
            },
            "/v1/configs/{service}/{key}": {
                "get": {
                    "summary": "One entry; format=raw gives the bare value as text.",
                    "parameters": [
                        {"name": "service", "in": "path", "required": True, "schema": _NAME},
                        {"name": "key", "in": "path", "required": True, "schema": _NAME},
                        {
                            "name": "format",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["json", "raw"]},
                        },
                        _IF_NONE_MATCH,
                    ],
                    "responses": {
                        "200": {
                            "description": "The entry (json) or its bare value (raw): "
                            "strings as-is, other values as JSON text.",
                            "headers": _ETAG,
                            "content": {
                                "application/json": {"schema": entry},
                                "text/plain": {"schema": {"type": "string"}},
                            },
                        },
                        "304": _NOT_MODIFIED,
                        "400": _error("format is neither json nor raw."),
                        "404": _error("No such entry."),
                        "503": _NOT_LOADED,
                    },
                }
            },
            "/v1/watch": {
                "get": {
                    "summary": "Server-Sent Events: snapshot, then one change event per change.",
                    "parameters": [
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "required": False,
                            "description": "Resume after this revision.",
                            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "An endless event stream.",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "400": _error("Last-Event-ID is not a revision."),
                        "503": _error("Shutting down, or too many long-polls and watches open "
                                      "(Retry-After: 1)."),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process is alive.",
                    "responses": {"200": _json({"$ref": "#/components/schemas/Probe"}, "Alive.")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "The first full load is applied and written out.",
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Probe"}, "Ready."),
                        "503": _json({"$ref": "#/components/schemas/Probe"}, "Not ready."),
                    },
                }
            },
            "/v1/status": {
                "get": {
                    "summary": "Sync state (no values).",
                    "responses": {"200": _json({"$ref": "#/components/schemas/Status"}, "State.")},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document.")},
                }
            },
            **ofrep_paths(),
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Probe": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string"}},
                },
                "Entry": {
                    "type": "object",
                    "required": ["value", "version", "updated_at"],
                    "properties": {
                        "value": {},
                        "version": {"type": "integer", "minimum": 1},
                        "updated_at": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
                "Document": {
                    "type": "object",
                    "required": ["org_id", "revision", "stale", "configs"],
                    "properties": {
                        "org_id": _NAME,
                        "revision": {"type": "integer", "minimum": 0},
                        "stale": {"type": "boolean"},
                        "configs": {"type": "object", "additionalProperties": service},
                    },
                },
                **OFREP_SCHEMAS,
                "Status": {
                    "type": "object",
                    "required": ["org_id", "ready", "revision", "stale"],
                    "properties": {
                        "org_id": _NAME,
                        "ready": {"type": "boolean"},
                        "revision": {"type": "integer"},
                        "stale": {"type": "boolean"},
                        "entries": {"type": "integer"},
                        "redis_connected": {"type": "boolean"},
                        "db_connected": {"type": "boolean"},
                    },
                },
            }
        },
    }
