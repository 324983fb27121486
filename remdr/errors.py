"""Typed errors that reach users as one line: what went wrong, why, and how to fix it.

CLIs catch `RemdrError` and print `str(err)`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class RemdrError(Exception):
    """Base of every error a user can cause and fix."""

    def __init__(self, what: str, why: str = "", fix: str = "") -> None:
        self.what, self.why, self.fix = what, why, fix
        self.items = [(what, why, fix)]  # `Problems` puts every problem here
        parts = [what]
        if why:
            parts.append(why)
        msg = ": ".join(parts)
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class ConfigError(RemdrError):
    """A configuration value or combination is invalid."""


class DataError(RemdrError):
    """A dataset cannot be used (missing, wrong format, mostly bad records)."""


class PrivacyError(RemdrError):
    """A privacy setting is unsafe or a privacy budget would be exceeded."""


class TrainingError(RemdrError):
    """Training or evaluation failed part-way (e.g. a site's round); the cause in one line."""


@dataclass
class Problems:
    """Collects every problem found by a validator so the user sees them all at once."""

    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, what: str, why: str, fix: str = "") -> None:
        self.items.append((what, why, fix))

    def __bool__(self) -> bool:
        return bool(self.items)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`fn(...)`, or None with the problems of its ConfigError added here: checks that
        raise on their own still join one message."""
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            self.items.extend(err.items)
            return None

    def raise_if_any(self, kind: type[RemdrError] = ConfigError) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            err = kind(*self.items[0])
        else:
            what = f"{len(self.items)} problems"
            why = "; ".join(f"{w}: {y}" + (f" (fix: {f})" if f else "") for w, y, f in self.items)
            err = kind(what, why)
        err.items = list(self.items)
        raise err
