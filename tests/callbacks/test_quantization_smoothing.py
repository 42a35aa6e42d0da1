"""SmoothQuant in quantization-aware training (``QuantizationAwareTraining(smooth_quant=alpha)``): the factors, the
float function they leave unchanged, what they buy on an input with an outlier channel, where they come from
(the first training batch, never validation), resume, conversion, exports and refusals."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.export.quantization import convert
from lightning_compress.layers._quant_sharded import attach_input_groups
from lightning_compress.layers._quant_smoothing import SmoothedInput, smoothing_factors
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags
from tests.helpers import TinyModule

OUTLIER = 3  # an input channel always +/-40 where the others are N(0, 1), as BERT's LayerNorm outputs have a few


def _inputs(n: int, seed: int, amplitude: float = 1.0) -> torch.Tensor:
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    x[:, OUTLIER] = 40 * torch.sign(x[:, OUTLIER])
    return x * amplitude


class OutlierModule(TinyModule):
    """TinyModule whose inputs have one outlier channel, with a weight column 40x smaller so that it contributes as
    much as the others (as in a trained model); validation inputs are 100x larger than training's (a validation
    forward that set the factors would show)."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr=lr)
        with torch.no_grad():
            self.net[0].weight[:, OUTLIER] /= 40

    def train_dataloader(self) -> DataLoader:
        x = _inputs(64, seed=0)
        return DataLoader(TensorDataset(x, torch.randint(0, 4, (64,))), batch_size=32)

    def val_dataloader(self) -> DataLoader:
        x = _inputs(32, seed=1, amplitude=100.0)
        return DataLoader(TensorDataset(x, torch.randint(0, 4, (32,))), batch_size=16)


def _fit(make_trainer: Any, smooth: float | None, targets: list[str] | None = None,
         **kwargs: Any) -> tuple[OutlierModule, QuantizationAwareTraining]:
    seed_everything(0)
    model = OutlierModule(lr=0.01)
    qat = QuantizationAwareTraining(start_step=0, convert_on_fit_end=False, smooth_quant=smooth, targets=targets)
    make_trainer(max_epochs=1, callbacks=[qat], **kwargs).fit(model)
    return model, qat


def test_factors_follow_the_formula_and_leave_the_float_layer_unchanged() -> None:
    torch.manual_seed(0)
    act_max, w = torch.rand(16) * 5 + 0.01, torch.randn(8, 16)
    act_max[OUTLIER] = 200.0
    s = smoothing_factors(act_max, w, alpha=0.8)
    raw = act_max.pow(0.8) / w.abs().amax(0).pow(0.2)
    torch.testing.assert_close(s, raw.clamp(min=float(torch.quantile(raw, 0.1)), max=100.0))
    assert s[OUTLIER] == s.max() and s.min() == pytest.approx(float(torch.quantile(raw, 0.1)))
    linear = nn.Linear(16, 8)
    net = nn.Sequential(nn.Linear(16, 8))
    net[0].load_state_dict(linear.state_dict())
    prepare_qat(net, ["0"], QuantConfig(smooth_quant=0.8))
    x = _inputs(32, seed=2)
    net[0].smoothing.calibrate(x, net[0].weight, net[0].input_quant)
    assert bool(net[0].smoothing.initialized) and net[0].smoothing.factor[OUTLIER] > 10
    with torch.no_grad():  # fake quantization off: (x / s) (W s)^T is the float layer
        torch.testing.assert_close(net(x), linear(x), rtol=1e-5, atol=1e-5)


def test_an_outlier_channel_quantizes_far_better_with_smoothing(make_trainer: Any) -> None:
    errors = {}
    for smooth in (None, 0.5):  # the layer that sees the outlier channel, on inputs inside its observed range
        model, _ = _fit(make_trainer, smooth, targets=["net.0"])
        x = _inputs(64, seed=0)[:32]  # the first training batch: the range it observed
        model.eval()
        with torch.no_grad():
            fake = model(x)
            set_qat_flags(model, fake_quant=False)
            exact = model(x)
        errors[smooth] = float((fake - exact).norm() / exact.norm())
    assert errors[0.5] < 0.5 * errors[None], errors


def test_factors_come_from_the_first_training_batch_not_validation(make_trainer: Any) -> None:
    seed_everything(0)
    initial = OutlierModule(lr=0.01).net[0].weight.detach().clone()  # what `_fit` builds: the weight at step 0
    model, _ = _fit(make_trainer, 0.5, num_sanity_val_steps=1, limit_val_batches=1)
    first = _inputs(64, seed=0)[:32]
    expected = smoothing_factors(first.abs().amax(0), initial, 0.5)
    torch.testing.assert_close(model.net[0].smoothing.factor, expected)
    assert bool(model.net[2].smoothing.initialized)


def test_resume_keeps_the_factors_and_conversion_divides_by_them(make_trainer: Any, tmp_path: Path) -> None:
    model, qat = _fit(make_trainer, 0.8)
    factors = model.net[0].smoothing.factor.clone()
    trainer = make_trainer(max_epochs=1, callbacks=[qat])
    trainer.strategy.connect(model)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.equal(torch.load(ckpt, weights_only=False)["state_dict"]["net.0.smoothing.factor"], factors)
    seed_everything(1)
    resumed = OutlierModule(lr=0.01)
    qat2 = QuantizationAwareTraining(start_step=0, convert_on_fit_end=False, smooth_quant=0.8)
    make_trainer(max_epochs=2, callbacks=[qat2]).fit(resumed, ckpt_path=str(ckpt))
    assert torch.equal(resumed.net[0].smoothing.factor, factors)  # restored, not recalibrated on the new batches
    resumed.eval()
    x = _inputs(64, seed=4)
    converted = convert(resumed)
    assert isinstance(converted.net[0], SmoothedInput)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), resumed(x), rtol=1e-4, atol=1e-4)


def test_bad_settings_are_refused_before_training() -> None:
    with pytest.raises(ValueError, match=r"`smooth_quant` must be None or a migration strength in \(0, 1\), got 1.5"):
        QuantizationAwareTraining(smooth_quant=1.5)
    with pytest.raises(ValueError, match="`smooth_quant` moves input outliers .* set `activation_bits`"):
        QuantizationAwareTraining(activation_bits=None, smooth_quant=0.5)


def test_compressed_tensors_export_refuses_smoothed_layers(make_trainer: Any, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from lightning_compress.export.safetensors import save_pretrained

    model, _ = _fit(make_trainer, 0.8)
    with pytest.raises(ValueError, match=r"layers \['net.0', 'net.2'\] divide their input by SmoothQuant factors"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _calibrate_on_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    net = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():  # replicated, as under DDP
        net[0].weight.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    prepare_qat(net, ["0"], QuantConfig(smooth_quant=0.5))
    attach_input_groups(net, "test", data_parallel=True)  # as QuantizationAwareTraining does at fit start
    set_qat_flags(net, fake_quant=True)
    net.train()(_inputs(16, seed=10 + rank, amplitude=1.0 + 3 * rank))  # the first training forward sets the factors
    torch.save(net[0].smoothing.factor, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_agree_on_the_factors_of_the_whole_batch(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_calibrate_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    f0, f1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(f0, f1)
    both = torch.cat([_inputs(16, seed=10), _inputs(16, seed=11, amplitude=4.0)])
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(f0, smoothing_factors(both.abs().amax(0), weight, 0.5))
