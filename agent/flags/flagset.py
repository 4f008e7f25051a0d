"""The flags of one snapshot: each flag entry parsed once, ready to evaluate.

Built on the first evaluation after a snapshot changed and memoized in the
snapshot's cache. A flag whose entry did not change (same service, key, version)
is carried over from the previous flag set, so a change re-parses one flag, not all.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from openfeature.contrib.tools.flagd.core import FlagdCore
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagResolutionDetails

from agent.flags.definition import definition_problem, is_definition
from agent.model import Entry
from agent.store import Snapshot

CACHE_KEY = "ofrep.flags"
Resolver = Callable[[str, Any, EvaluationContext | None], FlagResolutionDetails[Any]]


@dataclass(frozen=True)
class Flag:
    """One flag: a STATIC value, or a flagd definition evaluated by the library."""

    key: str
    service: str
    version: int
    # STATIC flags: the entry value. Definitions: None.
    value: Any = None
    # Definitions: the evaluator and its typed resolve method (None for STATIC or invalid).
    resolve: Resolver | None = None
    placeholder: Any = None
    disabled: bool = False
    # Buckets by the targeting key (a `fractional` without its own bucketing expression).
    needs_targeting_key: bool = False
    # Why the stored definition cannot be evaluated (written past the writer's check).
    problem: str | None = None
    metadata: dict[str, bool | int | float | str] = field(default_factory=dict)

    @property
    def is_static(self) -> bool:
        """A plain value served as a STATIC flag."""
        return self.resolve is None and self.problem is None and not self.disabled


@dataclass(frozen=True)
class FlagSet:
    """Every flag of a snapshot by flag key."""

    revision: int
    flags: dict[str, Flag]
    # Some targeting reads `$flagd.timestamp`: the same revision may evaluate differently later.
    time_dependent: bool


def flag_set(snapshot: Snapshot, flag_services: Collection[str],
             previous: FlagSet | None = None) -> FlagSet:
    """The flag set of `snapshot` (memoized in its cache)."""
    cached = snapshot.cache.get(CACHE_KEY)
    if isinstance(cached, FlagSet):
        return cached
    order = {service: rank for rank, service in enumerate(flag_services)}
    chosen: dict[str, Entry] = {}
    for (service, key), entry in snapshot.entries.items():
        if service in order:
            held = chosen.get(key)
            if held is None or order[service] < order[held.service]:
                chosen[key] = entry
    reuse = previous.flags if previous is not None else {}
    flags: dict[str, Flag] = {}
    for key, entry in chosen.items():
        old = reuse.get(key)
        if old is not None and (old.service, old.version) == (entry.service, entry.version):
            flags[key] = old
        else:
            flags[key] = build_flag(entry)
    time_dependent = any(
        "$flagd.timestamp" in json.dumps(entry.value) for entry in chosen.values() if is_definition(entry.value)
    )
    result = FlagSet(revision=snapshot.revision, flags=flags, time_dependent=time_dependent)
    snapshot.cache[CACHE_KEY] = result
    return result


def build_flag(entry: Entry) -> Flag:
    """Parse one flag entry (never raises: a bad definition becomes a flag with a problem)."""
    key, value = entry.key, entry.value
    metadata: dict[str, bool | int | float | str] = {"flagSetId": entry.service, "version": str(entry.version)}
    base: dict[str, Any] = {"key": key, "service": entry.service, "version": entry.version}
    if not is_definition(value):
        return Flag(value=value, metadata=metadata, **base)
    try:
        problem = definition_problem(key, value)
    except Exception as exc:  # noqa: BLE001 - a hostile definition must not stop the others
        problem = f"cannot check the definition: {type(exc).__name__}"
    if problem is not None:
        return Flag(problem=problem, metadata=metadata, **base)
    own = value.get("metadata") or {}
    metadata.update({k: v for k, v in own.items() if isinstance(v, bool | int | float | str)})
    if value["state"] == "DISABLED":
        return Flag(disabled=True, metadata=metadata, **base)
    core = FlagdCore()
    # A deep copy: the library rewrites the definition it is given (defaultVariant →
    # default_variant), and `value` is the snapshot's own entry, served as-is elsewhere.
    core.set_flags({"flags": {key: copy.deepcopy(value)}})
    resolve, placeholder = _resolver(core, value["variants"].values())
    return Flag(resolve=resolve, placeholder=placeholder, metadata=metadata,
                needs_targeting_key=_buckets_by_targeting_key(value.get("targeting")), **base)


def _resolver(core: FlagdCore, variants: Collection[Any]) -> tuple[Resolver, Any]:
    """The library's resolve method for the type of the variants, and a default of that type.

    OFREP requests carry no type (the provider checks it); the variants tell it. The
    default is only a placeholder: a flag that defers to the code default is answered
    without a value.
    """
    values = list(variants)
    if all(isinstance(v, bool) for v in values):
        return core.resolve_boolean_value, False
    if all(isinstance(v, str) for v in values):
        return core.resolve_string_value, ""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return core.resolve_integer_value, 0
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return core.resolve_float_value, 0.0
    return core.resolve_object_value, {}


def _buckets_by_targeting_key(rule: Any) -> bool:
    """True when a `fractional` in `rule` buckets by the targeting key (no expression of its own)."""
    if isinstance(rule, dict):
        for op, args in rule.items():
            if op == "fractional" and isinstance(args, list) and args and isinstance(args[0], list):
                return True
            if _buckets_by_targeting_key(args):
                return True
    elif isinstance(rule, list):
        return any(_buckets_by_targeting_key(item) for item in rule)
    return False
