"""One config value from YAML or the command line: converted to its field's type and checked
against the field's allowed values or range (`pipeline.config.schema`'s fields carry both in their
metadata), each failure a ConfigError of one line that names the key."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from pipeline.errors import ConfigError

_BOOLS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _parse_cli_scalar(text: str) -> Any:
    """A command-line value as bool, int or float where it reads as one (1e-3 included)."""
    if text.lower() in _BOOLS and not text.isdigit():
        return _BOOLS[text.lower()]
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def convert(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert one raw value to the field's type, or raise ConfigError naming the key."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    bad = ConfigError(f"config key {key}: {value!r} is not a valid {kind}")
    if kind == "str":
        if value is None or isinstance(value, (dict, list)):
            raise bad
        if "true" in (f.metadata["choices"] or ()):  # a switch with a third setting (auto)
            on = value if isinstance(value, bool) else _BOOLS.get(str(value).lower())
            if on is not None:
                return "true" if on else "false"  # also YAML's `key: off`, and `key=no`
        return str(value)
    if isinstance(value, str):
        # Command-line values arrive as text, and YAML reads 1e-3 (no dot) as text too.
        value = _parse_cli_scalar(value.strip())
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: {value!r} is not a valid bool; use true or false")
    if isinstance(value, bool):
        raise bad
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if kind == "float":
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise bad
    raise AssertionError(f"unhandled config type {kind}")


def check(key: str, f: dataclasses.Field, value: Any) -> None:
    choices, rule = f.metadata["choices"], f.metadata["rule"]
    if choices and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"config key {key}: {value!r} is not allowed; choose one of: {allowed}")
    if rule and not rule.check(value):
        raise ConfigError(f"config key {key}: {value!r} is out of range; it must be {rule.text}")


def unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(
        f"unknown config key {key}; {hint}known keys in this place: {', '.join(known)} (see --help)"
    )
