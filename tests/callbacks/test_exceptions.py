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


def test_the_student_as_its_own_teacher_is_refused_and_the_model_stays_trainable(make_trainer) -> None:
    # it failed at the first step ("element 0 of tensors does not require grad") and left every parameter of the
    # student frozen and the module in eval mode
    student = TinyModule()
    for teacher in (student, student.net):  # the same object, or one that shares its parameters
        trainer = make_trainer(max_steps=2, callbacks=[KnowledgeDistillation(teacher=teacher)])
        with pytest.raises(ValueError, match="`teacher` is the student"):
            trainer.fit(student)
        assert trainer.global_step == 0
        assert all(p.requires_grad for p in student.parameters())
        assert all(m.training for m in student.modules())


def test_a_teacher_module_given_by_the_user_gets_its_modes_back_when_fit_raises(make_trainer) -> None:
    teacher = nn.Sequential(nn.Linear(16, 8), nn.Dropout(0.1), nn.Linear(8, 4))
    teacher[2].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(max_steps=6, callbacks=[KnowledgeDistillation(teacher=teacher), StopAt(2, action="raise", message="boom")]).fit(TinyModule())
    assert [p.requires_grad for p in teacher.parameters()] == [True, True, False, True]
    assert all(m.training for m in teacher.modules())
