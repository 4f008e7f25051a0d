"""Which entries are flags, and the writer's check of flag definitions (flagd's schema).

The schema check runs the vendored flagd schema with jsonschema; the library writer
is exercised against the real PostgreSQL (the CLI's one-line exit 2 is in
tests/test_flags_sdk.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.db.writer import ConfigWriter
from agent.errors import UsageError
from agent.flags.definition import check_flag_value, definition_problem, is_definition

VALID: list[dict[str, Any]] = [
    {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off"},
    {"state": "DISABLED", "variants": {"a": "x"}, "defaultVariant": "a", "metadata": {"owner": "team-a"}},
    {"state": "ENABLED", "variants": {"s": 1, "m": 2.5}, "defaultVariant": None},
    {"state": "ENABLED", "variants": {"a": {"k": [1]}, "b": {}}, "defaultVariant": "a",
     "targeting": {"fractional": [{"var": "email"}, ["a", 10], ["b", 90]]}},
    {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off",
     "targeting": {"if": [{"and": [{"sem_ver": [{"var": "version"}, "^", "2.0.0"]},
                                   {"starts_with": [{"var": "region"}, "eu-"]},
                                   {"ends_with": [{"var": "email"}, "@acme.com"]},
                                   {"in": [{"var": "plan"}, ["pro", "team"]]}]}, "on", "off"]}},
]

INVALID: list[tuple[dict[str, Any], str]] = [
    ({"state": "ON", "variants": {"a": True}, "defaultVariant": "a"}, "state: 'ON' is not one of"),
    ({"variants": {"a": True}, "defaultVariant": "a"}, "'state' is a required property"),
    ({"state": "ENABLED", "variants": {"a": True, "b": "x"}, "defaultVariant": "a"}, "variants must be all"),
    ({"state": "ENABLED", "variants": {"a": True}, "defaultVariant": 1}, "defaultVariant: 1 is not of type"),
    ({"state": "ENABLED", "variants": {"a": True}, "defaultVariant": "b"}, "defaultVariant 'b' is not one of"),
    ({"state": "ENABLED", "variants": {}, "defaultVariant": None}, "at least one variant"),
    ({"state": "ENABLED", "variants": {"a": True}, "defaultVariant": "a", "targeting": {"nope": [1]}},
     "targeting: Additional properties are not allowed ('nope' was unexpected)"),
    ({"state": "ENABLED", "variants": {"a": True}, "defaultVariant": "a",
      "targeting": {"if": [{"starts_with": [{"var": "email"}, 3]}, "a", None]}},
     "targeting/if/0/starts_with/1: 3 is not of type 'string'"),
    ({"state": "ENABLED", "variants": {"a": True}, "defaultVariant": "a", "targeting": {"$ref": "shared"}},
     "$ref"),
    ({"state": "ENABLED", "variants": {"a": True}, "defaultVariant": "a", "metadata": {"x": [1]}},
     "metadata/x"),
]


@pytest.mark.parametrize("value", VALID)
def test_valid_definitions_pass(value: dict[str, Any]) -> None:
    assert definition_problem("f", value) is None


@pytest.mark.parametrize(("value", "message"), INVALID)
def test_invalid_definitions_name_the_problem_in_one_line(value: dict[str, Any], message: str) -> None:
    problem = definition_problem("f", value)
    assert problem is not None and message in problem, problem
    assert "\n" not in problem and len(problem) <= 240


def test_which_values_are_definitions_and_where_they_are_checked() -> None:
    assert is_definition({"state": "CA"}) and is_definition({"variants": {}}) and is_definition({"targeting": 1})
    assert not is_definition({"on": True}) and not is_definition([{"state": 1}]) and not is_definition("state")
    bad = {"state": "ON"}
    check_flag_value("ai", "rules", bad, ("features",))  # not a flag service: any object goes
    check_flag_value("features", "plain", {"color": "red"}, ("features",))  # a STATIC object flag
    with pytest.raises(UsageError, match="^invalid flag definition flags/x: "):
        check_flag_value("flags", "x", bad, ("features", "flags"))


@pytest.mark.anyio
async def test_the_library_writer_refuses_before_writing(db_url: str, org: str) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        with pytest.raises(UsageError, match="invalid flag definition features/beta: state"):
            await writer.set(org, "features", "beta", {"state": "ON", "variants": {"a": True}}, actor="t")
        with pytest.raises(UsageError, match="invalid flag definition toggles/beta"):
            await writer.set(org, "toggles", "beta", {"variants": {"a": 1}}, actor="t",
                             flag_services=("toggles",))
        ok = await writer.set(org, "features", "beta", VALID[0], actor="t")
        assert ok.version == 1
        assert [row["key"] for row in await writer.list(org)] == ["beta"]
