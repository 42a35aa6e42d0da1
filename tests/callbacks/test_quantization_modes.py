"""QuantizationAwareTraining when the model trains in eval mode (Lightning 2.6 keeps the mode of the module handed to
``fit``): the input observers still see every training batch, and no validation forward changes a range."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.layers.quantization import (
    ActivationFakeQuantize,
    QuantConfig,
    prepare_qat,
    set_qat_flags,
)
from tests.helpers import TinyModule

_BATCHES = 8


class GrowingInputs(TinyModule):
    """TinyModule whose training batch ``k`` has inputs of amplitude ``k + 1`` (the first batch has the smallest
    range, so ranges observed on the first batch only differ from ranges observed on all of them) and whose
    validation inputs are 100 times larger than any training input (a validation forward that updated a range
    would show)."""

    def train_dataloader(self) -> DataLoader:
        return _loader(seed=0, amplitude=torch.arange(1, _BATCHES + 1).repeat_interleave(16)[:, None].float())

    def val_dataloader(self) -> DataLoader:
        return _loader(seed=1, amplitude=torch.full((_BATCHES * 16, 1), 100.0 * _BATCHES))


def _loader(seed: int, amplitude: torch.Tensor) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(amplitude), 16, generator=g) * amplitude
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (len(amplitude),), generator=g)), batch_size=16)


def _input_states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": b.clone()
        for n, m in model.named_modules() if isinstance(m, ActivationFakeQuantize)
        for k, b in m.named_buffers(recurse=False)
    }


def _fit_twice(make_trainer, eval_mode: bool, **trainer_kwargs: Any) -> tuple[GrowingInputs, dict[str, torch.Tensor]]:
    """A first QAT fit of one batch prepares the model (its ranges: the first batch's); the model is then put in
    eval mode (``eval_mode``), as after evaluating it, and QAT goes on for a full epoch in a second fit."""
    seed_everything(0)
    model = GrowingInputs()
    make_trainer(max_steps=1, limit_val_batches=0,
                 callbacks=[QuantizationAwareTraining(convert_on_fit_end=False)]).fit(model)
    first = _input_states(model)
    model.train(not eval_mode)
    make_trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(convert_on_fit_end=False)],
                 **trainer_kwargs).fit(model)
    assert model.training is not eval_mode and model.net[0].input_quant.training is not eval_mode
    return model, first


def test_eval_mode_fit_of_a_prepared_model_observes_every_training_batch(make_trainer) -> None:
    # before the fix the observers of a prepared model in eval mode never updated again: after the second fit the
    # ranges were still those of the first batch (net.0: [-2.61, 3.41] instead of [-3.36, 4.23])
    reference, first = _fit_twice(make_trainer, eval_mode=False, limit_val_batches=0)
    model, _ = _fit_twice(make_trainer, eval_mode=True, limit_val_batches=0)
    expected, got = _input_states(reference), _input_states(model)
    assert expected.keys() == got.keys() and len(got) == 14  # 2 layers, 7 buffers each
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # the data makes the difference visible: later batches widened the range the first batch set
    for name in ("net.0.input_quant", "net.2.input_quant"):
        assert got[f"{name}.max_val"] > first[f"{name}.max_val"], name
    assert got["net.0.input_quant.min_val"] < first["net.0.input_quant.min_val"]


def test_model_passed_to_fit_in_eval_mode_observes_like_train_mode(make_trainer) -> None:
    states = {}
    for eval_mode in (False, True):
        seed_everything(0)
        model = GrowingInputs().train(not eval_mode)
        make_trainer(max_epochs=1, limit_val_batches=0,
                     callbacks=[QuantizationAwareTraining(convert_on_fit_end=False)]).fit(model)
        assert model.training is not eval_mode
        states[eval_mode] = _input_states(model)
    assert states[True].keys() == states[False].keys() and states[True]
    for key in states[False]:
        assert torch.equal(states[True][key], states[False][key]), key


class _ValidationProbe(Callback):
    """Counts validation batches and input-quantizer buffers that a validation batch changed."""

    def __init__(self) -> None:
        self.batches = self.changed = 0
        self._before: dict[str, torch.Tensor] = {}

    def on_validation_batch_start(self, trainer, pl_module, *args: Any) -> None:
        self._before = _input_states(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, *args: Any) -> None:
        after = _input_states(pl_module)
        self.batches += 1
        self.changed += sum(not torch.equal(self._before[k], after[k]) for k in after)


@pytest.mark.parametrize("eval_mode", [False, True], ids=["train_mode", "eval_mode"])
def test_validation_forwards_never_change_input_ranges(make_trainer, eval_mode: bool) -> None:
    probe = _ValidationProbe()
    seed_everything(0)
    model = GrowingInputs().train(not eval_mode)
    make_trainer(max_epochs=1, val_check_interval=2, limit_val_batches=2,
                 callbacks=[QuantizationAwareTraining(convert_on_fit_end=False), probe]).fit(model)
    assert probe.batches == 2 * (_BATCHES // 2) and probe.changed == 0
    # the ranges come from the training inputs (at most 8 x a unit normal), never the 800-times validation inputs
    assert float(model.net[0].input_quant.max_val) < 50.0


def test_forwards_outside_a_fit_observe_in_training_mode_only() -> None:
    # a prepared model evaluated by hand (eval mode, gradients on) keeps its ranges, as before
    seed_everything(0)
    model = GrowingInputs()
    prepare_qat(model, ["net.0"], QuantConfig())
    set_qat_flags(model, fake_quant=True, observe=True)
    quantizer = model.net[0].input_quant
    model(torch.randn(4, 16))
    before = _input_states(model)
    model.eval()(torch.randn(4, 16) * 10)
    assert all(torch.equal(before[k], v) for k, v in _input_states(model).items())
    model.train()(torch.randn(4, 16) * 10)
    assert float(quantizer.max_val) > float(before["net.0.input_quant.max_val"])


class _ConvBn(GrowingInputs):
    """Conv2d + BatchNorm (folded into the quantized conv weight) on the same growing inputs seen as 1x4x4 images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 4, 4)), torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(16, 4),
        )


def test_eval_mode_fit_with_folded_batchnorm_observes_and_leaves_batchnorm_alone(make_trainer) -> None:
    # the BatchNorm keeps the mode the user chose (eval: running statistics used, not updated); only the observers
    # ignore the mode. The first conv's input is the data, so its observed range matches the train-mode fit's.
    states, bn_means = {}, {}
    for eval_mode in (False, True):
        seed_everything(0)
        model = _ConvBn()
        make_trainer(max_steps=1, limit_val_batches=0,
                     callbacks=[QuantizationAwareTraining(convert_on_fit_end=False)]).fit(model)
        assert model.net[1].folded_bn() is model.net[2]
        mean_before = model.net[2].running_mean.clone()
        model.train(not eval_mode)
        make_trainer(max_epochs=1, limit_val_batches=0,
                     callbacks=[QuantizationAwareTraining(convert_on_fit_end=False)]).fit(model)
        assert model.net[2].training is not eval_mode
        states[eval_mode] = {k: v for k, v in _input_states(model).items() if k.startswith("net.1.")}
        bn_means[eval_mode] = (mean_before, model.net[2].running_mean.clone())
    assert states[True] and all(torch.equal(states[True][k], v) for k, v in states[False].items())
    assert torch.equal(*bn_means[True]) and not torch.equal(*bn_means[False])
