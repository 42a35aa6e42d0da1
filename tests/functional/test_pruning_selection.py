"""The exact chunked selection behind the pruning masks: the same cut as ``torch.kthvalue`` and the same masks as a
stable sort over all scores concatenated, across tensors, chunk boundaries, ties, previous masks and signs."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.functional import _selection as sel
from lightning_compress.functional import pruning as masks


def _reference(parts: list[sel.Scores], k: int) -> list[torch.Tensor]:
    """Concatenate every masked score, prune the first ``k`` of a stable ascending sort."""
    flat = torch.cat([
        sel.masked_scores(p.values.abs() if p.magnitude else p.values, p.mask, p.signed).reshape(-1) for p in parts
    ])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    out, offset = [], 0
    for p in parts:
        out.append(keep[offset : offset + p.values.numel()].view(p.values.shape))
        offset += p.values.numel()
    return out


def test_ordered_keys_sort_like_the_floats() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(5000, generator=g) * 10 ** torch.randint(-30, 30, (5000,), generator=g).float(),
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, -1e30, -1.0])])
    keys = sel.ordered_keys(x)
    assert keys.dtype == torch.int32
    assert torch.equal(x[torch.argsort(keys, stable=True)], torch.sort(x, stable=True).values)
    assert int(keys[-8 + 0]) == int(keys[-8 + 1]), "-0.0 and +0.0 rank as equal, as torch.kthvalue has them"


@pytest.mark.parametrize("chunk", [7, 64, sel.CHUNK])
@pytest.mark.parametrize("signed", [False, True])
def test_masks_equal_the_stable_sort_of_everything(chunk: int, signed: bool) -> None:
    g = torch.Generator().manual_seed(1 + chunk + signed)
    for _ in range(6):
        shapes = [(int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g)))
                  for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
        # rounded values: heavy ties, some straddling the cut
        values = [(torch.randn(s, generator=g) * 3).round() / 3 for s in shapes]
        prev = [torch.rand(s, generator=g) > 0.3 if i % 2 else None for i, s in enumerate(shapes)]
        parts = [sel.Scores(v, m if m is None or i % 4 != 1 else m.float(), magnitude=not signed, signed=signed)
                 for i, (v, m) in enumerate(zip(values, prev, strict=True))]
        total = sum(v.numel() for v in values)
        for k in {0, 1, total // 3, total // 2, total - 1, total}:
            ours = sel.lowest_pruned(parts, k, chunk=chunk)
            for a, b in zip(ours, _reference(parts, k), strict=True):
                assert torch.equal(a, b), (shapes, k)
            assert sum(int((~m).sum()) for m in ours) == k


def test_the_cut_is_torch_kthvalue_over_all_tensors() -> None:
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(300, 70, generator=g), torch.randn(5, 1000, generator=g), torch.randn(1, generator=g)]
    flat = torch.cat([w.abs().reshape(-1) for w in ws])
    for k in (1, 17, flat.numel() // 2, flat.numel() - 1):
        keep = sel.lowest_pruned([sel.Scores(w, magnitude=True) for w in ws], k, chunk=1000)
        pruned = torch.cat([w.abs()[~m] for w, m in zip(ws, keep, strict=True)])
        kept = torch.cat([w.abs()[m] for w, m in zip(ws, keep, strict=True)])
        kth = torch.kthvalue(flat, k).values
        assert pruned.numel() == k and float(pruned.max()) == float(kth)
        assert kept.numel() == 0 or float(kept.min()) >= float(kth)


def test_fast_fp32_keys_equal_the_general_ones() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 50, generator=g)
    w[0, :5] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5])
    mask = torch.rand(50, 50, generator=g) > 0.5
    fast = sel.Scores(w, mask, magnitude=True).keys(0, w.numel())
    general = sel.ordered_keys(sel.masked_scores(w.abs(), mask)).reshape(-1)
    assert torch.equal(fast, general)
    wide = sel.Scores(w.double(), mask, magnitude=True).keys(0, w.numel())  # no fast path: a float64 weight
    assert torch.equal(wide, general)


def test_global_masks_of_a_large_weight_follow_kthvalue_and_never_grow() -> None:
    # one 4M-entry weight: several chunks of the default size
    w = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(4))
    prev = masks.global_unstructured_masks({"w": w}, 0.5)
    new = masks.global_unstructured_masks({"w": w}, 0.7, prev)
    assert new["w"].dtype == torch.bool and not bool((new["w"] & ~prev["w"]).any())
    assert int((~new["w"]).sum()) == masks.num_to_prune(0.7, w.numel())
    threshold = torch.kthvalue(w.abs().reshape(-1), masks.num_to_prune(0.7, w.numel())).values
    assert torch.equal(new["w"], w.abs() > threshold)  # continuous values: no tie at the cut


@pytest.mark.parametrize("crowded", [False, True])
def test_a_crowded_or_sparse_cut_bin_gives_the_sorted_masks(crowded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # a sparse bin at the cut is collected in the pass that writes the masks; a crowded one (the previously
    # pruned entries, or half of `a` equal)
    # takes the histogram of the low digit and a comparison pass: both equal the stable sort, ties straddling
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(12_001, generator=g), torch.randn(40, 200, generator=g)
    if crowded:
        a[::2] = 0.75
    mask = torch.rand(a.shape, generator=g) > 0.2
    parts = [sel.Scores(a, mask, magnitude=True), sel.Scores(b, magnitude=True)]
    calls = []
    collect = sel._cut_in_bin
    monkeypatch.setattr(sel, "_cut_in_bin", lambda *args: calls.append(1) or collect(*args))
    for k in (1_000, 11_000, 13_000) if crowded else (2_500, 5_003, 9_000):  # crowded: the pruned, or the 0.75s
        ours = sel.lowest_pruned(parts, k, chunk=1000)
        for x, y in zip(ours, _reference(parts, k), strict=True):
            assert torch.equal(x, y), k
    assert len(calls) == (0 if crowded else 3)


def test_sparse_positions_equal_nonzero() -> None:
    g = torch.Generator().manual_seed(6)
    for n in (0, 5, 8, 1003, 4096):
        for density in (0.0, 0.002, 0.3, 1.0):
            flags = torch.rand(n + 3, generator=g) < density
            for f in (flags, flags[3:], flags[:n]):  # offsets 0 and 3 (not 8-byte aligned), lengths not of 8
                assert torch.equal(sel._positions(f), torch.nonzero(f).view(-1))
