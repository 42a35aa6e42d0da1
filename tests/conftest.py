"""Shared fixtures: a tiny real LightningModule (:class:`tests.helpers.TinyModule`) and a fast CPU Trainer factory."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from tests.helpers import TinyModule

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(1)


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
