"""How a setting's raw value becomes its value, by its type: pydantic's lax rules.

Settings (settings.py) was a pydantic-settings model; pydantic cost every pod about
10 MiB of RSS and 100 ms of start (issue #21). This parser covers the types Settings
uses and keeps pydantic's rules and wording, which the docs quote (`invalid setting
CONFIG_AGENT_HTTP_PORT: Input should be less than or equal to 65535`):

    str, int, float, bool, Path, Literal[...], tuple[str, ...], each optionally `| None`
    Annotated[..., Before(parse)]   runs first, on the raw value (an environment string)
    Annotated[..., Range(ge, le)]   bounds of a number
    Annotated[..., After(check)]    runs last, on the typed value (None included)

Strings are parsed as pydantic does in lax mode: " 12 ", "+5", "1_000" and "1.0" are
the int 12, 5, 1000 and 1; "1e3" is a float but not an int; booleans are 1/0, true/false,
yes/no, on/off, t/f, y/n in any case. Every failure is a ValueError with the message.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

Parser = Callable[[Any], Any]

# Marks on a setting's type, e.g. Annotated[int, Range(ge=0)]. Plain classes: every
# dataclass costs ~0.7 ms of start-up to build, and these need none of it.


class Range:
    """Bounds of a number setting."""

    def __init__(self, *, ge: float | None = None, le: float | None = None) -> None:
        self.ge, self.le = ge, le


class Before:
    """Turns the raw value (a string from the environment or a flag) into the setting's type."""

    def __init__(self, parse: Parser) -> None:
        self.parse = parse


class After:
    """Checks (and may normalize) the typed value; raises ValueError with the message."""

    def __init__(self, check: Parser) -> None:
        self.check = check


def field_parsers(cls: type) -> tuple[tuple[str, Parser], ...]:
    """(name, parse) of every field of dataclass `cls`, in declaration order."""
    hints = get_type_hints(cls, include_extras=True)
    return tuple((f.name, _parser(hints[f.name])) for f in dataclasses.fields(cls))


def _parser(hint: Any) -> Parser:
    """One function that turns a raw value into a checked value of type `hint` (or raises ValueError)."""
    marks: tuple[Any, ...] = ()
    if get_origin(hint) is Annotated:
        hint, *extra = get_args(hint)
        marks = tuple(extra)
    optional = False
    if get_origin(hint) is types.UnionType:
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        optional, hint = True, members[0]
    convert = _converter(hint)
    befores = [m.parse for m in marks if isinstance(m, Before)]
    afters = [m.check for m in marks if isinstance(m, After)]
    ranges = [m for m in marks if isinstance(m, Range)]

    def parse(value: Any) -> Any:
        for step in befores:
            value = step(value)
        if not (optional and value is None):
            value = convert(value)
            for bounds in ranges:
                _check_range(value, bounds)
        for step in afters:
            value = step(value)
        return value

    return parse


def _converter(hint: Any) -> Parser:
    if get_origin(hint) is Literal:
        return _literal(get_args(hint))
    if get_origin(hint) is tuple:
        return _string_tuple
    converters: dict[Any, Parser] = {
        str: _string, int: _integer, float: _number, bool: _boolean, Path: _path,
    }
    return converters[hint]


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")
    return value


# Compiled by `re` on first use (most processes parse no number from a string).
_INTEGER = r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0*)?"
_NUMBER = r"(?i)[+-]?(?:inf|infinity|nan|(?:[0-9]+(?:_[0-9]+)*)?\.?[0-9]*(?:_[0-9]+)*(?:e[+-]?[0-9]+)?)"


def _integer(value: Any) -> int:
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("Input should be a valid integer, got a number with a fractional part")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(_INTEGER, text):
            return int(text.split(".")[0])
        raise ValueError("Input should be a valid integer, unable to parse string as an integer")
    raise ValueError("Input should be a valid integer")


def _number(value: Any) -> float:
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text and any(c.isdigit() or c in "nN" for c in text) and re.fullmatch(_NUMBER, text):
            try:
                return float(text)
            except ValueError:
                pass
        raise ValueError("Input should be a valid number, unable to parse string as a number")
    raise ValueError("Input should be a valid number")


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
    raise ValueError("Input should be a valid boolean, unable to interpret input")


def _path(value: Any) -> Path:
    if isinstance(value, str | os.PathLike):
        return Path(value)
    raise ValueError("Input is not a valid path for <class 'pathlib.Path'>")


def _string_tuple(value: Any) -> tuple[str, ...]:
    if not isinstance(value, tuple | list):
        raise ValueError("Input should be a valid tuple")
    return tuple(_string(item) for item in value)


def _literal(choices: tuple[str, ...]) -> Callable[[Any], str]:
    quoted = [repr(choice) for choice in choices]
    message = "Input should be " + (", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0])

    def choose(value: Any) -> str:
        if value not in choices:
            raise ValueError(message)
        return str(value)

    return choose


def _check_range(value: float, bounds: Range) -> None:
    # Upper bound first, as pydantic: NaN fails "less than or equal" where both apply.
    if bounds.le is not None and not value <= bounds.le:
        raise ValueError(f"Input should be less than or equal to {bounds.le}")
    if bounds.ge is not None and not value >= bounds.ge:
        raise ValueError(f"Input should be greater than or equal to {bounds.ge}")
