"""What the benchmark scripts share: a quiet CPU Trainer and test-split accuracy (run them as scripts:
``python benchmarks/<name>.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_compress.examples import DigitsDataModule


def quiet_trainer(epochs: int, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or sanity check; ``kwargs`` override."""
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(kwargs)
    return Trainer(callbacks=callbacks, **settings)


@torch.no_grad()
def test_accuracy(model: nn.Module, dm: DigitsDataModule) -> float:
    """Accuracy (%) of ``model`` in eval mode on the data module's test split."""
    correct = total = 0
    model.eval()
    for x, y in dm.test_dataloader():
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def median_times(fns: dict[str, Callable[[], Any]], rounds: int, inner: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, rounds interleaved across them (A, B, A, B, ...), after
    ``warmup`` calls of each: ratios between them are measured under the same machine load."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}
