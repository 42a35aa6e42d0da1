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


def _concatenated_reference(weights: dict, sparsity: float, prev: dict, scores: dict, signed: bool) -> dict:
    """The ranking as it was computed before: every score concatenated, one selection over all of them."""
    flat = torch.cat([masks._masked_scores(scores.get(n, w.abs()), prev.get(n), signed).reshape(-1)
                      for n, w in weights.items()])
    keep = masks._prune_lowest(flat, masks.num_to_prune(sparsity, flat.numel()))
    out, offset = {}, 0
    for n, w in weights.items():
        out[n] = keep[offset : offset + w.numel()].view(w.shape)
        offset += w.numel()
    return out


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_global_ranking_without_concatenation_equals_the_concatenated_one(sparsity: float, signed: bool) -> None:
    # large enough for the sampled band (> 65,536 entries), with heavy ties (rounded values) and previous masks
    ws = {"a": (_weight(300, 200, seed=1) * 4).round() / 4, "b": (_weight(100, 300, seed=2) * 4).round() / 4,
          "c": torch.zeros(10, 10)}
    prev = {"a": _weight(300, 200, seed=3) > -1.0, "b": _weight(100, 300, seed=4) > -1.5}
    scores = {n: -w if signed else w.abs() for n, w in ws.items()}
    ours = masks.global_unstructured_masks(ws, sparsity, prev, scores, signed)
    reference = _concatenated_reference(ws, sparsity, prev, scores, signed)
    for n in ws:
        assert torch.equal(ours[n], reference[n]), n
    assert sum(int((~m).sum()) for m in ours.values()) == masks.num_to_prune(sparsity, 90100)


def test_activation_importance_is_weight_times_input_channel_norm() -> None:
    w = _weight(6, 4)
    norms = torch.tensor([1.0, 0.0, 2.0, 10.0])
    assert torch.equal(masks.importance(w, "activation", norms), w.abs() * norms)
    conv = nn.Conv2d(4, 6, 3, groups=2)  # each output channel sees 2 of the 4 input channels
    scores = masks.importance(conv.weight, "activation", norms, groups=2)
    assert torch.equal(scores[:3], conv.weight[:3].detach().abs() * norms[:2].view(1, 2, 1, 1))
    assert torch.equal(scores[3:], conv.weight[3:].detach().abs() * norms[2:].view(1, 2, 1, 1))
    # a channel that is always zero makes its weights the first to go, whatever their magnitude
    keep = masks.unstructured_mask(w, 0.25, scores=masks.importance(w, "activation", norms))
    assert not bool(keep[:, 1].any()) and int((~keep).sum()) == 6


def test_movement_scores_are_signed_and_masks_never_grow_back() -> None:
    movement = torch.tensor([[-5.0, 2.0, -0.5, 1.0]])
    keep = masks.unstructured_mask(torch.ones(1, 4), 0.5, scores=movement, signed=True)
    assert keep.tolist() == [[False, True, False, True]]
    later = masks.unstructured_mask(torch.ones(1, 4), 0.75, keep, scores=torch.tensor([[9.0, 3.0, 9.0, -1.0]]),
                                    signed=True)
    assert later.tolist() == [[False, True, False, False]]
    units = masks.structured_mask(torch.ones(3, 2), 1 / 3, scores=torch.tensor([[1.0, 1.0], [-3.0, 4.0], [0.0, 0.5]]),
                                  signed=True)
    assert units[:, 0].tolist() == [True, True, False]  # unit sums 2, 1, 0.5


@pytest.mark.parametrize("shape", [(6, 10), (4, 3, 3, 3)])
@pytest.mark.parametrize("signed", [False, True])
def test_row_mask_prunes_each_output_unit_on_its_own(shape: tuple[int, ...], signed: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weight(*shape)
    scores = _weight(*shape, seed=1) if signed else None
    previous = masks.unstructured_mask(w, 0.3)  # pruned entries go first and stay pruned
    expected = torch.stack([masks.unstructured_mask(w[i], 0.6, previous[i], None if scores is None else scores[i],
                                                    signed) for i in range(shape[0])])
    monkeypatch.setattr(masks, "CHUNK", 2 * w[0].numel())  # rows sorted two at a time, in blocks
    keep = masks.row_mask(w, 0.6, previous, scores, signed)
    assert torch.equal(keep, expected)
    fan_in = w[0].numel()
    assert (~keep).reshape(shape[0], -1).sum(1).tolist() == [masks.num_to_prune(0.6, fan_in)] * shape[0]
    assert not bool((keep & ~previous).any())
    assert not torch.equal(keep, masks.unstructured_mask(w, 0.6, previous, scores, signed))  # not the layer's ranking


def test_row_mask_at_zero_sparsity_keeps_the_previous_mask() -> None:
    previous = torch.tensor([[True, False], [True, True]])
    assert torch.equal(masks.row_mask(_weight(2, 2), 0.0, previous), previous)
    assert bool(masks.row_mask(_weight(2, 2), 0.0).all())


@pytest.mark.parametrize("shape", [(8, 16), (4, 8, 3, 3)])
def test_nm_mask_keeps_n_of_every_m_along_the_input_dimension(shape: tuple[int, ...]) -> None:
    w = _weight(*shape)
    keep = masks.nm_mask(w, 2, 4)
    groups = keep.movedim(1, -1).reshape(-1, 4)
    assert bool((groups.sum(1) == 2).all())
    kept_min = torch.where(keep, w.abs(), float("inf")).movedim(1, -1).reshape(-1, 4).min(1).values
    pruned_max = torch.where(keep, -1.0, w.abs()).movedim(1, -1).reshape(-1, 4).max(1).values
    assert bool((pruned_max <= kept_min).all()), "a group lost a larger weight than one it kept"
    assert masks.nm_fraction(w * keep, 2, 4) == 1.0 and masks.nm_fraction(w, 2, 4) == 0.0


def test_nm_mask_gradual_holds_a_growing_fraction_of_groups() -> None:
    w = _weight(16, 32)
    previous = None
    for fraction in (0.25, 0.5, 1.0):
        keep = masks.nm_mask(w, 1, 4, fraction, previous)
        per_group = keep.reshape(-1, 4).sum(1)
        assert int((per_group == 1).sum()) == round(fraction * 128) and int((per_group == 4).sum()) == 128 - round(fraction * 128)
        if previous is not None:
            assert not bool((keep & ~previous).any())
        previous = keep
    # the first groups held are those whose pruned entries matter least
    first = masks.nm_mask(w, 1, 4, 0.25).reshape(-1, 4).sum(1) == 1
    cost = w.abs().reshape(-1, 4).sort(1).values[:, :3].sum(1)
    assert cost[first].max() <= cost[~first].min()


def test_nm_bad_arguments() -> None:
    for bad in ("4:2", "2:2", "0:4", "2-4", "a:b", 24):
        with pytest.raises(ValueError, match="`pattern` must be 'N:M' with integers 1 <= N < M"):
            masks.parse_pattern(bad)
    with pytest.raises(ValueError, match="divisible by M=4"):
        masks.nm_mask(torch.ones(3, 6), 2, 4)
