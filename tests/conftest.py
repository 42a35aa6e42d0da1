"""Shared fixtures: a tiny real LightningModule, the digits data, and a fast CPU Trainer factory."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(1)


class TinyModule(LightningModule):
    """A 2-layer MLP on random 16-dim data: the smallest real LightningModule for callback tests."""

    def __init__(self, in_features: int = 16, hidden: int = 32, out_features: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return _tiny_loader(self.hparams.in_features, self.hparams.out_features, seed=0)

    def val_dataloader(self) -> DataLoader:
        return _tiny_loader(self.hparams.in_features, self.hparams.out_features, seed=1)


def _tiny_loader(in_features: int, out_features: int, seed: int, n: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, out_features, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


@pytest.fixture
def tiny_module() -> TinyModule:
    seed_everything(0)
    return TinyModule()


@pytest.fixture
def make_trainer(tmp_path: Any) -> Callable[..., Trainer]:
    """Factory for a fast CPU Trainer writing into ``tmp_path``: ``make_trainer(max_epochs=2, callbacks=[...])``."""

    def factory(**kwargs: Any) -> Trainer:
        defaults: dict[str, Any] = dict(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            default_root_dir=str(tmp_path),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic=True,
        )
        defaults.update(kwargs)
        return Trainer(**defaults)

    return factory
