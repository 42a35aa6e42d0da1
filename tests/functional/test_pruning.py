"""Mask math against torch.nn.utils.prune, exact counts, ties, and masks that never grow back."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lightning_compress.functional import pruning as masks


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_unstructured_matches_torch_prune(sparsity: float) -> None:
    lin = nn.Linear(40, 30)
    k = masks.num_to_prune(sparsity, lin.weight.numel())
    ours = masks.unstructured_mask(lin.weight, sparsity)
    prune.l1_unstructured(lin, "weight", amount=k)
    assert torch.equal(ours, lin.weight_mask.bool())
    assert int((~ours).sum()) == k


@pytest.mark.parametrize("norm", [1, 2])
def test_structured_matches_torch_ln_structured(norm: int) -> None:
    conv = nn.Conv2d(3, 16, 3)
    ours = masks.structured_mask(conv.weight, 0.25, norm=norm)
    prune.ln_structured(conv, "weight", amount=4, n=norm, dim=0)
    assert torch.equal(ours, conv.weight_mask.bool())
    per_filter = ours.reshape(16, -1)
    assert bool((per_filter.all(1) | (~per_filter).all(1)).all()), "a filter is partly pruned"
    assert int((~per_filter.all(1)).sum()) == 4


def test_global_unstructured_matches_torch_global_prune() -> None:
    a, b = nn.Linear(20, 10), nn.Linear(10, 5)
    ours = masks.global_unstructured_masks({"a": a.weight, "b": b.weight}, 0.7)
    k = masks.num_to_prune(0.7, a.weight.numel() + b.weight.numel())
    prune.global_unstructured([(a, "weight"), (b, "weight")], pruning_method=prune.L1Unstructured, amount=k)
    assert torch.equal(ours["a"], a.weight_mask.bool()) and torch.equal(ours["b"], b.weight_mask.bool())


def test_ties_prune_exactly_k_first_positions_first() -> None:
    w = torch.zeros(10)
    keep = masks.unstructured_mask(w, 0.3)
    assert keep.tolist() == [False] * 3 + [True] * 7


def test_masks_never_grow_back() -> None:
    w = _weight(50, 20)
    m1 = masks.unstructured_mask(w, 0.5)
    w2 = w.clone()
    w2[~m1] = 100.0  # even if pruned entries became the largest, they stay pruned
    m2 = masks.unstructured_mask(w2, 0.7, mask=m1)
    assert not bool((m2 & ~m1).any())
    assert int((~m2).sum()) == masks.num_to_prune(0.7, w.numel())
    s1 = masks.structured_mask(w, 0.5)
    s2 = masks.structured_mask(w2 + 100 * (~s1), 0.6, mask=s1)
    assert not bool((s2 & ~s1).any())


def test_global_structured_prunes_fraction_of_weights_keeps_a_unit() -> None:
    ws = {"a": _weight(30, 8, seed=1), "b": _weight(20, 30, seed=2), "c": 1e-6 * _weight(4, 5, seed=3)}
    out = masks.global_structured_masks(ws, 0.5, norm=2)
    total = sum(w.numel() for w in ws.values())
    pruned = sum(int((~m).sum()) for m in out.values())
    assert pruned >= masks.num_to_prune(0.5, total)
    assert pruned - masks.num_to_prune(0.5, total) < 30  # overshoot below one unit
    assert int(out["c"].reshape(4, -1).all(1).sum()) == 1, "a layer must keep at least one unit"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\], got 1.5"):
        masks.unstructured_mask(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="`norm` must be 1 or 2, got 3"):
        masks.unit_scores(torch.ones(3, 3), norm=3)
