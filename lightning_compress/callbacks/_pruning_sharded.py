"""GradualPruning's masks on rank-local pieces: the same masks under FSDP2 (``DTensor``, ``Shard(0)``) as in one
process, with per-rank memory that follows the shard.

A mask is sharded like its parameter: each rank holds the keep-mask of its rows and applies it to
``_sharding.local(weight)``. What a mask update needs beyond a rank's rows is reduced, never gathered whole:

- unstructured (global or per layer): the exact select of :mod:`~lightning_compress.functional._selection`, its
  histograms and tie counts summed over the ranks, so the cut and the tie rule (earlier layer, then earlier
  position in the full tensor) are those of the unsharded run;
- structured: units are output rows, whole on one rank; their scores (one per row, a weight-count-free size) are
  gathered with ``_sharding.full`` and ranked as in one process, and each rank keeps its rows;
- N:M: groups run along a row (local); which groups are held is an exact select over the per-group costs;
- statistics: ``activation`` input norms are per input column, summed over all ranks' batches by the strategy
  (every rank has all columns); ``movement`` scores are per entry, kept as the rank's piece.

The checkpointed masks are full (gathered by every rank while a checkpoint is written), cut back to the piece
when the parameters are resolved. Plain (unsharded) tensors take the same calls: every helper is then the
identity, and the masks are those of :mod:`~lightning_compress.functional.pruning`.

Example:
    >>> w = torch.nn.Parameter(torch.tensor([[0.1, -3.0], [2.0, 0.5]]))
    >>> new = compute_masks({"w": w}, {"w": []}, ["w"], {}, {}, "magnitude", "unstructured", 1, None, {"w": 0.5}, 0.0)
    >>> new["w"].tolist(), kept_counts(new, {"w": w})
    ([[False, True], [True, False]], (2, 4))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_compress import _sharding
from lightning_compress.callbacks._pruning_stats import check_restored_masks
from lightning_compress.functional import pruning as masks
from lightning_compress.functional._selection import Scores, lowest_pruned, masked_scores

__all__: list[str] = []  # private to GradualPruning


def _unit_keep_local(keep: torch.Tensor, weight: nn.Parameter, piece: torch.Tensor) -> torch.Tensor:
    start, stop = _sharding.rows_of(weight)
    return masks._unit_mask_to_weight(keep[start:stop].to(piece.device), piece.shape)


def _full_units(weight: nn.Parameter, piece: torch.Tensor, scores: torch.Tensor | None, previous: torch.Tensor | None,
                norm: int, normalize: bool, signed: bool) -> torch.Tensor:
    """Masked scores of every output unit of the full ``weight`` (gathered from the ranks' rows: one per row)."""
    unit_mask = None if previous is None else previous.reshape(previous.shape[0], -1).bool().all(dim=1)
    units = masks.unit_scores(piece if scores is None else scores, norm, normalize, signed)
    return _sharding.full(masked_scores(units, unit_mask, signed), weight)


def compute_masks(
    weights: dict[str, nn.Parameter],
    layers: dict[str, list[nn.Module]],
    pooled: list[str],
    previous: dict[str, torch.Tensor],
    statistics: dict[str, torch.Tensor],
    criterion: str,
    mode: str,
    norm: int,
    nm: tuple[int, int] | None,
    sparsity: dict[str, float],
    fraction: float,
    per_row: bool = False,
) -> dict[str, torch.Tensor]:
    """New keep-masks (rank-local pieces): the ``pooled`` weights ranked together (at the sparsity of their first),
    the others each on its own at ``sparsity[fqn]`` (``per_row``: each output row on its own, whole on one rank),
    or every one held to N:M in a ``fraction`` of its groups.
    ``previous`` masks and ``movement`` statistics are pieces; ``activation`` statistics are per input column. A
    layer without statistics (no training batch went through it) is ranked by magnitude. Every rank must call it."""
    signed = criterion == "movement"
    pieces = {fqn: _sharding.local(w).detach() for fqn, w in weights.items()}
    scores: dict[str, torch.Tensor | None] = {}
    for fqn, piece in pieces.items():  # magnitude: None, |w| is taken chunk by chunk (no copy of the weight)
        stat = statistics.get(fqn) if criterion != "magnitude" else None
        groups = getattr(layers[fqn][0], "groups", 1) if layers.get(fqn) else 1
        scores[fqn] = None if stat is None else masks.importance(piece, criterion, stat, groups)

    def part(fqn: str) -> Scores:
        s = scores[fqn]
        return Scores(pieces[fqn] if s is None else s, previous.get(fqn), s is None, signed, weights[fqn])

    new: dict[str, torch.Tensor] = {}
    if pooled and mode == "structured":
        units = [_full_units(weights[f], pieces[f], scores[f], previous.get(f), norm, True, signed) for f in pooled]
        sizes = [math.prod(weights[f].shape[1:]) for f in pooled]
        keep = masks._global_unit_keep(units, sizes, sparsity[pooled[0]])
        new.update({f: _unit_keep_local(k, weights[f], pieces[f]) for f, k in zip(pooled, keep, strict=True)})
    elif pooled:
        parts = [part(f) for f in pooled]
        k = masks.num_to_prune(sparsity[pooled[0]], sum(p.numel() for p in parts))
        new.update(zip(pooled, lowest_pruned(parts, k), strict=True))
    for fqn, weight in weights.items():
        if fqn in new:
            continue
        piece, prev = pieces[fqn], previous.get(fqn)
        if nm is not None:
            grouped, lowest, cost = masks._nm_costs(piece, *nm, prev, scores[fqn], signed)
            total = weight.numel() // nm[1]
            held = ~lowest_pruned([Scores(cost, like=weight, total=total)], masks.num_to_prune(fraction, total))[0]
            new[fqn] = masks._nm_keep(piece, grouped, lowest, held, prev)
        elif mode == "structured":
            units = _full_units(weight, piece, scores[fqn], prev, norm, False, signed)
            keep = masks._prune_lowest(units, masks.num_to_prune(sparsity[fqn], weight.shape[0]))
            new[fqn] = _unit_keep_local(keep, weight, piece)
        elif per_row:
            new[fqn] = masks.row_mask(piece, sparsity[fqn], prev, scores[fqn], signed)
        else:
            new[fqn] = lowest_pruned([part(fqn)], masks.num_to_prune(sparsity[fqn], weight.numel()))[0]
    return new


def check_sharding(weights: dict[str, nn.Parameter], biases: dict[str, nn.Parameter],
                   layers: dict[str, list[nn.Module]], criterion: str) -> None:
    """Raise ``ValueError`` for a layout the masks cannot follow (see ``_sharding.check_supported``), or a
    grouped convolution sharded by rows under the ``activation`` criterion (its groups would split)."""
    for fqn, weight in weights.items():
        _sharding.check_supported(weight, fqn, "GradualPruning")
        if fqn in biases:
            _sharding.check_supported(biases[fqn], fqn.rsplit(".", 1)[0] + ".bias", "GradualPruning")
        groups = max((getattr(m, "groups", 1) for m in layers.get(fqn, [])), default=1)
        if criterion == "activation" and groups > 1 and _sharding.world_of(weight) > 1:
            raise ValueError(f"GradualPruning: criterion='activation' on the grouped convolution {fqn!r} "
                             f"(groups={groups}) sharded over {_sharding.world_of(weight)} processes is not supported; "
                             "exclude it or leave it unsharded")


def resolve(model: nn.Module, layers: dict[str, list[nn.Module]], weights: dict[str, Any], biases: dict[str, Any],
            criterion: str) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """The pruned weights and biases as the model holds them now, looked up by name: ``fully_shard`` in
    ``configure_model`` (after ``setup``) replaces the parameters with ``DTensor`` ones, and another callback's
    ``setup`` may have replaced the layer (QAT's wrappers); ``layers`` is updated to the layers now in place.
    Checked with :func:`check_sharding`."""
    for fqn in weights:
        owner, _, attr = fqn.rpartition(".")
        layer = model.get_submodule(owner)
        if attr == "weight" and layers[fqn][0] is not layer:
            layers[fqn][0] = layer
    weights = {fqn: layers[fqn][0].weight for fqn in weights}
    biases = {fqn: layers[fqn][0].bias for fqn in biases}
    check_sharding(weights, biases, layers, criterion)
    return weights, biases


def full_masks(pieces: dict[str, torch.Tensor], weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The full masks of every weight (a collective under sharding: every rank must call it)."""
    return {fqn: _sharding.full(mask, weights[fqn]) if fqn in weights else mask for fqn, mask in pieces.items()}


def local_masks(full: dict[str, torch.Tensor], weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """This rank's pieces of full masks (e.g. restored from a checkpoint), which must be for these weights."""
    check_restored_masks(full, weights)
    return {fqn: _sharding.local_like(m, weights[fqn]) if m.shape == weights[fqn].shape else m
            for fqn, m in full.items()}


def kept_counts(pieces: dict[str, torch.Tensor], weights: dict[str, Any]) -> tuple[int, int]:
    """``(kept, total)`` entries of the masks over all ranks (one reduction; every rank must call it)."""
    sharded, plain = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    like = None
    for fqn, mask in pieces.items():
        w = weights.get(fqn)
        piece = w is not None and _sharding.world_of(w) > 1
        like = w if piece else like
        (sharded if piece else plain).add_(torch.tensor([int(torch.count_nonzero(mask)), mask.numel()]))
    if like is not None:  # the pruned weights of one model are sharded over one mesh (fully_shard)
        _sharding.all_reduce(sharded, like)
    return int(sharded[0] + plain[0]), int(sharded[1] + plain[1])
