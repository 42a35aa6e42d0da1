"""Argument checks shared by the callbacks and functions: one wording for every "`arg` must be ..., got ..." error.

Example:
    >>> check_number(1.5, "alpha", low=0, high=1, noun="")
    Traceback (most recent call last):
    ...
    ValueError: `alpha` must be in [0, 1], got 1.5
    >>> check_number(0, "update_every", low=1, integer=True)
    Traceback (most recent call last):
    ...
    ValueError: `update_every` must be an integer >= 1, got 0
    >>> check_state_version({"version": 2}, known=1, owner="GradualPruning")
    Traceback (most recent call last):
    ...
    ValueError: GradualPruning: the checkpoint's state has version 2, newer than this code knows (1); upgrade lightning-compress to resume it
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_bool", "check_choice", "check_number", "check_state_version"]


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
    noun: str | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``error`` unless ``value`` is a number (an ``int`` with ``integer``; never a bool) within the bounds.

    Args:
        value: the argument's value.
        name: the argument's name, as the message shows it.
        low: lower bound (``None``: none); excluded with ``low_open``.
        high: upper bound (``None``: none); excluded with ``high_open``.
        low_open: ``low`` itself is not allowed.
        high_open: ``high`` itself is not allowed.
        integer: only ``int`` values.
        optional: ``None`` is allowed.
        noun: what the message calls the value (default ``"an integer"`` / ``"a number"``; ``""``: nothing).
        error: the exception type raised.
    """
    if optional and value is None:
        return
    kinds = (int,) if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bounds = f"{'<' if high_open else '<='} {high:g}"
    else:
        bounds = ""
    noun = ("an integer" if integer else "a number") if noun is None else noun
    raise error(f"`{name}` must be {' '.join(p for p in (noun, bounds) if p)}, got {value!r}")


def check_bool(value: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}")


def check_choice(value: Any, name: str, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed`` (a bool never is, even where ``1`` is)."""
    if value not in allowed or isinstance(value, bool):
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")


def check_state_version(state_dict: Mapping[str, Any], known: int, owner: str) -> int:
    """The ``version`` of a callback state (``0`` when missing: written before versions were saved).

    Raises:
        ValueError: the state is newer than ``known``, the version this code writes and reads.
    """
    version = state_dict.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{owner}: the checkpoint's state has an invalid version {version!r}")
    if version > known:
        raise ValueError(
            f"{owner}: the checkpoint's state has version {version}, newer than this code knows ({known}); "
            "upgrade lightning-compress to resume it"
        )
    return version
