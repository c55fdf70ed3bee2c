"""Argument checks shared by every phase: one clear error that names the value and the fix.

    check_int("n_layer", 0, minimum=1)     ValueError: n_layer must be a positive integer, got 0
    check_number("lr", float("inf"), above=0)
                                            ValueError: lr must be a finite number > 0, got inf

`bool` is refused where an int or a number is expected (True is an int in Python, and `n_layer=True`
is always a mistake); NaN and infinities are refused everywhere (a NaN learning rate or an infinite
weight decay trains silently into NaN weights).
"""

from __future__ import annotations

import math
import numbers


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` must be an int (not a bool) in [minimum, maximum]; returns it."""
    if maximum is None and minimum in (0, 1):
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
    else:
        kind = "an integer" + _describe(low=minimum, high=maximum)
    wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
    if wrong_type or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """`value` must be a finite real number (not a bool) with low <= value <= high, above < value < below."""
    bounds = _describe(low, high, above, below)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    if not ok:
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return float(value)


def _describe(low=None, high=None, above=None, below=None) -> str:
    parts = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else ""]
    parts += [f"<= {high}" if high is not None else "", f"< {below}" if below is not None else ""]
    parts = [p for p in parts if p]
    return (" " + " and ".join(parts)) if parts else ""
