"""QuantizationAwareTraining with the low-bit formats (group-wise weights, per-token dynamic inputs, fp8, MX) in a
real Trainer: argument checks, setup errors naming the layer, exact resume, conversion at fit end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.checkpoints import load_quantized_checkpoint
from lightning_compress.export.low_bit import Float8Linear, GroupwiseLinear, MXLinear
from lightning_compress.export.quantization import Int8Linear, convert
from lightning_compress.functional import formats as ff
from tests.helpers import TinyModule


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(granularity="per_group"), "`granularity`='per_group' needs `group_size`, an integer >= 2, got None"),
        (dict(group_size=32), "`group_size`=32 applies to `granularity`='per_group' only"),
        (dict(scheme="power_of_two", granularity="per_group", group_size=32, activation_bits=None), "needs `scheme`='uniform'"),
        (dict(activation_granularity="per_token"), "set `dynamic`=True"),
        (dict(activation_granularity="per_row"), "`activation_granularity` must be one of"),
        (dict(dynamic=True, activation_bits=None), "set `activation_bits`"),
        (dict(dynamic=True), "set `activation_granularity`='per_token'"),
        (dict(scheme="mxfp4"), "`scheme`='mxfp4' has 4-bit elements: set `weight_bits`=4"),
        (dict(scheme="mxfp4", weight_bits=4, activation_bits=8), "`activation_bits` must be 4 \\(inputs in the mxfp4 format\\)"),
        (dict(scheme="fp8_e4m3", activation_bits=8), "scaled at run time: set `dynamic`=True"),
        (dict(scheme="fp8_e5m2", activation_bits=None, symmetric=False), "fixed symmetric grid"),
        (dict(scheme="mxfp8", activation_bits=None, granularity="per_tensor"), "one scale per block of 32"),
        (dict(scheme="mxfp8", activation_bits=None, granularity="per_group", group_size=16), "one scale per block of 32"),
        (dict(scheme="int4"), "`scheme` must be one of"),
        (dict(mx_scale="rceil"), "`mx_scale`='rceil' chooses the shared scale of MX blocks: leave it at 'floor' with `scheme`='uniform'"),
        (dict(scheme="mxfp8", activation_bits=None, mx_scale="ceil"), "`mx_scale` must be one of"),
    ],
)
def test_bad_format_arguments_fail_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(granularity="per_group", group_size=32, activation_bits=None),
         "layer 'net.0': `group_size`=32 does not divide its in_features=16"),
        (dict(scheme="mxfp8", activation_bits=None), "layer 'net.0': `scheme`='mxfp8' needs in_features divisible by 32, got 16"),
    ],
)
def test_shapes_the_format_cannot_take_fail_in_setup(make_trainer, tiny_module: TinyModule, kwargs: dict,
                                                      message: str) -> None:
    trainer = make_trainer(max_steps=4, callbacks=[QuantizationAwareTraining(**kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(tiny_module)
    assert trainer.global_step == 0 and type(tiny_module.net[0]).__name__ == "Linear"


def _run(tmp_path: Path, make_trainer, epochs: int, ckpt: str | None = None, **kwargs) -> TinyModule:
    seed_everything(0)
    model = TinyModule(in_features=32, hidden=64)
    qat = QuantizationAwareTraining(start_epoch=1, convert_on_fit_end=False, **kwargs)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer(max_epochs=epochs, callbacks=[qat, saver], enable_checkpointing=True).fit(model, ckpt_path=ckpt)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weight_bits=4, granularity="per_group", group_size=16, learn_scale=True, symmetric=False,
             activation_bits=8, activation_granularity="per_token", dynamic=True),
        dict(scheme="mxfp4", weight_bits=4, activation_bits=4, dynamic=True),
    ],
    ids=["w4g16-lsq-asym-a8-per-token", "mxfp4"],
)
def test_resume_equals_a_straight_run_and_the_checkpoint_loads(tmp_path: Path, make_trainer, kwargs: dict) -> None:
    straight = _run(tmp_path / "a", make_trainer, 3, **kwargs)
    _run(tmp_path / "b", make_trainer, 2, **kwargs)
    ckpt = tmp_path / "b" / "ckpt" / "epoch=1.ckpt"
    resumed = _run(tmp_path / "b", make_trainer, 3, ckpt=str(ckpt), **kwargs)
    sd_a, sd_b = straight.state_dict(), resumed.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    if "group_size" in kwargs:
        assert sd_a["net.0.weight_quant.scale"].shape == (64, 2)
    fresh = load_quantized_checkpoint(TinyModule(in_features=32, hidden=64), tmp_path / "a" / "ckpt" / "epoch=2.ckpt")
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), straight.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "layer", "bits"),
    [
        (dict(weight_bits=4, granularity="per_group", group_size=32, activation_bits=None), GroupwiseLinear, 4),
        (dict(weight_bits=8, activation_bits=8, activation_granularity="per_token", dynamic=True), Int8Linear, 8),
        (dict(scheme="fp8_e4m3", activation_bits=8, dynamic=True, activation_granularity="per_token"), Float8Linear, 8),
        (dict(scheme="mxfp6", weight_bits=6, activation_bits=None), MXLinear, 6),
    ],
)
def test_convert_on_fit_end_gives_the_low_bit_layers(make_trainer, kwargs: dict, layer: type, bits: int) -> None:
    model = TinyModule(in_features=32, hidden=64)
    qat = QuantizationAwareTraining(**kwargs)
    trainer = make_trainer(max_epochs=2, callbacks=[qat])
    trainer.fit(model)
    assert isinstance(model.net[0], layer) and isinstance(model.net[2], layer)
    assert qat.compression_bits(model) == {"net.0.weight": bits, "net.2.weight": bits}
    out = trainer.validate(model, verbose=False)
    assert 0.0 <= out[0]["val/acc"] <= 1.0
    assert qat.converted_bytes is not None and qat.converted_bytes > 0


def test_the_fake_quantized_model_trains_with_group_lsq(make_trainer) -> None:
    model = TinyModule(in_features=32, hidden=64)
    qat = QuantizationAwareTraining(weight_bits=4, granularity="per_group", group_size=16, learn_scale=True,
                                    activation_bits=None, convert_on_fit_end=False)
    make_trainer(max_epochs=1, callbacks=[qat]).fit(model)
    scale = model.net[0].weight_quant.scale
    assert isinstance(scale, torch.nn.Parameter) and scale.shape == (64, 2)
    init = model.net[0].weight_quant  # LSQ steps moved away from their initial value
    from lightning_compress.functional.quantization import group_qparams

    start = group_qparams(model.net[0].weight, 4, True, 16, lsq=True)[0]
    assert not torch.allclose(init.scale.detach(), start)
    converted = convert(model)
    assert isinstance(converted.net[0], GroupwiseLinear) and converted.net[0].kernel == "dequantize"  # g16


def test_mx_rceil_scales_train_and_convert_by_the_same_rule(make_trainer) -> None:
    seed_everything(0)
    model = TinyModule(in_features=64, hidden=64)
    kwargs = dict(scheme="mxfp8", activation_bits=8, dynamic=True, convert_on_fit_end=False)
    make_trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(mx_scale="rceil", **kwargs)]).fit(model)
    layer = model.net[0]
    assert layer.weight_quant.config.mx_scale == "rceil" and layer.input_quant.mx_scale == "rceil"
    w = layer.weight.detach()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 300  # block maxima up to ~1000
    with torch.no_grad():
        fake = model.eval()(x)
        layer.input_quant.mx_scale = "floor"  # the spec's rule on the inputs changes the output: the rule is used
        assert not torch.equal(model(x), fake)
        layer.input_quant.mx_scale = "rceil"
        conv = convert(model)
        assert isinstance(conv.net[0], MXLinear) and conv.net[0].input_quant["mx_scale"] == "rceil"
        torch.testing.assert_close(conv(x), fake, rtol=1e-5, atol=1e-5)
    rceil, floor = ff.quantize_mx(w, "mxfp8", "rceil")[1], ff.quantize_mx(w, "mxfp8")[1]
    assert torch.equal(conv.net[0].scales, rceil) and not torch.equal(rceil, floor)
    assert conv.net[0].quant_format()["input_activations"]["scale_rounding"] == "rceil"
