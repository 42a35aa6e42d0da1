"""Exports of weights trained on the full-range symmetric grid (codes ``[-8, 7]`` at 4 bits, the default below 8
bits): the extra code -8 survives compressed-tensors ``pack-quantized`` (real ``transformers.AutoModel`` load-back)
and ONNX INT4 / ``MatMulNBits`` (real onnxruntime sessions) exactly."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.export import save_pretrained, to_onnx
from lightning_compress.export.low_bit import GroupwiseLinear
from lightning_compress.export.onnx import ONNX_QUANT_RTOL
from lightning_compress.export.quantization import PackedLinear
from tests.export.test_onnx_low_bit import EXACT_RTOL, _exact, _rel, _run, _session, _types
from tests.export.test_safetensors import HF_ATOL, _load_back, _qat, _tiny_bert
from tests.export.test_safetensors_formats import LAYER, _converted_reference
from tests.helpers import TinyModule

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

CASES = {  # QuantConfig of each case -> the converted layer type
    "w4_per_channel": (dict(weight_bits=4, activation_bits=None), PackedLinear),
    "w4_g16": (dict(weight_bits=4, activation_bits=None, granularity="per_group", group_size=16), GroupwiseLinear),
}


def _codes(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, GroupwiseLinear):
        return layer.codes()
    from lightning_compress.functional.packing import unpack_codes

    return unpack_codes(layer.packed, layer.bits, layer.weight_shape) + layer.qmin


@pytest.mark.slow
def test_full_range_codes_load_back_in_transformers_exactly(tmp_path: Path) -> None:
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    refs, weights, dirs = {}, {}, {}
    for key, (cfg, layer_type) in CASES.items():
        model = _tiny_bert(tmp_path)
        names = _qat(model, ids, **cfg)
        assert all(model.get_submodule(n).weight_quant.qrange == (-8, 7) for n in names)
        refs[key], conv = _converted_reference(model, ids)
        layers = [conv.get_submodule(n) for n in names]
        assert all(isinstance(m, layer_type) and m.qmin == -8 for m in layers)
        assert min(int(_codes(m).min()) for m in layers) == -8  # the extra code is in the file
        weights[key] = conv.get_submodule(LAYER).weight.detach()
        dirs[key] = Path(save_pretrained(model, tmp_path / key))
    loaded = _load_back(tmp_path, dirs, ids, weight=LAYER)
    for key, ref in refs.items():
        assert (loaded[key].float() - ref).abs().max() <= HF_ATOL * ref.abs().max(), key
        assert torch.equal(loaded[key + "/weight"].float(), weights[key]), key  # compressed-tensors decoded -8 too


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CASES))
def test_full_range_codes_run_in_onnxruntime_int4_and_matmulnbits(tmp_path: Path, make_trainer, key: str) -> None:
    cfg, layer_type = CASES[key]
    module = TinyModule(in_features=32, hidden=64)
    make_trainer(max_steps=6, callbacks=[QuantizationAwareTraining(**cfg)]).fit(module)
    assert isinstance(module.net[0], layer_type) and module.net[0].qmin == -8
    path = to_onnx(module, tmp_path / "q.onnx", torch.randn(2, 32))
    assert set(_types(path).values()) == {"INT4"}
    codes = [numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer if "codes" in i.name]
    assert len(codes) == 2 and min(int(c.min()) for c in codes) == -8
    first = next(c for c in codes if c.shape == (32, 64))  # net.0's codes, stored (in, out) for MatMul
    assert torch.equal(torch.from_numpy(first.astype("int64")), _codes(module.net[0]).t())
    x = torch.randn(64, 32)
    with torch.no_grad():
        assert _rel(_run(path, x, exact=True), _exact(module, x)) < EXACT_RTOL  # float32 MatMulNBits: exact
        assert _rel(_run(path, x), module(x)) < ONNX_QUANT_RTOL
    _session(path, optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("MatMulNBits") == 2 and "DequantizeLinear" not in ops, ops
