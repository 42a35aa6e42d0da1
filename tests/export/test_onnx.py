"""ONNX export, checked by running the files in real onnxruntime sessions against the PyTorch models exported."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.export import to_onnx
from lightning_compress.export.onnx import ONNX_QUANT_RTOL
from lightning_compress.export.quantization import convert
from lightning_compress.layers.low_rank import factorize
from lightning_compress.layers.quantization import QuantConfig, find_conv_bn_pairs, prepare_qat, set_qat_flags

FLOAT_RTOL = 1e-4


def _session(path: str | Path, optimized: str | Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path: str | Path, *xs: torch.Tensor) -> np.ndarray:
    s = _session(path)
    return s.run(None, {i.name: x.numpy() for i, x in zip(s.get_inputs(), xs, strict=True)})[0]


def _rel(y: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy()
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def _prepared(net: nn.Module, names: list[str], x: torch.Tensor, bn: bool = False, **cfg) -> nn.Module:
    prepare_qat(net, names, QuantConfig(**cfg), find_conv_bn_pairs(net, names) if bn else None)
    set_qat_flags(net, fake_quant=True, observe=True)
    net.train()
    for _ in range(3):
        net(x)
    return net.eval()


def _mlp(seed: int = 0, width: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def test_float_mlp_round_trip_with_dynamic_batch(tmp_path: Path) -> None:
    net = _mlp()
    path = to_onnx(net, tmp_path / "mlp.onnx", torch.randn(1, 16))
    x = torch.randn(7, 16)  # another batch size than the example's
    assert _rel(_run(path, x), net(x)) < FLOAT_RTOL
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)


@pytest.mark.slow
def test_float_conv_low_rank_and_lightning_module(tmp_path: Path, tiny_module) -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    x = torch.randn(2, 1, 8, 8)
    assert _rel(_run(to_onnx(conv.eval(), tmp_path / "c.onnx", x), x), conv(x)) < FLOAT_RTOL
    tiny_module.net[0] = factorize(tiny_module.net[0], 4)
    tiny_module.example_input_array = torch.randn(3, 16)
    path = to_onnx(tiny_module, tmp_path / "lm.onnx")  # example from example_input_array
    x = torch.randn(5, 16)
    assert _rel(_run(path, x), tiny_module(x)) < FLOAT_RTOL


@pytest.mark.slow
def test_several_inputs_as_tuple_and_dict(tmp_path: Path) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) * self.b(y)

    net, x, y = Two(), torch.randn(2, 4), torch.randn(2, 5)
    for example in ((x, y), {"x": x, "y": y}):
        path = to_onnx(net, tmp_path / "two.onnx", example)
        assert [i.name for i in _session(path).get_inputs()] == ["x", "y"]
        assert _rel(_run(path, x, y), net(x, y)) < FLOAT_RTOL


CONFIGS = {
    "w8a8_asym_per_tensor": dict(weight_bits=8, activation_bits=8, symmetric=False, granularity="per_tensor"),
    "w4a8": dict(weight_bits=4, activation_bits=8),
    "w3_weight_only": dict(weight_bits=3, activation_bits=None),
    "pow2_w4a8": dict(weight_bits=4, activation_bits=8, scheme="power_of_two"),
    "pow2_w5": dict(weight_bits=5, activation_bits=None, scheme="power_of_two"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_mlp_matches_onnxruntime_at_its_trained_levels(tmp_path: Path, name: str) -> None:
    cfg = CONFIGS[name]
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    net = _prepared(_mlp(), ["0", "2", "4"], x, **cfg)
    path = to_onnx(net, tmp_path / "q.onnx", x[:4])
    assert _rel(_run(path, x), net(x)) < ONNX_QUANT_RTOL
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") >= 3
    assert ops.count("QuantizeLinear") == (3 if cfg["activation_bits"] else 0)
    codes = [i for i in model.graph.initializer if i.name.endswith("codes")]
    pow2, bits = cfg.get("scheme") == "power_of_two", cfg["weight_bits"]
    expected = {8: onnx.TensorProto.UINT8, 5: onnx.TensorProto.INT32 if pow2 else onnx.TensorProto.INT8}.get(
        bits, onnx.TensorProto.INT8 if pow2 else onnx.TensorProto.INT4)  # uniform 2-4 bits: INT4 at opset 21
    assert len(codes) == 3 and all(c.data_type == expected for c in codes)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_static_int8_linear_layers_all_run_on_qgemm_with_the_exact_bias(tmp_path: Path, granularity: str) -> None:
    # the last layer's output is not quantized again: with a float bias onnxruntime left it a float Gemm over a
    # weight dequantized on every run; an int32 bias on the accumulator's grid lets it fuse, a float remainder
    # keeps the bias exact. Layers whose output is quantized again keep one float bias (they fuse with it).
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    net = _mlp()
    with torch.no_grad():
        for i in (0, 2, 4):
            net[i].bias.add_(torch.linspace(-3, 3, net[i].bias.numel()))  # large biases: many accumulator steps
    net = _prepared(net, ["0", "2", "4"], x, weight_bits=8, activation_bits=8, granularity=granularity)
    path = to_onnx(net, tmp_path / "q.onnx", x[:4])
    _session(path, tmp_path / "opt.onnx")
    fused = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert fused.count("QGemm") == 3 and not {"Gemm", "FusedGemm", "MatMul", "DequantizeLinear"} & set(fused), fused
    assert _rel(_run(path, x), net(x)) < ONNX_QUANT_RTOL
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    codes = inits["4.bias_int32"]
    assert codes.dtype == np.int32 and np.abs(codes).max() > 100
    rebuilt = codes.astype(np.float64) * inits["4.bias_step"] + inits["4.bias_rest"]
    np.testing.assert_allclose(rebuilt, net[4].bias.detach().numpy(), rtol=1e-6, atol=1e-7)
    for i in (0, 2):
        assert f"{i}.bias_int32" not in inits and f"{i}.bias_rest" not in inits
        np.testing.assert_allclose(inits[f"{i}.bias"], net[i].bias.detach().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_qat_with_a_real_trainer_prepared_converted_and_dynamic(tmp_path: Path, tiny_module, make_trainer) -> None:
    tiny_module.example_input_array = torch.randn(4, 16)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, convert_on_fit_end=False)
    make_trainer(max_steps=6, callbacks=[qat]).fit(tiny_module)
    x = torch.randn(32, 16)
    tiny_module.eval()
    path = to_onnx(tiny_module, tmp_path / "qat.onnx")
    assert _rel(_run(path, x), tiny_module(x)) < ONNX_QUANT_RTOL
    converted = convert(tiny_module)
    assert _rel(_run(to_onnx(converted, tmp_path / "int.onnx"), x), converted(x)) < ONNX_QUANT_RTOL
    path = to_onnx(tiny_module, tmp_path / "qat_int8.onnx", weight_dtype="int8")  # uint8 x int8 kernels
    assert {i.data_type for i in onnx.load(path).graph.initializer if i.name.endswith("codes")} == {onnx.TensorProto.INT8}
    assert (_run(path, x).argmax(1) == tiny_module(x).argmax(1).numpy()).mean() >= 0.9

    # weight-only QAT, converted with run-time input quantization: DynamicQuantizeLinear + integer MatMul
    mlp = _prepared(_mlp(), ["0", "2", "4"], x, weight_bits=8, activation_bits=None)
    dyn = convert(mlp, dynamic_activations=True)
    path = to_onnx(dyn, tmp_path / "dyn.onnx", x)
    assert _rel(_run(path, x), dyn(x)) < ONNX_QUANT_RTOL
    _session(path, tmp_path / "dyn_opt.onnx")
    ops = {n.op_type for n in onnx.load(tmp_path / "dyn_opt.onnx").graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}, ops


def test_smooth_quant_layers_export_their_division(tmp_path: Path) -> None:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    x[:, 3] *= 30  # an outlier input channel
    net = _prepared(_mlp(), ["0", "2", "4"], x, weight_bits=8, activation_bits=8, smooth_quant=0.5)
    assert bool(net[0].smoothing.initialized) and net[0].smoothing.factor.argmax() == 3
    for tag, model in (("fake", net), ("int", convert(net))):
        path = to_onnx(model, tmp_path / f"{tag}.onnx", x[:4])
        assert _rel(_run(path, x), model(x)) < ONNX_QUANT_RTOL, tag
        ops = [n.op_type for n in onnx.load(path).graph.node]
        assert ops.count("Div") == 3 and ops.count("QuantizeLinear") == 3, (tag, ops)


def test_w8a8_runs_integer_kernels_and_is_small(tmp_path: Path) -> None:
    x = torch.rand(16, 16)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    fp32 = Path(to_onnx(net, tmp_path / "f.onnx", x))
    q = Path(to_onnx(_prepared(net, ["0", "2", "4"], x, weight_bits=8, activation_bits=8), tmp_path / "q.onnx", x))
    assert q.stat().st_size <= 0.3 * fp32.stat().st_size
    for path in (fp32, q):  # no exporter records: on nodes, weights, the graph (program signature), inner values
        model = onnx.load(path)
        assert not model.graph.metadata_props
        assert {v.name for v in model.graph.value_info} <= {i.name for i in model.graph.initializer}
        assert not any(n.metadata_props for n in model.graph.node)
        assert not any(i.metadata_props for i in model.graph.initializer)
    _session(q, tmp_path / "q_opt.onnx")
    ops = {n.op_type for n in onnx.load(tmp_path / "q_opt.onnx").graph.node}
    assert ops & {"QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}, ops


@pytest.mark.slow
def test_conv_with_folded_batchnorm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, groups=2, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(256, 3))
    x = torch.randn(8, 1, 8, 8)
    net = _prepared(net, ["0", "3", "5"], x, bn=True, weight_bits=8, activation_bits=8)
    path = to_onnx(net, tmp_path / "conv.onnx", x)
    assert _rel(_run(path, x), net(x)) < ONNX_QUANT_RTOL
    assert _rel(_run(to_onnx(convert(net), tmp_path / "conv2.onnx", x), x), net(x)) < ONNX_QUANT_RTOL


def test_errors_before_any_file_is_written(tmp_path: Path) -> None:
    net = _mlp()
    with pytest.raises(ValueError, match="example_input"):
        to_onnx(net, tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="`path`"):
        to_onnx(net, tmp_path / "missing" / "a.onnx", torch.randn(2, 16))
    with pytest.raises(ValueError, match="`opset`"):
        to_onnx(net, tmp_path / "a.onnx", torch.randn(2, 16), opset=11)
    x = torch.randn(8, 16)
    pow8 = _prepared(_mlp(), ["2"], x, weight_bits=8, activation_bits=None, scheme="power_of_two")
    with pytest.raises(ValueError, match="layer '2'.*power_of_two, 8 bits"):
        to_onnx(pow8, tmp_path / "a.onnx", x)
    conv = _prepared(nn.Sequential(nn.Conv2d(1, 2, 3)), ["0"], torch.randn(2, 1, 5, 5), weight_bits=8, activation_bits=None)
    with pytest.raises(ValueError, match="layer '0'.*dynamic activations, conv"):
        to_onnx(convert(conv, dynamic_activations=True), tmp_path / "a.onnx", torch.randn(2, 1, 5, 5))
    unobserved = _mlp()
    prepare_qat(unobserved, ["0"], QuantConfig())
    with pytest.raises(ValueError, match="layer '0' has no observed input range"):
        to_onnx(unobserved, tmp_path / "a.onnx", x)

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[: int(x.sum().item() > 0) + 1].nonzero().float()

    with pytest.raises(ValueError, match="torch.onnx could not export DataDependent"):
        to_onnx(DataDependent(), tmp_path / "a.onnx", x)
    assert os.listdir(tmp_path) == []  # no file, no temporary file left


def test_export_model_dispatches_each_format(tmp_path: Path) -> None:
    from lightning_compress.export import export_model, load_compressed

    net, x = _mlp(), torch.randn(4, 16)
    onnx_path = export_model(net, "onnx", tmp_path / "m.onnx", x)
    assert _rel(_run(onnx_path, x), net(x)) < FLOAT_RTOL
    st = export_model(net, "safetensors", tmp_path / "st")
    assert sorted(os.listdir(st)) == ["model.safetensors", "quantization_config.json"]
    lcdc = export_model(net, "lcdc", tmp_path / "m.lcdc")
    assert torch.equal(load_compressed(lcdc)["0.weight"], net[0].weight)
    with pytest.raises(ValueError, match="`format` must be one of"):
        export_model(net, "tflite", tmp_path / "m.tflite")  # type: ignore[arg-type]
