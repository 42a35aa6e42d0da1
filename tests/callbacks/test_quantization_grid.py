"""The symmetric weight grid of QuantizationAwareTraining (``symmetric_range``): all 2^b codes below 8 bits
(``[-8, 7]``, step ``max / 7.5`` at 4 bits, as torchao and compressed-tensors), the restricted ``[-127, 127]`` at 8
bits; argument checks, a real fit, and resuming checkpoints written before the grid was recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.checkpoints import load_quantized_checkpoint
from lightning_compress.export.low_bit import GroupwiseLinear
from lightning_compress.export.quantization import Int8Linear, PackedLinear, convert
from lightning_compress.functional import quantization as qf
from lightning_compress.layers.quantization import QuantConfig, WeightFakeQuantize
from tests.helpers import TinyModule


@pytest.mark.parametrize(
    ("kwargs", "full"),
    [
        (dict(weight_bits=4), True),
        (dict(weight_bits=2), True),
        (dict(weight_bits=7, symmetric_range="full"), True),
        (dict(weight_bits=8), False),
        (dict(weight_bits=4, symmetric_range="restricted"), False),
        (dict(weight_bits=4, symmetric=False), False),
        (dict(weight_bits=4, scheme="power_of_two", activation_bits=None), False),
        (dict(weight_bits=4, scheme="mxfp4", activation_bits=None), False),
    ],
)
def test_auto_is_full_below_8_bits_for_symmetric_uniform_weights(kwargs: dict, full: bool) -> None:
    config = QuantConfig(**kwargs)
    assert config.full_range is full
    q = WeightFakeQuantize(config, channels=3)
    assert bool(q.full_range) is full
    if config.scheme == "uniform":
        assert q.qrange == qf.int_range(config.weight_bits, config.symmetric, full_range=full)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(symmetric_range="wide"), r"`symmetric_range` must be one of \['auto', 'restricted', 'full'\], got 'wide'"),
        (dict(symmetric_range=True), "`symmetric_range` must be one of"),
        (dict(weight_bits=8, symmetric_range="full"), "`symmetric_range`='full' is for 2-7 bits.*allowed: 'auto' or 'restricted'"),
        (dict(weight_bits=4, symmetric=False, symmetric_range="full"), "`symmetric_range`='full' chooses the codes of symmetric"),
        (dict(weight_bits=4, scheme="power_of_two", activation_bits=None, symmetric_range="restricted"),
         "leave it at 'auto' with `scheme`='power_of_two'"),
    ],
)
def test_bad_symmetric_range_fails_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_w4_group_fit_uses_all_16_codes_and_converts_exactly(make_trainer) -> None:
    model = TinyModule(in_features=32, hidden=64)
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=None, granularity="per_group", group_size=16,
                                    convert_on_fit_end=False)
    make_trainer(max_steps=6, callbacks=[qat]).fit(model)
    assert qat.symmetric_range == "auto"
    x = torch.randn(16, 32)
    layers = [model.net[0], model.net[2]]
    model.eval()
    with torch.no_grad():
        fq = model(x)  # the weight observers still run: steps of the weights after the last optimizer step
        fq_weights = [layer.weight_quant(layer.weight) for layer in layers]
    codes = []
    for layer in layers:
        wq = layer.weight_quant
        assert wq.qrange == (-8, 7) and bool(wq.full_range)
        # the observer's step is max|w| / 7.5 per group
        assert torch.equal(wq.scale, layer.weight.detach().reshape(*wq.scale.shape, -1).abs().amax(-1) / 7.5)
        codes.append(qf.quantize_grouped(layer.weight.detach(), wq.scale, wq.zero_point, -8, 7))
    assert any(int(c.min()) == -8 for c in codes)  # the extra code is used
    with torch.no_grad():
        conv = convert(model)
        for i, layer in enumerate((conv.net[0], conv.net[2])):
            assert isinstance(layer, GroupwiseLinear) and layer.qmin == -8
            assert torch.equal(layer.codes(), codes[i].long())  # the trained codes, -8 included, packed exactly
            # the stored weight is the trained codes times each step rounded to bf16, exactly
            wq = layers[i].weight_quant
            bf16 = qf.dequantize_grouped(codes[i], wq.scale.bfloat16().float(), wq.zero_point)
            assert torch.equal(layer.weight, bf16)
            torch.testing.assert_close(layer.weight, fq_weights[i], rtol=2**-8, atol=1e-6)
            layer.kernel = "dequantize"
        out = conv(x)
    assert ((out - fq).norm() / fq.norm()).item() < 1e-2 and qf.sqnr_db(fq, out) > 40


def test_w4_per_channel_converts_bit_exactly_and_8_bit_stays_restricted(make_trainer) -> None:
    for bits, layer_type, grid in ((4, PackedLinear, (-8, 7)), (8, Int8Linear, (-127, 127))):
        seed_everything(0)
        model = TinyModule(in_features=32, hidden=64)
        qat = QuantizationAwareTraining(weight_bits=bits, convert_on_fit_end=False)
        make_trainer(max_steps=4, callbacks=[qat]).fit(model)
        wq = model.net[0].weight_quant
        assert wq.qrange == grid
        x = torch.randn(8, 32)
        model.eval()
        with torch.no_grad():
            fq_weight = wq(model.net[0].weight)  # observes the weight after the last optimizer step
            assert torch.equal(wq.scale, model.net[0].weight.abs().amax(1) / ((grid[1] - grid[0]) / 2))
            conv = convert(model)
            assert isinstance(conv.net[0], layer_type)
            if bits == 4:
                assert conv.net[0].qmin == -8 and torch.equal(conv.net[0].weight, fq_weight)
                torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-6)


def _fit(root: Path, make_trainer, epochs: int, ckpt: str | None = None, **kwargs) -> tuple[TinyModule, QuantizationAwareTraining]:
    seed_everything(0)
    model = TinyModule(in_features=32, hidden=64)
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=None, convert_on_fit_end=False, **kwargs)
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer(max_epochs=epochs, callbacks=[qat, saver], enable_checkpointing=True).fit(model, ckpt_path=ckpt)
    return model, qat


def _as_written_before_the_grid_was_recorded(src: Path, dst: Path) -> None:
    """The checkpoint ``src`` as this code wrote it before ``symmetric_range``: no ``full_range`` buffers, no key in
    the callback's config, and steps computed for the restricted grid (max / 7)."""
    ckpt = torch.load(src, weights_only=False)
    sd = ckpt["state_dict"]
    for key in [k for k in sd if k.endswith("weight_quant.full_range")]:
        del sd[key]
        prefix = key.removesuffix("full_range")
        w = sd[prefix.removesuffix("weight_quant.") + "weight"]
        sd[prefix + "scale"] = w.abs().amax(1) / 7
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("QuantizationAwareTraining")]
    state["quantization_config"].pop("symmetric_range")
    torch.save(ckpt, dst)


