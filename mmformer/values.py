"""Checks of plain option values that every options dataclass shares, written once: an int that is not a bool (Python's
``True`` is an ``int``), a finite number, an options field with its help text (the CLI's flags are made from it), and
``build`` (``dataclasses.replace`` that names the valid fields when given an unknown one)."""

from __future__ import annotations

import math
from dataclasses import field, fields, replace
from typing import Any, TypeVar

T = TypeVar("T")


def is_int(value: Any) -> bool:
    """An ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float``, not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def option(default: Any, help: str) -> Any:
    """A dataclass field with its help text in the metadata (the CLI's flag help)."""
    return field(default=default, metadata={"help": help})


def build_options(cls: type[T], options: T | None, changes: dict[str, Any], what: str) -> T:
    """``options`` (default: ``cls()``) with ``changes`` applied; a wrong type or an unknown name is a TypeError
    naming ``what`` and the valid names."""
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"options: expected a {cls.__name__} or None, got {type(options).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise TypeError(f"unknown {what} option(s) {unknown}; expected some of {names}")
    return replace(options or cls(), **changes)
