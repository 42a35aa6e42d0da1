"""Which modules a callback acts on.

Layers are chosen by their fully-qualified name (as in ``model.named_modules()``), in one of
three pattern forms, plus a list of module types:

- an exact name: ``"layers.0"``;
- a glob (has ``*``, ``?`` or ``[``): ``"encoder.*.fc"``;
- a regular expression, prefixed with ``"re:"`` and matched against the whole name: ``"re:layers\\.[0-2]"``.

Types are given by class name (``"Linear"``) or dotted path (``"torch.nn.Linear"``), so that every
argument stays writable in a YAML recipe. A pattern in ``targets`` or ``exclude`` that matches no layer
of an allowed type raises a ``ValueError`` that lists it: a typo never silently compresses nothing.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> sorted(select_modules(net, targets=None, exclude=["2"], types=["Linear"]))
    ['0']
    >>> sorted(select_modules(net, targets=["re:[02]"], types=["Linear"]))
    ['0', '2']
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["match", "resolve_types", "select_modules", "tied_elsewhere", "validate_patterns"]

_GLOB_CHARS = set("*?[")


def validate_patterns(patterns: Sequence[str] | None, argument: str) -> None:
    """Check pattern syntax without a model: strings, non-empty, ``re:`` patterns compile.

    Raises:
        TypeError: ``patterns`` is a single string or holds a non-string.
        ValueError: an empty pattern or a regular expression that does not compile.
    """
    if patterns is None:
        return
    if isinstance(patterns, str):
        raise TypeError(f"`{argument}` must be a list of patterns, got the single string {patterns!r}; use [{patterns!r}]")
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"`{argument}` must hold strings, got {p!r} ({type(p).__name__})")
        if not p or p == "re:":
            raise ValueError(f"`{argument}` holds an empty pattern")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as err:
                raise ValueError(f"`{argument}`: {p!r} is not a valid regular expression ({err})") from None


def match(pattern: str, name: str) -> bool:
    """Whether fully-qualified ``name`` matches ``pattern`` (exact, glob, or ``re:`` regex).

    Example:
        >>> match("fc*", "fc1"), match("re:fc[0-9]+", "fc12"), match("fc1", "fc12")
        (True, True, False)
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def resolve_types(types: Iterable[str | type], argument: str = "types") -> tuple[type, ...]:
    """Turn class names (``"Linear"``), dotted paths or classes into a tuple of module classes.

    A bare name is looked up in ``torch.nn``.

    Example:
        >>> resolve_types(["Linear", "torch.nn.Conv2d"])
        (<class 'torch.nn.modules.linear.Linear'>, <class 'torch.nn.modules.conv.Conv2d'>)
    """
    out: list[type] = []
    for t in types:
        if isinstance(t, type):
            cls = t
        elif isinstance(t, str) and "." in t:
            mod_name, _, cls_name = t.rpartition(".")
            try:
                cls = getattr(importlib.import_module(mod_name), cls_name)
            except (ImportError, AttributeError):
                raise ValueError(f"`{argument}`: cannot import module type {t!r}") from None
        elif isinstance(t, str) and hasattr(nn, t):
            cls = getattr(nn, t)
        else:
            raise ValueError(f"`{argument}`: unknown module type {t!r}; give a torch.nn class name or a dotted path")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"`{argument}`: {t!r} is not an nn.Module class")
        out.append(cls)
    return tuple(out)


def select_modules(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Iterable[str | type] = ("Linear", "Conv1d", "Conv2d", "Conv3d"),
    *,
    targets_argument: str = "targets",
    exclude_argument: str = "exclude",
) -> dict[str, nn.Module]:
    """Modules of ``model`` to act on, by fully-qualified name, in ``named_modules()`` order.

    Args:
        model: the model to search.
        targets: patterns of layers to include; ``None`` means every layer of an allowed type.
        exclude: patterns of layers to leave out; a pattern naming a container leaves out the layers inside it.
        types: allowed module types; a targeted layer of another type is an error.
        targets_argument: argument name used in error messages for ``targets``.
        exclude_argument: argument name used in error messages for ``exclude``.

    Raises:
        ValueError: a pattern matches no layer, a targeted layer is not of an allowed type,
            or nothing is left to act on.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(select_modules(net)), list(select_modules(net, exclude=["2"]))
        (['0', '2'], ['0'])
    """
    validate_patterns(targets, targets_argument)
    validate_patterns(exclude, exclude_argument)
    allowed = resolve_types(types)
    named = [(n, m) for n, m in model.named_modules() if n]
    candidates = {n: m for n, m in named if isinstance(m, allowed)}
    type_names = [t.__name__ for t in allowed]

    if targets is None:
        chosen = dict(candidates)
    else:
        chosen = {}
        unmatched: list[str] = []
        for p in targets:
            hits = [n for n, _ in named if match(p, n)]
            typed = [n for n in hits if n in candidates]
            if not typed:
                if hits and not p.startswith("re:") and not (_GLOB_CHARS & set(p)):
                    bad = type(dict(named)[hits[0]]).__name__
                    raise ValueError(
                        f"`{targets_argument}`: layer {hits[0]!r} is a {bad}, which this callback cannot handle "
                        f"(allowed types: {type_names})"
                    )
                unmatched.append(p)
            for n in typed:
                chosen[n] = candidates[n]
        if unmatched:
            raise ValueError(_no_match_message(targets_argument, unmatched, candidates, type_names))
        chosen = {n: chosen[n] for n in candidates if n in chosen}  # keep model order

    if exclude:
        unmatched = [p for p in exclude if not any(match(p, n) for n, _ in named)]
        if unmatched:
            raise ValueError(_no_match_message(exclude_argument, unmatched, candidates, type_names))
        # a pattern naming a container (e.g. "encoder") leaves out every layer inside it
        chosen = {n: m for n, m in chosen.items() if not any(match(p, a) for p in exclude for a in _self_and_parents(n))}

    if not chosen:
        raise ValueError(
            f"no layer left to act on: `{targets_argument}`={targets!r}, `{exclude_argument}`={exclude!r}, "
            f"allowed types {type_names}; layers of those types: {list(candidates) or 'none'}"
        )
    return chosen


def _self_and_parents(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _no_match_message(argument: str, unmatched: list[str], candidates: dict[str, nn.Module], types: list[str]) -> str:
    shown = list(candidates)[:20]
    more = f" (+{len(candidates) - 20} more)" if len(candidates) > 20 else ""
    return (
        f"`{argument}`: pattern(s) {unmatched} match no layer of type {types}; "
        f"the model's layers of those types are {shown}{more}"
    )


def tied_elsewhere(model: nn.Module, name: str, parameter: str = "weight") -> list[str]:
    """Other modules of ``model`` that hold the same ``parameter`` object as module ``name`` (tied weights).

    A method that rewrites a module (wraps, factorizes or converts it) would silently untie such a parameter.

    Example:
        >>> emb, out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> out.weight = emb.weight
        >>> tied_elsewhere(nn.ModuleDict({"emb": emb, "out": out}), "out")
        ['emb']
    """
    param = getattr(model.get_submodule(name), parameter, None)
    if not isinstance(param, nn.Parameter):
        return []
    return [
        n for n, m in model.named_modules(remove_duplicate=False)
        if n != name and any(p is param for p in m.parameters(recurse=False))
    ]
