"""Which callback acts on which parameter, so that two callbacks never fight over one silently.

Each compression callback claims the parameters it acts on in ``setup`` (with the kind of thing it does
to them) and releases them in ``teardown``. A claim that does not go with one already held on the same
parameter raises a ``ValueError`` naming both callbacks, before the first training step.

Kinds and how they combine on one parameter:

- ``prune``: entries are masked to exact zeros;
- ``quantize``: the forward sees fake-quantized values (zeros stay zero: symmetric or zero-point-exact grids);
- ``share``: values are tied to a k-means codebook (zeros stay zero);
- ``factorize``: the module is replaced by low-rank factors;
- ``slim``: the module runs at several widths.

``prune`` goes with ``quantize`` and with ``share``; every other pair on the same parameter, and any kind
twice (two pruning callbacks on one weight), is refused.

Example:
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> claim(net, ["weight"], "prune", "GradualPruning")
    >>> claim(net, ["weight"], "quantize", "QuantizationAwareTraining")
    >>> claim(net, ["weight"], "prune", "GradualPruning#2")
    Traceback (most recent call last):
    ...
    ValueError: GradualPruning#2 wants to prune 'weight', which GradualPruning already prunes: give the callbacks disjoint `targets`/`exclude`
    >>> release(net, "GradualPruning"); release(net, "QuantizationAwareTraining")
    >>> claims(net)
    {}
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Literal

from torch import nn

__all__ = ["COMPATIBLE", "ClaimKind", "claim", "claims", "release"]

ClaimKind = Literal["prune", "quantize", "share", "factorize", "slim"]
COMPATIBLE: frozenset[frozenset[str]] = frozenset(
    {frozenset({"prune", "quantize"}), frozenset({"prune", "share"})}
)

_VERB = {"prune": "prunes", "quantize": "quantizes", "share": "shares", "factorize": "factorizes", "slim": "slims"}
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, dict[str, dict[str, str]]] = weakref.WeakKeyDictionary()


def claim(model: nn.Module, names: Iterable[str], kind: str, owner: str) -> None:
    """Record that ``owner`` does ``kind`` to each parameter in ``names`` of ``model``; raise on a conflict.

    All names are checked before any is recorded, so a refused claim leaves nothing behind.
    """
    if kind not in _VERB:
        raise ValueError(f"`kind` must be one of {sorted(_VERB)}, got {kind!r}")
    table = _REGISTRY.setdefault(model, {})
    names = list(names)
    for name in names:
        for other, other_kind in table.get(name, {}).items():
            if other == owner:
                continue
            if other_kind == kind or frozenset({kind, other_kind}) not in COMPATIBLE:
                raise ValueError(
                    f"{owner} wants to {kind} {name!r}, which {other} already {_VERB[other_kind]}: "
                    "give the callbacks disjoint `targets`/`exclude`"
                )
    for name in names:
        table.setdefault(name, {})[owner] = kind


def release(model: nn.Module, owner: str) -> None:
    """Drop every claim of ``owner`` on ``model`` (call it from ``teardown``)."""
    table = _REGISTRY.get(model)
    if not table:
        return
    for name in list(table):
        table[name].pop(owner, None)
        if not table[name]:
            del table[name]


def claims(model: nn.Module) -> dict[str, dict[str, str]]:
    """Current claims on ``model``: parameter name -> {owner: kind}."""
    return {k: dict(v) for k, v in _REGISTRY.get(model, {}).items()}
