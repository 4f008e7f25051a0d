"""Which entries are flags, and whether a flag definition is valid (flagd's JSON schema).

The rule, shared by the writer (which validates before it writes) and the agent
(which evaluates):

- every entry of a service listed in `flag_services` (CONFIG_AGENT_FLAG_SERVICES,
  default `features`) is an OpenFeature flag; its flag key is the entry key (the
  first listed service wins when two hold the same key);
- a JSON object value with any of the keys `state`, `variants`, `defaultVariant`,
  `targeting` is a flag definition in flagd's format; any other value is a STATIC
  flag whose value is the entry value.

A definition must pass flagd's schema (vendored in schema/, draft-07), parse with
the evaluator library, and name one of its variants as `defaultVariant`.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import UsageError

if TYPE_CHECKING:
    from jsonschema import Draft7Validator
    from jsonschema.exceptions import ValidationError

DEFAULT_FLAG_SERVICES = ("features",)
DEFINITION_KEYS = frozenset({"state", "variants", "defaultVariant", "targeting"})
SCHEMA_DIR = Path(__file__).parent / "schema"
# One line in the CLI: long values in schema messages are cut.
MAX_MESSAGE = 240


def is_definition(value: Any) -> bool:
    """True when `value` is (meant to be) a flagd flag definition."""
    return isinstance(value, dict) and not DEFINITION_KEYS.isdisjoint(value)


def check_flag_value(service: str, key: str, value: Any, flag_services: Collection[str]) -> None:
    """Raise UsageError (one line) when `value` is an invalid flag definition for a flag service."""
    if service in flag_services and is_definition(value):
        problem = definition_problem(key, value)
        if problem is not None:
            raise UsageError(f"invalid flag definition {service}/{key}: {problem}")


def definition_problem(key: str, value: dict[str, Any]) -> str | None:
    """Why `value` is not a valid flag definition (None when it is)."""
    # Imported here: every CLI command loads the writer, few write flags (60 ms saved).
    from openfeature.contrib.tools.flagd.core.model.flag import Flag
    from openfeature.exception import OpenFeatureError

    errors = list(_validator().iter_errors({"flags": {key: value}}))
    if errors:
        return _describe(_specific(errors[0]), prefix=("flags", key))
    try:
        flag = Flag.from_dict(key, dict(value))
    except OpenFeatureError as exc:
        return exc.error_message or "not a flag definition"
    if "$ref" in json.dumps(value.get("targeting")):
        return "targeting: shared rules ($ref to $evaluators) are not supported; write the rule inline"
    default = flag.default_variant
    if isinstance(default, str) and default not in flag.variants:
        return f"defaultVariant {default!r} is not one of the variants"
    return None


@cache
def _validator() -> Draft7Validator:
    from jsonschema import Draft7Validator
    from referencing import Registry, Resource

    schemas = [json.loads((SCHEMA_DIR / name).read_text()) for name in ("flags.json", "targeting.json")]
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )
    return Draft7Validator(schemas[0], registry=registry)


def _specific(error: ValidationError) -> ValidationError:
    """The most telling error: `oneOf` over the four flag types hides the real one inside.

    Of the branches, the one with the fewest failures is the flag type the writer meant
    (boolean variants with a bad `state` fail once as a boolean flag, twice as others).
    """
    if not error.context:
        return error
    branches: dict[Any, list[ValidationError]] = {}
    for inner in error.context:
        branches.setdefault(inner.relative_schema_path[0], []).append(inner)
    # Ties (a targeting rule matches no operator): the branch that got furthest in.
    candidates = []
    for failures in branches.values():
        deepest = max((_specific(inner) for inner in failures), key=lambda e: len(e.absolute_path))
        candidates.append((len(failures), -len(deepest.absolute_path), deepest))
    return min(candidates, key=lambda c: c[:2])[2]


def _describe(error: ValidationError, prefix: tuple[str, ...]) -> str:
    path = list(error.absolute_path)
    if tuple(path[: len(prefix)]) == prefix:
        path = path[len(prefix):]
    where = "/".join(str(part) for part in path)
    if path and path[0] == "variants" and error.validator == "type":
        message = "variants must be all booleans, all strings, all numbers or all objects"
    elif error.validator == "oneOf":  # valid as several flag types: no variant to tell by
        message = "variants must hold at least one variant"
    else:
        message = error.message
    text = f"{where}: {message}" if where else message
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"
