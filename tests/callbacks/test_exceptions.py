"""A fit that raises leaves the model clean: the same model fits again with fresh callbacks.

Lightning does not call ``teardown`` when fit raises, so each callback releases its claims, hooks and wrapped
``training_step`` in ``on_exception`` too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lightning.pytorch import Callback
from torch import nn

from lightning_compress import (
    GradualPruning,
    KnowledgeDistillation,
    LowRankFactorization,
    QuantizationAwareTraining,
)
from tests.helpers import StopAt, TinyModule

FACTORIES: dict[str, Callable[[], Callback]] = {
    "pruning": lambda: GradualPruning(final_sparsity=0.5, start_step=0, end_step=4, update_every=1),
    "quantization": lambda: QuantizationAwareTraining(weight_bits=8, activation_bits=8, convert_on_fit_end=False),
    "distillation": lambda: KnowledgeDistillation(teacher=nn.Sequential(nn.Linear(16, 4))),
    "low_rank": lambda: LowRankFactorization(rank_ratio=0.5, start_step=4, targets=["net.0"]),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_fit_that_raises_leaves_the_model_refittable(name: str, make_trainer, tiny_module: TinyModule) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(max_steps=6, callbacks=[FACTORIES[name](), StopAt(2, action="raise", message="boom")]).fit(tiny_module)
    assert "training_step" not in tiny_module.__dict__  # no wrapper left on the instance
    trainer = make_trainer(max_steps=6, callbacks=[FACTORIES[name]()])
    trainer.fit(tiny_module)  # would raise "already prunes/quantizes/..." with a stale claim
    assert trainer.global_step == 6
