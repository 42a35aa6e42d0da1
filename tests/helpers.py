"""Test helpers shared across test files (importable as ``tests.helpers``): the tiny real LightningModule, a
callback that stops, raises or is killed at a step, and a runner for standalone scripts (DDP, crash, CLI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` as a standalone script in a fresh interpreter (for DDP, crash/kill and CLI tests).

    Lightning's ``strategy="ddp"`` re-launches ``sys.argv``: that must be a script, not pytest,
    so DDP tests write their script with this helper. The repository root is put on ``PYTHONPATH``.
    """
    script = cwd / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


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


class TinyTokenModule(LightningModule):
    """Token ids -> ``nn.Embedding`` (``padding_idx=0``) -> mean over tokens -> Linear: a real LightningModule with an
    embedding table (export tests)."""

    def __init__(self, vocab: int = 64, dim: int = 16, classes: int = 4, length: int = 6) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, classes)
        self.example_input_array = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.hparams.vocab, (64, self.hparams.length), generator=g)
        return DataLoader(TensorDataset(ids, torch.randint(0, self.hparams.classes, (64,), generator=g)), batch_size=16)


def _tiny_loader(in_features: int, out_features: int, seed: int, n: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, out_features, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


class StopAt(Callback):
    """At the end of optimizer step ``step`` (or of training epoch ``epoch``): stop the fit (``"stop"``: Lightning's
    ``should_stop``), raise ``RuntimeError(message)`` (``"raise"``) or SIGKILL this process (``"kill"``: no cleanup,
    no except, no finally)."""

    def __init__(
        self,
        step: int | None = None,
        *,
        epoch: int | None = None,
        action: Literal["stop", "raise", "kill"] = "stop",
        message: str = "simulated crash",
    ) -> None:
        self.step, self.epoch, self.action, self.message = step, epoch, action, message

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.step is not None and trainer.global_step == self.step:
            self._act(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.epoch is not None and trainer.current_epoch == self.epoch:
            self._act(trainer)

    def _act(self, trainer: Trainer) -> None:
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "raise":
            raise RuntimeError(self.message)
        trainer.should_stop = True
