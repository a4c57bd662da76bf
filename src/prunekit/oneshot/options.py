"""Checks shared by the methods' options classes: each names the option and the fix.

An options class is a dataclass whose ``__post_init__`` calls these; a bad value raises a
``ValueError`` such as ``max_cg must be an integer >= 1, got 0``.
"""
from __future__ import annotations

from typing import Any, Sequence


def check_int(value: Any, name: str, minimum: int, *, optional: bool = False) -> None:
    """``value`` is an int ``>= minimum`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fix = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {fix}" + (" or None" if optional else "") + f", got {value!r}")


def check_number(value: Any, name: str, low: float, high: float = float("inf"), *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a real number in the interval (``low_open``/``high_open`` exclude the ends)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in {left}{low:g}, {high:g}{right}, got {value!r}")


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
