"""``token_mask``: GradualPruning's input statistics and LowRankFactorization's whitening count real tokens only."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, seed_everything
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_compress import GradualPruning, LowRankFactorization
from lightning_compress.callbacks._pruning_reconstruct import reconstruct_weight
from lightning_compress.functional import pruning as masks
from lightning_compress.functional.low_rank import truncated_svd, whitening


class _Tokens(Dataset):
    """Sequences of 6 tokens of 16 features, the last 0-4 of them padding holding large junk values."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, 16, generator=g)
        self.mask = (torch.arange(6) < torch.randint(2, 7, (n, 1), generator=g)).long()
        junk = 30.0 * torch.randn(n, 6, 16, generator=g) * torch.linspace(0.0, 1.0, 16)  # most in the last features
        self.x = torch.where(self.mask.bool().unsqueeze(-1), self.x, junk)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "mask": self.mask[i], "y": self.y[i]}


class TokenModule(LightningModule):
    """Per-token MLP, mean over the real tokens, classifier: padding reaches no output."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.head, self.lr = nn.Linear(8, 4), lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        m = batch["mask"].unsqueeze(-1).float()
        pooled = (self.net(batch["x"]) * m).sum(1) / m.sum(1)
        return F.cross_entropy(self.head(pooled), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Tokens(), batch_size=16)


def _real_rows(batches: int) -> torch.Tensor:
    """The inputs of ``net.0`` at the real tokens of the first ``batches`` batches (lr 0: the weights stay)."""
    data = _Tokens()
    x, mask = data.x[: 16 * batches], data.mask[: 16 * batches]
    return x[mask.bool()]


def _pruned(make_trainer: Any, **kwargs: Any) -> tuple[GradualPruning, torch.Tensor, torch.Tensor]:
    seed_everything(0)
    model = TokenModule()
    before = model.net[0].weight.detach().clone()
    pruning = GradualPruning(final_sparsity=0.5, start_step=3, end_step=3, schedule="one_shot", targets=["net.0"],
                             criterion="activation", **kwargs)
    make_trainer(callbacks=[pruning], max_steps=4).fit(model)
    return pruning, before, model.net[0].weight.detach()


def test_pruning_statistics_and_update_count_the_real_tokens_only(make_trainer: Any) -> None:
    x = _real_rows(3)  # batches 0-2, seen before the update at step 3
    pruning, w, got = _pruned(make_trainer, reconstruct=True, token_mask="mask")
    keep = pruning.masks["net.0.weight"]
    assert torch.equal(keep, masks.unstructured_mask(w, 0.5, scores=w.abs() * x.norm(dim=0)))
    torch.testing.assert_close(got, reconstruct_weight(w, x.T @ x, keep), rtol=1e-5, atol=1e-6)
    padded, _, got_padded = _pruned(make_trainer, reconstruct=True)  # the junk of padding counted: another result
    assert not torch.equal(padded.masks["net.0.weight"], keep)
    assert not torch.allclose(got_padded, got)


def test_whiten_counts_the_real_tokens_only(make_trainer: Any) -> None:
    seed_everything(0)
    model = TokenModule()
    weight = model.net[0].weight.detach().clone()
    lowrank = LowRankFactorization(ranks={"net.0": 4}, start_step=3, targets=["net.0"], whiten=True,
                                   token_mask="mask")
    make_trainer(callbacks=[lowrank], max_steps=4).fit(model)
    x = _real_rows(3)
    up, down = truncated_svd(weight, 4, whitening(x.T @ x))
    torch.testing.assert_close(model.net[0].up.weight @ model.net[0].down.weight, up @ down, atol=1e-5, rtol=1e-4)


def test_token_mask_errors(make_trainer: Any) -> None:
    with pytest.raises(ValueError, match=r"`token_mask`='attention_mask' selects the inputs gathered for "
                                         r"criterion='activation' or reconstruct; nothing is gathered"):
        GradualPruning(token_mask="attention_mask")
    with pytest.raises(ValueError, match=r"`token_mask`='mask' selects the inputs gathered for whiten=True"):
        LowRankFactorization(rank_ratio=0.5, token_mask="mask")
    with pytest.raises(ValueError, match=r"`token_mask` must be None or the key of the batch's token mask, got ''"):
        GradualPruning(criterion="activation", token_mask="")
    with pytest.raises(ValueError, match=r"`token_mask`='attention_mask' names no entry of the training batch "
                                         r"\(keys \['x', 'mask', 'y'\]\)"):
        _pruned(make_trainer, token_mask="attention_mask")
    with pytest.raises(RuntimeError, match=r"the input of 'net.0.weight' is \(96, 16\), not \(batch, tokens, "
                                           r"features\) for the mask's \(16, 6\)"):
        bad = GradualPruning(final_sparsity=0.5, start_step=1, criterion="activation", token_mask="mask",
                             targets=["net.0"])
        make_trainer(callbacks=[bad], max_steps=2).fit(_FlatTokens())


class _FlatTokens(TokenModule):
    """Runs its layers on the tokens flattened to rows: the mask cannot say which rows are padding."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch["x"].flatten(0, 1)).square().mean()
