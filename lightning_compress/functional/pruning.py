"""Pruning masks from weights: the math behind :class:`~lightning_compress.GradualPruning`, free of Lightning.

A mask is a ``bool`` tensor of the weight's shape, ``True`` where the weight is kept. Every function here
takes the current masks into account: an entry (or unit) that is already pruned scores lowest, so masks only
ever shrink as the sparsity rises, and exactly ``round(sparsity * n)`` entries (or units) are pruned — ties
are broken by position (a stable sort), never by a threshold that could take more.

- unstructured: entries ranked by ``|w|`` (magnitude pruning, Han et al. 2015; Zhu & Gupta 2017);
- structured: whole output units (rows of a ``Linear``, filters of a ``Conv``) ranked by their L1 or L2 norm.

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

__all__ = [
    "global_structured_masks",
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


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) of a flat float tensor, exactly.

    A sample brackets the answer between two of its quantiles; only the entries inside that band are selected
    from. If the band misses (unlucky sample), it falls back to ``kthvalue`` over everything.
    """
    n = flat.numel()
    if n <= 1 << 16:
        return torch.kthvalue(flat, k).values
    g = torch.Generator(device=flat.device).manual_seed(n)
    sample = flat[torch.randint(0, n, (1 << 14,), generator=g, device=flat.device)]
    q = k / n
    lo, hi = torch.quantile(sample, torch.tensor([max(q - 0.02, 0.0), min(q + 0.02, 1.0)], device=flat.device))
    below = int(torch.count_nonzero(flat < lo))
    band = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + band.numel():
        return torch.kthvalue(band, k - below).values
    return torch.kthvalue(flat, k).values


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over flat ``scores`` with exactly the ``k`` lowest pruned (ties: earlier position first).

    Linear time: the k-th smallest score is found by selection, not by sorting.
    """
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k >= flat.numel():
        return torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    threshold = _kth_smallest(flat, k)
    if int(torch.count_nonzero(flat <= threshold)) == k:  # no tie straddles the cut: one comparison suffices
        return flat > threshold
    prune = flat < threshold
    tied = flat == threshold
    room = k - int(torch.count_nonzero(prune))  # how many of the tied entries go, first positions first
    return ~(prune | (tied & (torch.cumsum(tied, 0) <= room)))


def _masked_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores (>= 0) where already-pruned entries rank below every live one; ``mask`` is bool or 0/1 float."""
    scores = scores.float()
    if mask is None:
        return scores
    keep = mask.to(device=scores.device, dtype=scores.dtype)
    # (keep - 1) + scores * keep: exactly the score where kept, -1 where pruned; float ops are the fastest here
    return (keep - 1.0).addcmul_(scores, keep)


def unstructured_mask(weight: torch.Tensor, sparsity: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask pruning the ``round(sparsity * numel)`` smallest-magnitude entries of ``weight``.

    Entries already ``False`` in ``mask`` are pruned first (so masks never grow back).

    Example:
        >>> unstructured_mask(torch.tensor([3.0, -1.0, 2.0, 0.5]), 0.5).tolist()
        [True, False, True, False]
    """
    scores = _masked_scores(weight.detach().abs(), mask)
    return _prune_lowest(scores, num_to_prune(sparsity, weight.numel())).view(weight.shape)


def unit_scores(weight: torch.Tensor, norm: int = 1, normalize: bool = False) -> torch.Tensor:
    """Norm of each output unit (dim 0) of ``weight``: L1 (``norm=1``) or L2 (``norm=2``).

    With ``normalize`` the norm is divided by the unit's size (L1 -> mean ``|w|``, L2 -> root mean square).

    Example:
        >>> unit_scores(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), norm=2).tolist()
        [5.0, 1.0]
    """
    if norm not in (1, 2):
        raise ValueError(f"`norm` must be 1 or 2, got {norm!r}")
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scores = torch.linalg.vector_norm(flat, ord=norm, dim=1)
    if normalize:
        scores = scores / (flat.shape[1] ** (1.0 / norm))
    return scores


def _unit_mask_to_weight(unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return unit_keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def structured_mask(
    weight: torch.Tensor, sparsity: float, norm: int = 1, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask pruning the ``round(sparsity * units)`` output units (dim 0) of ``weight`` with the lowest norm.

    Units with any entry already ``False`` in ``mask`` count as pruned and go first.

    Example:
        >>> structured_mask(torch.tensor([[1.0], [3.0], [2.0], [0.0]]), 0.5).view(-1).tolist()
        [False, True, True, False]
    """
    unit_mask = None if mask is None else mask.reshape(mask.shape[0], -1).bool().all(dim=1)
    scores = _masked_scores(unit_scores(weight, norm), unit_mask)
    keep = _prune_lowest(scores, num_to_prune(sparsity, weight.shape[0]))
    return _unit_mask_to_weight(keep, weight.shape)


def global_unstructured_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Keep-masks for several tensors with one magnitude ranking across all of them.

    Exactly ``round(sparsity * total)`` entries are pruned in all; layers end with different sparsities.

    Example:
        >>> ws = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.1, 0.2, 3.0, 4.0])}
        >>> {k: m.tolist() for k, m in global_unstructured_masks(ws, 0.5).items()}
        {'a': [False, True], 'b': [False, False, True, True]}
    """
    masks = masks or {}
    names = list(weights)
    if not names:
        return {}
    scores = torch.cat([_masked_scores(weights[n].detach().abs(), masks.get(n)).reshape(-1).cpu() for n in names])
    keep = _prune_lowest(scores, num_to_prune(sparsity, scores.numel()))
    out, offset = {}, 0
    for n in names:
        w = weights[n]
        out[n] = keep[offset : offset + w.numel()].view(w.shape).to(w.device)
        offset += w.numel()
    return out


def global_structured_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    norm: int = 1,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning whole output units across several layers, ranked by size-normalized norm.

    Units are taken lowest score first until at least ``round(sparsity * total weights)`` weights are pruned, but
    never the last unit of a layer (a layer with no output would cut the network).

    Example:
        >>> ws = {"a": torch.tensor([[1.0, 1.0], [0.1, 0.1]]), "b": torch.tensor([[0.2], [2.0]])}
        >>> {k: m.view(-1).tolist() for k, m in global_structured_masks(ws, 0.5).items()}
        {'a': [True, True, False, False], 'b': [False, True]}
    """
    masks = masks or {}
    names = list(weights)
    if not names:
        return {}
    scores, sizes, owner, index = [], [], [], []
    for i, n in enumerate(names):
        w = weights[n]
        m = masks.get(n)
        unit_mask = None if m is None else m.reshape(m.shape[0], -1).bool().all(dim=1)
        scores.append(_masked_scores(unit_scores(w, norm, normalize=True), unit_mask).cpu())
        unit_size = math.prod(w.shape[1:])
        sizes.append(torch.full((w.shape[0],), unit_size, dtype=torch.long))
        owner.append(torch.full((w.shape[0],), i, dtype=torch.long))
        index.append(torch.arange(w.shape[0]))
    all_scores, all_sizes = torch.cat(scores), torch.cat(sizes)
    all_owner, all_index = torch.cat(owner), torch.cat(index)
    target = num_to_prune(sparsity, int(all_sizes.sum()))
    order = torch.argsort(all_scores, stable=True)
    keep = [torch.ones(weights[n].shape[0], dtype=torch.bool) for n in names]
    alive = [weights[n].shape[0] for n in names]
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
    return {n: _unit_mask_to_weight(keep[i], weights[n].shape).to(weights[n].device) for i, n in enumerate(names)}
