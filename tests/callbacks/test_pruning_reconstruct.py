"""GradualPruning(reconstruct=True): the SparseGPT-style update of the kept weights after each mask update."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from torch import nn

from lightning_compress import GradualPruning
from lightning_compress.callbacks._pruning_reconstruct import reconstruct_weight, sweep
from lightning_compress.functional import pruning as masks
from tests.callbacks.test_pruning_criteria import Witness
from tests.helpers import TinyModule


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs as layers see them: a few directions carry most of the signal (rank 32 plus 1 % noise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g) @ torch.randn(32, d, generator=g) + 0.01 * torch.randn(n, d, generator=g)


def test_reconstruct_weight_keeps_the_mask_and_cuts_the_output_error() -> None:
    x = _correlated(512, 300, 0)  # 300 inputs: three blocks of the sweep
    w = torch.randn(20, 300, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(20, 300, generator=torch.Generator().manual_seed(2)) > 0.5
    new = reconstruct_weight(w, x.T @ x, keep)
    assert bool((new[~keep] == 0).all()) and new.dtype == torch.float32
    masked_err = (x @ (w * keep).T - x @ w.T).norm()
    new_err = (x @ new.T - x @ w.T).norm()
    assert new_err < 0.7 * masked_err, (float(new_err), float(masked_err))  # measured 0.58
    torch.testing.assert_close(reconstruct_weight(w, x.T @ x, torch.ones_like(keep)), w)  # nothing pruned: unchanged
    dead = x.clone()
    dead[:, 7] = 0  # an input channel that never carries signal: its kept weights stay, its pruned ones go
    column = reconstruct_weight(w, dead.T @ dead, keep)[:, 7]
    assert torch.equal(column, w[:, 7] * keep[:, 7])


def test_gradual_reconstruct_updates_the_kept_weights_from_the_inputs_before_the_update(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule(lr=0.0)  # the weights move only by pruning
    witness = Witness(step=3)
    pruning = GradualPruning(final_sparsity=0.5, start_step=3, end_step=3, schedule="one_shot", targets=["net.0"],
                             criterion="activation", reconstruct=True)
    make_trainer(callbacks=[witness, pruning], max_steps=5).fit(model)
    x, w = torch.cat(witness.inputs), witness.weights["net.0.weight"]  # batches 0-2, seen before the update
    keep = pruning.masks["net.0.weight"]
    expected = reconstruct_weight(w, x.T @ x, keep)
    torch.testing.assert_close(model.net[0].weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert float(keep.float().mean()) == 0.5
    assert (x @ expected.T - x @ w.T).norm() < (x @ (w * keep).T - x @ w.T).norm()
    assert not model.net[0]._forward_pre_hooks, "the input hooks were not removed after the last update"


def test_adaptive_sweep_chooses_the_entries_in_the_criterions_numbers_and_never_revives() -> None:
    x = _correlated(512, 256, 3)
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(4))
    scores = w.abs() * x.norm(dim=0)  # Wanda's ranking, per row
    keep = masks.row_mask(w, 0.5, scores=scores)
    fixed = reconstruct_weight(w, x.T @ x, keep)
    new, chosen = sweep(w, x.T @ x, keep, previous=torch.ones_like(keep), segment=128)
    assert bool((new[~chosen] == 0).all()) and not torch.equal(chosen, keep)  # it did choose other entries
    for run in (slice(0, 128), slice(128, 256)):  # as many per row and run of 128 as the criterion's mask
        assert torch.equal(chosen[:, run].sum(1), keep[:, run].sum(1))
    err = lambda v: float((x @ v.T - x @ w.T).norm())  # noqa: E731
    assert err(new) < 0.6 * err(fixed), (err(new), err(fixed))  # measured 0.42
    before = torch.rand(24, 256, generator=torch.Generator().manual_seed(5)) > 0.2  # 20 % pruned earlier
    later = masks.row_mask(w * before, 0.5, mask=before, scores=scores)
    _, again = sweep(w * before, x.T @ x, later, previous=before, segment=128)
    assert not bool((again & ~before).any())  # what was pruned stays pruned
    nm = masks.nm_mask(w, 2, 4)
    new, chosen = sweep(w, x.T @ x, nm, previous=torch.ones_like(nm), segment=4)
    assert bool((chosen.reshape(24, -1, 4).sum(-1) == 2).all()) and not torch.equal(chosen, nm)
    assert err(new) < 0.7 * err(reconstruct_weight(w, x.T @ x, nm))  # measured 0.53


def test_gradual_adaptive_reconstruct_holds_scope_and_pattern(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule(lr=0.0)
    witness = Witness(step=3)
    pruning = GradualPruning(final_sparsity=0.5, start_step=3, end_step=3, schedule="one_shot", targets=["net.0"],
                             criterion="activation", scope="row", reconstruct="adaptive")
    make_trainer(callbacks=[witness, pruning], max_steps=5).fit(model)
    x, w = torch.cat(witness.inputs), witness.weights["net.0.weight"]
    criterion = masks.row_mask(w, 0.5, scores=w.abs() * x.norm(dim=0))
    expected, chosen = sweep(w, x.T @ x, criterion, previous=torch.ones_like(criterion), segment=128)
    assert torch.equal(pruning.masks["net.0.weight"], chosen) and not torch.equal(chosen, criterion)
    torch.testing.assert_close(model.net[0].weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert bool((chosen.sum(1) == 8).all())  # scope="row": 8 of 16 in every row
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(pattern="2:4", start_step=2, end_step=8, update_every=2, criterion="activation",
                             targets=["net.0"], reconstruct="adaptive")
    make_trainer(callbacks=[pruning], max_steps=10, max_epochs=10).fit(model)
    assert pruning._last_update_step == 8
    assert bool((model.net[0].weight.detach().reshape(32, 4, 4) != 0).sum(-1).le(2).all())
    assert masks.nm_fraction(model.net[0].weight.detach(), 2, 4) == 1.0


class ConvHead(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Unflatten(1, (1, 16)), nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(56, 4))


def test_reconstruct_refuses_what_it_cannot_update(make_trainer) -> None:
    with pytest.raises(ValueError, match="`reconstruct`=True .* `mode='structured'` prunes whole output units"):
        GradualPruning(mode="structured", reconstruct=True)
    with pytest.raises(ValueError, match="`reconstruct` must be True, False or .adaptive., got .yes."):
        GradualPruning(reconstruct="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'net.1.weight' belongs to a Conv1d: leave it out with `exclude`"):
        make_trainer(callbacks=[GradualPruning(reconstruct=True)], max_steps=2).fit(ConvHead())


class SumsAt(Callback):
    """Listed after the pruning callback: the activation sums and Gram matrices it holds when ``step`` starts, and
    every training input of the first layer before it."""

    def __init__(self, pruning: GradualPruning, step: int) -> None:
        self.pruning, self.step, self.inputs = pruning, step, []
        self.norms: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step < self.step:
            self.inputs.append(batch[0].clone())
        elif trainer.global_step == self.step:
            self.norms = {k: v.clone() for k, v in self.pruning._stats.sums.items()}
            self.grams = {k: v.clone() for k, v in self.pruning._gram.sums.items()}


@pytest.mark.parametrize("statistics", ["since_update", "cumulative"])
def test_cumulative_statistics_sum_every_batch_since_the_first(statistics: str, make_trainer) -> None:
    seed_everything(0)
    model = TinyModule()
    pruning = GradualPruning(final_sparsity=0.5, start_step=1, end_step=7, update_every=3, targets=["net.0"],
                             criterion="activation", reconstruct=True, statistics=statistics)
    sums = SumsAt(pruning, step=6)  # updates at steps 1 and 4 came before
    make_trainer(callbacks=[pruning, sums], max_steps=8).fit(model)
    x = torch.cat(sums.inputs)  # batches 0-5: all the first layer saw before step 6
    every = (x.square().sum(0), x.T @ x)  # squared input norms, Gram matrix
    held = (sums.norms["net.0.weight"], sums.grams["net.0.weight"])
    for got, expected in zip(held, every, strict=True):
        if statistics == "cumulative":
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        else:  # started over at the update of step 4: fewer batches behind it
            assert float(got.diagonal().sum() if got.dim() == 2 else got.sum()) < 0.7 * float(every[0].sum())
    assert not pruning._stats.sums and not pruning._gram.sums, "sums kept after the last update"


def test_cumulative_statistics_need_something_gathered() -> None:
    with pytest.raises(ValueError, match="`statistics`='cumulative' .* with criterion='magnitude' and reconstruct=False"):
        GradualPruning(statistics="cumulative")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`statistics`"):
        GradualPruning(criterion="activation", statistics="all")  # type: ignore[arg-type]
    assert GradualPruning(criterion="activation", statistics="cumulative").statistics == "cumulative"
