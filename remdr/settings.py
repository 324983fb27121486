"""The rule machinery of remdr's settings: what a key means and accepts, checked in one place.

A config field is declared with `setting(default, meaning, **rule)`. The one `Rule` validates
the value, writes the `--list-keys` line and drives the property tests, so no key goes
unchecked; `coerce` turns the text of a CLI flag or TOML value into the field's type first.
Every config dataclass (`remdr.config`, the federation's `FedConfig`) is built from these.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from remdr.errors import ConfigError, Problems

LIST_KEYS_FIX = "`--list-keys` prints every key"


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _is_kind(value: Any, kind: type) -> bool:
    """Strict types: a bool is not a number (True is no batch size) and an int is a float."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float
        return False


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name too long for the file system
        return False


def _num(x: float, kind: type) -> str:
    return str(int(x)) if kind is int else f"{x:g}"


def show(value: Any) -> str:
    """A value as a user would type it: true/false, 0.002, 'text'."""
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Rule:
    """What one key means and accepts; the type is its default's (bool, int, float or str)."""

    meaning: str
    low: float | None = None  # numbers: bounds, inclusive unless *_open
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    # numbers: sentinels accepted outside the bounds, e.g. -1 for "auto" beside a range [0, 2]
    special: tuple[float, ...] = ()
    choices: tuple[Any, ...] | Callable[[], Collection[Any]] = ()  # a callable is read lazily
    pattern: str = ""  # text: a regex the whole value must match
    path: bool = False  # text: empty, or an existing file
    text: str = ""  # how the accepted values are described, when the bounds do not say it
    fix: str = ""  # the fix, when "e.g. key=<a good value>" is not one

    def options(self) -> Collection[Any]:
        return self.choices() if callable(self.choices) else self.choices

    def describe(self, kind: type) -> str:
        """The accepted values in words, e.g. 'a number in (0, 1]'."""
        if self.text:
            return self.text
        if self.special:
            sentinels = ", ".join(_num(x, kind) for x in self.special)
            return f"{sentinels}, or {dataclasses.replace(self, special=()).describe(kind)}"
        if self.choices:
            return "one of " + ", ".join(show(c) for c in self.options())
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{KIND_NAMES[kind]} in {left}{_num(lo, kind)}, {_num(hi, kind)}{right}"
        if lo is not None:
            return f"{KIND_NAMES[kind]} {'>' if self.low_open else '>='} {_num(lo, kind)}"
        if hi is not None:
            return f"{KIND_NAMES[kind]} {'<' if self.high_open else '<='} {_num(hi, kind)}"
        return "any text" if kind is str else KIND_NAMES[kind]

    def check(self, value: Any, kind: type) -> str:
        """Why `value` breaks the rule, or "" when it is fine."""
        if not _is_kind(value, kind):
            return f"expected {KIND_NAMES[kind]}"
        if kind is float and not _finite(value):
            return "must be a finite number"
        if value in self.special:
            return ""
        lo, hi = self.low, self.high
        if (lo is not None and (value < lo or (self.low_open and value == lo))) or (
            hi is not None and (value > hi or (self.high_open and value == hi))
        ):
            return f"must be {self.describe(kind)}"
        if self.choices:
            options = self.options()
            if value not in options:
                close = difflib.get_close_matches(str(value), [str(o) for o in options], n=3)
                hint = f"; did you mean {', '.join(close)}" if close else ""
                if len(options) > 20:
                    return f"not {self.describe(kind)}{hint}"
                return f"must be one of {', '.join(show(o) for o in options)}{hint}"
        if self.pattern and not re.fullmatch(self.pattern, value):
            return f"must be {self.describe(kind)}"
        if self.path and value and not _is_file(value):
            return "no such file"
        return ""


def setting(default: Any, meaning: str, **rule: Any) -> Any:
    """A config field: its default, what it means and what it accepts (see `Rule`)."""
    return field(default=default, metadata={"rule": Rule(meaning, **rule)})


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata["rule"]


# Shorthands for the common rules.
POSITIVE = {"low": 0, "low_open": True}  # > 0
NON_NEGATIVE = {"low": 0}  # >= 0
FRACTION = {"low": 0, "high": 1, "high_open": True}  # [0, 1)
PROBABILITY = {"low": 0, "high": 1, "low_open": True, "high_open": True}  # (0, 1)
SHARE = {"low": 0, "high": 1, "low_open": True}  # (0, 1]
HELD_OUT = {"low": 0, "high": 0.9, "high_open": True}  # [0, 0.9)


def kebab(name: str) -> str:
    return name.replace("_", "-")


TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def coerce(value: Any, current: Any, key: str) -> Any:
    """Convert a flat-config value (often a string from a CLI or TOML) to the type of `current`.

    Only the type is checked here (a bool is no number); ranges are the rules' (`validate`)."""

    def wrong(expected: str) -> ConfigError:
        return ConfigError(
            f"{key}={show(value)}", f"expected {expected}", f"e.g. {key}={show(current)}"
        )

    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE
        raise wrong("true or false")
    if isinstance(current, int | float) and isinstance(value, bool):
        raise wrong(KIND_NAMES[type(current)] + ", not true/false")
    if isinstance(current, int):
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)  # exact, also beyond 2**53
            except ValueError:
                pass
        try:
            as_float = float(value)  # 4.0, "4.0", "1e3"
        except (TypeError, ValueError, OverflowError):
            raise wrong("an integer") from None
        if not as_float.is_integer():  # also nan and inf
            raise wrong("an integer")
        return int(as_float)
    if isinstance(current, float):
        if isinstance(value, int | float):
            try:
                return float(value)
            except OverflowError:
                raise wrong("a finite number") from None
        try:
            return float(value)  # "nan" and "inf" convert; the rules refuse them
        except (TypeError, ValueError):
            raise wrong("a number") from None
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    raise wrong("text")


def unknown_key(raw_key: str, valid: Collection[str]) -> tuple[str, str, str]:
    """(what, why, fix) for a key that does not exist: the closest valid ones, if any."""
    close = difflib.get_close_matches(kebab(raw_key), list(valid), n=3)
    why = "did you mean " + ", ".join(close) if close else "no valid key is spelled like it"
    return f"unknown config key {raw_key!r}", why, LIST_KEYS_FIX


def check_fields(section: Any, problems: Problems, example: Any = None) -> set[str]:
    """Check every field of a config dataclass by its rule; return the keys that failed. The
    fix suggests `example`'s value (the caller's base, e.g. a command's defaults)."""
    bad = set()
    for f in fields(section):
        rule, value, key, kind = (
            rule_of(f),
            getattr(section, f.name),
            kebab(f.name),
            type(f.default),
        )
        why = rule.check(value, kind)
        if why:
            good = getattr(example, f.name, f.default)
            good = f.default if rule.check(good, kind) else good
            problems.add(f"{key}={show(value)}", why, rule.fix or f"e.g. {key}={show(good)}")
            bad.add(key)
    return bad


def describe_fields(title: str, section: Any) -> list[str]:
    """The `--list-keys` lines of one section: key, value, meaning and accepted values."""
    lines = [f"[{title}]"]
    for f in fields(section):
        rule = rule_of(f)
        value = show(getattr(section, f.name))
        lines.append(
            f"  {kebab(f.name):20s} {value:14s} {rule.meaning} ({rule.describe(type(f.default))})"
        )
    return lines