def test_resume_keeps_the_grid_of_the_checkpoint(tmp_path: Path, make_trainer) -> None:
    straight, _ = _fit(tmp_path / "a", make_trainer, 3)
    _fit(tmp_path / "b", make_trainer, 2)
    new = tmp_path / "b" / "ckpt" / "epoch=1.ckpt"
    assert torch.load(new, weights_only=False)["state_dict"]["net.0.weight_quant.full_range"] == 1
    resumed, _ = _fit(tmp_path / "b", make_trainer, 3, ckpt=str(new))
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # a checkpoint written before the grid was recorded resumes, converts and loads on the restricted grid
    old = tmp_path / "old.ckpt"
    _as_written_before_the_grid_was_recorded(new, old)
    model, qat = _fit(tmp_path / "c", make_trainer, 3, ckpt=str(old))
    assert qat.symmetric_range == "auto" and qat._config.full_range
    for layer in (model.net[0], model.net[2]):
        wq = layer.weight_quant
        assert not bool(wq.full_range) and wq.qrange == (-7, 7)
        assert torch.equal(wq.scale, layer.weight.detach().abs().amax(1) / 7)  # the observer kept max / 7
    with torch.no_grad():
        assert convert(model.eval()).net[0].qmin == -7
    loaded = load_quantized_checkpoint(TinyModule(in_features=32, hidden=64), old)
    assert loaded.net[0].weight_quant.qrange == (-7, 7)
    with pytest.raises(ValueError, match="`symmetric_range`='auto' \\(this callback: 'restricted'\\)"):
        _fit(tmp_path / "d", make_trainer, 3, ckpt=str(new), symmetric_range="restricted")
