"""ONNX export of 4-bit (per channel and group-wise), fp8 and MX weights, run in real onnxruntime sessions."""

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
from lightning_compress.export.low_bit import GroupwiseLinear
from lightning_compress.export.onnx import EXACT_NBITS_CONFIG, ONNX_QUANT_RTOL
from lightning_compress.export.quantization import convert
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags
from tests.helpers import TinyModule

EXACT_RTOL = 1e-5  # onnxruntime with EXACT_NBITS_CONFIG (float32 MatMulNBits) vs the dequantized converted model
T = onnx.TensorProto


def _session(path: str | Path, exact: bool = False, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if exact:
        for k, v in EXACT_NBITS_CONFIG.items():
            so.add_session_config_entry(k, v)
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path: str | Path, x: torch.Tensor, exact: bool = False) -> np.ndarray:
    s = _session(path, exact)
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _rel(y: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy()
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def _prepared(x: torch.Tensor, **cfg) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    prepare_qat(net, ["0", "2"], QuantConfig(**cfg))
    set_qat_flags(net, fake_quant=True, observe=True)
    net.train()
    net(x)
    return net.eval()


def _dequantized(net: nn.Module) -> nn.Module:
    """The converted model with every group-wise layer on its float (dequantizing) path: the exact reference."""
    out = convert(net)
    for m in out.modules():
        if isinstance(m, GroupwiseLinear):
            m.kernel = "dequantize"
    return out


def _types(path: str | Path) -> dict[str, str]:
    return {i.name: T.DataType.Name(i.data_type) for i in onnx.load(path).graph.initializer if "codes" in i.name}


W4 = {
    "w4_per_channel": (dict(weight_bits=4, activation_bits=None), "INT4", 0),
    "w4_per_channel_asym_a8": (dict(weight_bits=4, activation_bits=8, symmetric=False), "INT4", 0),
    "w4_g32": (dict(weight_bits=4, activation_bits=None, granularity="per_group", group_size=32), "INT4", 32),
    "w4_g16_asym": (dict(weight_bits=4, activation_bits=None, granularity="per_group", group_size=16, symmetric=False),
                    "INT4", 16),
    "w4_g32_a8": (dict(weight_bits=4, activation_bits=8, granularity="per_group", group_size=32), "INT4", 32),
    "w8_g32": (dict(weight_bits=8, activation_bits=None, granularity="per_group", group_size=32), "UINT8", 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(W4))
def test_int4_and_groupwise_weights_run_in_onnxruntime_at_their_trained_levels(tmp_path: Path, name: str) -> None:
    cfg, storage, block = W4[name]
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    net = _prepared(x, **cfg)
    path = to_onnx(net, tmp_path / "q.onnx", x[:4])
    assert set(_types(path).values()) == {storage}
    dq = [n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear" and "codes" in n.input[0]]
    assert len(dq) == 2
    assert all({a.name: a.i for a in n.attribute}.get("block_size", 0) == block for n in dq)
    assert _rel(_run(path, x), net(x)) < ONNX_QUANT_RTOL  # default session: int8 inputs inside MatMulNBits
    # float32 MatMulNBits: exact for weight-only layers (static inputs are requantized by onnxruntime's own Q/DQ)
    assert _rel(_run(path, x, exact=True), _dequantized(net)(x)) < (EXACT_RTOL if "a8" not in name else ONNX_QUANT_RTOL)
    _session(path, optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    if "a8" in name:  # quantized inputs: DequantizeLinear + float Gemm/MatMul
        assert "MatMulNBits" not in ops
    else:  # every weight-only layer (the first one followed by ReLU) fused: no weight dequantized at run time
        assert ops.count("MatMulNBits") == 2 and "DequantizeLinear" not in ops, ops


def test_int4_file_is_about_half_the_int8_file(tmp_path: Path) -> None:
    x = torch.randn(16, 64)
    torch.manual_seed(0)
    sizes = {}
    for bits in (4, 8):
        net = _prepared(x, weight_bits=bits, activation_bits=None)
        sizes[bits] = os.path.getsize(to_onnx(net, tmp_path / f"w{bits}.onnx", x))
    big = {}
    for bits in (4, 8):  # wider layers: the weights dominate the file
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(256, 256))
        prepare_qat(net, ["0"], QuantConfig(weight_bits=bits, activation_bits=None))
        set_qat_flags(net, fake_quant=True, observe=True)
        net(torch.randn(4, 256))
        big[bits] = os.path.getsize(to_onnx(net.eval(), tmp_path / f"b{bits}.onnx", torch.randn(2, 256)))
    assert sizes[4] < sizes[8]
    assert big[4] < 0.55 * big[8], big


@pytest.mark.slow
@pytest.mark.parametrize("scheme,storage", [("fp8_e4m3", "FLOAT8E4M3FN"), ("fp8_e5m2", "FLOAT8E5M2")])
def test_fp8_weights_as_float8_initializers(tmp_path: Path, scheme: str, storage: str) -> None:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    for granularity in ("per_channel", "per_tensor"):
        net = _prepared(x, scheme=scheme, activation_bits=None, granularity=granularity)
        path = to_onnx(net, tmp_path / "f8.onnx", x[:4])
        assert set(_types(path).values()) == {storage}
        assert _rel(_run(path, x), net(x)) < EXACT_RTOL  # DequantizeLinear + float MatMul: exact by default
    with pytest.raises(ValueError, match="needs `opset` >= 19, got 18"):
        to_onnx(net, tmp_path / "old.onnx", x[:4], opset=18)


def test_opsets_below_21_store_int8_and_reject_blocks(tmp_path: Path) -> None:
    x = torch.randn(16, 64)
    net = _prepared(x, weight_bits=4, activation_bits=None)
    path = to_onnx(net, tmp_path / "o20.onnx", x, opset=20)
    assert set(_types(path).values()) == {"INT8"}
    assert _rel(_run(path, x), net(x)) < ONNX_QUANT_RTOL
    grouped = _prepared(x, weight_bits=4, activation_bits=None, granularity="per_group", group_size=32)
    with pytest.raises(ValueError, match=r"layer '0' \(uniform_group, blocks\) needs `opset` >= 21, got 20"):
        to_onnx(grouped, tmp_path / "g20.onnx", x, opset=20)
    assert os.listdir(tmp_path) == ["o20.onnx"]


@pytest.mark.parametrize("scheme,bits", [("mxfp4", 4), ("mxfp8", 8)])
def test_mx_formats_raise_naming_the_layer_before_writing(tmp_path: Path, scheme: str, bits: int) -> None:
    x = torch.randn(8, 64)
    net = _prepared(x, scheme=scheme, weight_bits=bits, activation_bits=None)
    with pytest.raises(ValueError, match=f"layer '0' \\(MXLinear\\): {scheme} .* no ONNX encoding"):
        to_onnx(net, tmp_path / "mx.onnx", x)
    assert os.listdir(tmp_path) == []


def test_run_time_inputs_with_4_bit_or_grouped_weights_raise(tmp_path: Path) -> None:
    x = torch.randn(8, 64)
    per_token = dict(activation_bits=8, activation_granularity="per_token", dynamic=True)
    for cfg in (dict(weight_bits=4, **per_token), dict(weight_bits=4, granularity="per_group", group_size=32, **per_token)):
        with pytest.raises(ValueError, match="layer '0' .*4 bits, dynamic activations.* has no ONNX encoding"):
            to_onnx(_prepared(x, **cfg), tmp_path / "d.onnx", x)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_groupwise_qat_with_a_real_trainer_converted_on_fit_end(tmp_path: Path, make_trainer) -> None:
    module = TinyModule(in_features=32, hidden=64)
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=None, granularity="per_group", group_size=32)
    make_trainer(max_steps=6, callbacks=[qat]).fit(module)
    assert isinstance(module.net[0], GroupwiseLinear) and module.net[0].kernel == "int4pack_mm"
    x = torch.randn(64, 32)
    path = to_onnx(module, tmp_path / "g.onnx", x[:2])
    with torch.no_grad():
        assert _rel(_run(path, x), module(x)) < ONNX_QUANT_RTOL  # vs the int4 kernel (bf16 activations)
        assert _rel(_run(path, x, exact=True), _exact(module, x)) < EXACT_RTOL


def _exact(module: TinyModule, x: torch.Tensor) -> torch.Tensor:
    for m in module.modules():
        if isinstance(m, GroupwiseLinear):
            m.kernel = "dequantize"
    return module(x)
