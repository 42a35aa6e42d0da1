"""Pruning masks from weights: the math behind :class:`~lightning_compress.GradualPruning`, free of Lightning.

A mask is a ``bool`` tensor of the weight's shape, ``True`` where the weight is kept. Every function here
takes the current masks into account: an entry (or unit) that is already pruned scores lowest, so masks only
ever shrink as the sparsity rises, and exactly ``round(sparsity * n)`` entries (or units) are pruned — ties
are broken by position (a stable sort), never by a threshold that could take more.

- unstructured: entries ranked by ``|w|`` (magnitude pruning, Han et al. 2015; Zhu & Gupta 2017);
- per row: every output unit's entries ranked among themselves (:func:`row_mask`; Wanda's comparison group);
- structured: whole output units (rows of a ``Linear``, filters of a ``Conv``) ranked by their L1 or L2 norm;
- N:M (semi-structured): in every group of ``M`` consecutive weights along the input dimension (a ``Linear``'s
  columns, a ``Conv``'s input channels) at most ``N`` stay (:func:`nm_mask`; 2:4 is what sparse tensor cores run).

Entries are ranked by a score (:func:`importance`), ``|w|`` unless given: ``activation`` scores
``|w| * ||x_j||_2``, the weight times the L2 norm of its input channel over the data seen (Wanda: Sun, Liu, Bair &
Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models"); ``movement`` scores are
``-sum_t w * dL/dw`` accumulated over training steps (Sanh, Wolf & Rush 2020, "Movement Pruning").

Globally (one ranking across several layers) unstructured magnitudes compare directly; for structured units the
norm is divided by the unit's size (L1: mean ``|w|``, L2: root mean square) so that units of layers with different
fan-in compare fairly, and units are pruned until the requested fraction of *weights* is gone.

Masks passed in (the current ones) may be ``bool`` or 0/1 floats; masks returned are ``bool``.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.1, -3.0], [2.0, 0.5]])
    >>> unstructured_mask(w, 0.5)
    tensor([[False,  True],
            [ True, False]])
    >>> structured_mask(torch.tensor([[1.0, 1.0], [0.1, 0.2], [5.0, 0.0]]), 1 / 3, norm=1)
    tensor([[ True,  True],
            [False, False],
            [ True,  True]])
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lightning_compress.functional._selection import CHUNK, Scores, lowest_pruned
from lightning_compress.functional._selection import masked_scores as _masked_scores

__all__ = [
    "global_structured_masks",
    "importance",
    "nm_fraction",
    "nm_mask",
    "parse_pattern",
    "row_mask",
    "global_unstructured_masks",
    "num_to_prune",
    "structured_mask",
    "unit_scores",
    "unstructured_mask",
]


def num_to_prune(sparsity: float, n: int) -> int:
    """How many of ``n`` items a ``sparsity`` prunes: ``round(sparsity * n)``, kept within [0, n].

    Example:
        >>> num_to_prune(0.95, 300), num_to_prune(0.0, 7), num_to_prune(0.999, 10)
        (285, 0, 10)
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1], got {sparsity}")
    return min(n, max(0, int(round(sparsity * n))))


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over flat ``scores`` with exactly the ``k`` lowest pruned (ties: earlier position first), by
    selection (:mod:`~lightning_compress.functional._selection`), not by sorting."""
    return lowest_pruned([Scores(scores.reshape(-1))], k)[0]


def importance(
    weight: torch.Tensor,
    criterion: str = "magnitude",
    statistic: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Per-entry pruning scores of ``weight`` (lowest pruned first) for a ``criterion``.

    - ``magnitude``: ``|w|``;
    - ``activation`` (Wanda): ``|w| * statistic[j]``, ``statistic`` the L2 norm of each input channel ``j`` (a
      ``Linear``'s ``in_features``, a ``Conv``'s input channels; ``groups`` of a grouped conv);
    - ``movement``: ``statistic`` itself, the accumulated ``-w * dL/dw`` (signed).

    Example:
        >>> importance(torch.tensor([[1.0, -2.0]]), "activation", torch.tensor([3.0, 0.5]))
        tensor([[3., 1.]])
    """
    if criterion == "magnitude":
        return weight.detach().abs()
    if statistic is None:
        raise ValueError(f"criterion {criterion!r} needs its statistic (input norms or movement scores)")
    if criterion == "movement":
        return statistic.float()
    if criterion != "activation":
        raise ValueError(f"`criterion` must be one of ['magnitude', 'activation', 'movement'], got {criterion!r}")
    out, per_group = weight.shape[0], weight.shape[1]
    norms = statistic.float().view(groups, 1, per_group).expand(groups, out // groups, per_group).reshape(out, per_group)
    return weight.detach().abs().float() * norms.view(out, per_group, *([1] * (weight.dim() - 2)))


def unstructured_mask(
    weight: torch.Tensor,
    sparsity: float,
    mask: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """Keep-mask pruning the ``round(sparsity * numel)`` entries of ``weight`` with the lowest score.

    ``scores`` (see :func:`importance`; ``signed`` when they can be negative) default to ``|w|``. Entries already
    ``False`` in ``mask`` are pruned first (so masks never grow back).

    Example:
        >>> unstructured_mask(torch.tensor([3.0, -1.0, 2.0, 0.5]), 0.5).tolist()
        [True, False, True, False]
    """
    part = Scores(weight if scores is None else scores, mask, magnitude=scores is None, signed=signed)
    return lowest_pruned([part], num_to_prune(sparsity, weight.numel()))[0].view(weight.shape)


def row_mask(
    weight: torch.Tensor,
    sparsity: float,
    mask: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """Keep-mask pruning, in every output unit (dim 0) of ``weight``, its ``round(sparsity * fan_in)`` entries with
    the lowest score, fan-in being the entries of one unit (a ``Linear`` row, a ``Conv`` filter).

    Wanda (Sun et al. 2023) compares ``|w| * ||x_j||`` within each output row rather than across the layer: every
    output keeps the same number of inputs, so no unit loses most of its weights (their section 3, "comparison
    group": per output better than per layer on the language models they prune). Entries already ``False`` in ``mask``
    go first; ties by position. Rows are sorted in blocks of about :data:`~._selection.CHUNK` entries (extra memory:
    8 bytes per entry of a block).

    Example:
        >>> row_mask(torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.1, 0.2, 0.3, 0.4]]), 0.5).int().tolist()
        [[1, 0, 1, 0], [0, 0, 1, 1]]
    """
    rows = weight.shape[0]
    fan_in = weight.numel() // rows if rows else 0
    k = num_to_prune(sparsity, fan_in)
    keep = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if k == 0 or fan_in == 0:
        return keep if mask is None else keep & mask.to(device=keep.device, dtype=torch.bool)
    part = Scores(weight if scores is None else scores, mask, magnitude=scores is None, signed=signed)
    flat, block = keep.view(rows, fan_in), max(1, CHUNK // fan_in)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        keys = part.keys(start * fan_in, stop * fan_in).view(stop - start, fan_in)
        lowest = torch.sort(keys, dim=1, stable=True).indices[:, :k]
        flat[start:stop].scatter_(1, lowest.to(keep.device), False)
    return keep


def unit_scores(weight: torch.Tensor, norm: int = 1, normalize: bool = False, signed: bool = False) -> torch.Tensor:
    """Norm of each output unit (dim 0) of ``weight``: L1 (``norm=1``) or L2 (``norm=2``).

    With ``normalize`` the norm is divided by the unit's size (L1 -> mean ``|w|``, L2 -> root mean square).
    ``weight`` may be per-entry scores (:func:`importance`); ``signed`` scores (movement) are summed instead.

    Example:
        >>> unit_scores(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), norm=2).tolist()
        [5.0, 1.0]
    """
    if norm not in (1, 2):
        raise ValueError(f"`norm` must be 1 or 2, got {norm!r}")
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    if signed:
        return flat.sum(1) / flat.shape[1] if normalize else flat.sum(1)
    scores = torch.linalg.vector_norm(flat, ord=norm, dim=1)
    if normalize:
        scores = scores / (flat.shape[1] ** (1.0 / norm))
    return scores


def _unit_mask_to_weight(unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return unit_keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def structured_mask(
    weight: torch.Tensor,
    sparsity: float,
    norm: int = 1,
    mask: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """Keep-mask pruning the ``round(sparsity * units)`` output units (dim 0) of ``weight`` with the lowest norm.

    Units with any entry already ``False`` in ``mask`` count as pruned and go first. With per-entry ``scores``
    units rank by the norm of their scores (by their sum when ``signed``).

    Example:
        >>> structured_mask(torch.tensor([[1.0], [3.0], [2.0], [0.0]]), 0.5).view(-1).tolist()
        [False, True, True, False]
    """
    unit_mask = None if mask is None else mask.reshape(mask.shape[0], -1).bool().all(dim=1)
    units = unit_scores(weight if scores is None else scores, norm, signed=signed)
    keep = _prune_lowest(_masked_scores(units, unit_mask, signed), num_to_prune(sparsity, weight.shape[0]))
    return _unit_mask_to_weight(keep, weight.shape)


def global_unstructured_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    masks: Mapping[str, torch.Tensor] | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    signed: bool = False,
) -> dict[str, torch.Tensor]:
    """Keep-masks for several tensors with one ranking (by ``|w|``, or by ``scores``) across all of them.

    Exactly ``round(sparsity * total)`` entries are pruned in all; layers end with different sparsities. The
    result is that of one ranking over all entries concatenated (ties: earlier tensor and position first), but
    nothing is concatenated, sorted or copied whole: the cut is an exact radix select over the scores' bit
    patterns, computed chunk by chunk (:mod:`~lightning_compress.functional._selection`; extra memory: the masks).

    Example:
        >>> ws = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.1, 0.2, 3.0, 4.0])}
        >>> {k: m.tolist() for k, m in global_unstructured_masks(ws, 0.5).items()}
        {'a': [False, True], 'b': [False, False, True, True]}
    """
    masks, scores = masks or {}, scores or {}
    parts = [Scores(scores[n] if n in scores else w, masks.get(n), magnitude=n not in scores, signed=signed)
             for n, w in weights.items()]
    k = num_to_prune(sparsity, sum(p.numel() for p in parts))
    return {n: keep.to(w.device) for (n, w), keep in zip(weights.items(), lowest_pruned(parts, k), strict=True)}


def global_structured_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    norm: int = 1,
    masks: Mapping[str, torch.Tensor] | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    signed: bool = False,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning whole output units across several layers, ranked by size-normalized norm.

    With per-entry ``scores`` (:func:`importance`) units rank by the normalized norm of their scores (their mean
    when ``signed``).

    Units are taken lowest score first until at least ``round(sparsity * total weights)`` weights are pruned, but
    never the last unit of a layer (a layer with no output would cut the network).

    Example:
        >>> ws = {"a": torch.tensor([[1.0, 1.0], [0.1, 0.1]]), "b": torch.tensor([[0.2], [2.0]])}
        >>> {k: m.view(-1).tolist() for k, m in global_structured_masks(ws, 0.5).items()}
        {'a': [True, True, False, False], 'b': [False, True]}
    """
    masks, entry_scores = masks or {}, scores or {}
    units = []
    for n, w in weights.items():
        m = masks.get(n)
        unit_mask = None if m is None else m.reshape(m.shape[0], -1).bool().all(dim=1)
        units.append(_masked_scores(unit_scores(entry_scores.get(n, w), norm, True, signed), unit_mask, signed))
    keep = _global_unit_keep(units, [math.prod(w.shape[1:]) for w in weights.values()], sparsity)
    return {n: _unit_mask_to_weight(k.to(w.device), w.shape) for k, (n, w) in zip(keep, weights.items(), strict=True)}


def _global_unit_keep(units: list[torch.Tensor], sizes: list[int], sparsity: float) -> list[torch.Tensor]:
    """Per-layer unit keep-vectors: units (masked, normalized scores of each layer's full set of units, of
    ``sizes`` weights each) taken lowest first until ``round(sparsity * weights)`` are pruned, one kept per
    layer. A loop over units (rows), not over weights."""
    if not units:
        return []
    all_scores = torch.cat([u.cpu() for u in units])
    all_sizes = torch.cat([torch.full((len(u),), s, dtype=torch.long) for u, s in zip(units, sizes, strict=True)])
    all_owner = torch.cat([torch.full((len(u),), i, dtype=torch.long) for i, u in enumerate(units)])
    all_index = torch.cat([torch.arange(len(u)) for u in units])
    target = num_to_prune(sparsity, int(all_sizes.sum()))
    order = torch.argsort(all_scores, stable=True)
    keep = [torch.ones(len(u), dtype=torch.bool) for u in units]
    alive = [len(u) for u in units]
    pruned = 0
    for j in order.tolist():
        if pruned >= target:
            break
        i = int(all_owner[j])
        if alive[i] <= 1:
            continue
        keep[i][int(all_index[j])] = False
        alive[i] -= 1
        pruned += int(all_sizes[j])
    return keep


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` -> ``(N, M)``, checking ``1 <= N < M``.

    Example:
        >>> parse_pattern("2:4")
        (2, 4)
    """
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 1 <= int(parts[0]) < int(parts[1]):
        raise ValueError(f"`pattern` must be 'N:M' with integers 1 <= N < M (e.g. '2:4'), got {pattern!r}")
    return int(parts[0]), int(parts[1])


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """View of ``t`` as rows of ``m`` consecutive entries along the input dimension (dim 1, moved last)."""
    return t.movedim(1, -1).reshape(-1, m)


def nm_mask(
    weight: torch.Tensor,
    n: int,
    m: int,
    fraction: float = 1.0,
    mask: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """Keep-mask holding ``round(fraction * groups)`` groups of ``m`` input-dimension neighbours to at most ``n``.

    Groups are ``m`` consecutive entries along dim 1 (a ``Linear``'s inputs; a ``Conv``'s input channels at one
    output channel and kernel position), which must divide by ``m``. In a held group the ``m - n`` lowest-scoring
    entries go. The groups held are those whose pruning removes the least score (the sum of their ``m - n``
    lowest scores); groups already held (by ``mask``) stay held, so masks only shrink as ``fraction`` grows.

    Example:
        >>> nm_mask(torch.tensor([[1.0, -4.0, 3.0, 0.5, 2.0, 2.5, -1.0, 0.1]]), 2, 4).int().tolist()
        [[0, 1, 1, 0, 1, 1, 0, 0]]
    """
    if weight.dim() < 2 or weight.shape[1] % m:
        raise ValueError(f"N:M sparsity needs dim 1 divisible by M={m}, got a weight of shape {tuple(weight.shape)}")
    grouped, lowest, cost = _nm_costs(weight, n, m, mask, scores, signed)
    held = ~_prune_lowest(cost, num_to_prune(fraction, cost.numel()))
    return _nm_keep(weight, grouped, lowest, held, mask)


def _nm_costs(
    weight: torch.Tensor, n: int, m: int, mask: torch.Tensor | None, scores: torch.Tensor | None, signed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores in groups of ``m``, the ``m - n`` lowest of each group, and what holding each group costs."""
    entry = _masked_scores(weight.detach().abs() if scores is None else scores, mask, signed)
    grouped = _groups(entry, m)
    lowest = torch.argsort(grouped, dim=1, stable=True)[:, : m - n]
    return grouped, lowest, grouped.gather(1, lowest).sum(1)


def _nm_keep(
    weight: torch.Tensor, grouped: torch.Tensor, lowest: torch.Tensor, held: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Keep-mask of ``weight`` with the ``lowest`` entries of the ``held`` groups pruned (and ``mask``'s)."""
    keep = torch.ones_like(grouped, dtype=torch.bool)
    keep[held] = keep[held].scatter(1, lowest[held], False)
    shape = weight.movedim(1, -1).shape
    out = keep.reshape(shape).movedim(-1, 1)
    return out if mask is None else out & mask.to(device=out.device, dtype=torch.bool)


def nm_fraction(weight: torch.Tensor, n: int, m: int) -> float:
    """Fraction of the groups of ``m`` input-dimension neighbours with at most ``n`` non-zeros.

    Example:
        >>> nm_fraction(torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]]), 2, 4)
        0.5
    """
    if weight.dim() < 2 or weight.shape[1] % m:
        return 0.0
    return float((torch.count_nonzero(_groups(weight.detach(), m), dim=1) <= n).float().mean())
