"""The low-bit formats of QAT (group-wise int, per-token dynamic int8, fp8, MX) and thinned Hugging Face models in the
compressed-tensors layout: real ``AutoModel.from_pretrained`` load-back in a process that imports nothing of ours."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lightning_compress.export import load_safetensors, save_pretrained
from lightning_compress.export.low_bit import GroupwiseLinear
from lightning_compress.export.pruning import thin
from lightning_compress.export.quantization import convert
from lightning_compress.layers.quantization import (
    ActivationFakeQuantize,
    QuantConfig,
    prepare_qat,
    set_qat_flags,
)
from tests.export.test_safetensors import (
    HF_ATOL,
    _load_back,
    _qat,
    _tiny_bert,
    check_w8a8_w4_float,
    w8a8_w4_float_cases,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

MX_RTOL = 3e-2  # MX exports load as a bfloat16 model (see save_pretrained): bf16 activations, measured ~1 %
FORMATS = {  # QuantConfig of each case -> the compressed-tensors format it must be written in
    "w4g32": (dict(weight_bits=4, activation_bits=None, granularity="per_group", group_size=32), "pack-quantized"),
    "w4g16a8dyn": (dict(weight_bits=4, activation_bits=8, granularity="per_group", group_size=16,
                        activation_granularity="per_token", dynamic=True), "pack-quantized"),
    "w4g32a8": (dict(weight_bits=4, activation_bits=8, granularity="per_group", group_size=32), "pack-quantized"),
    "w8a8dyn": (dict(weight_bits=8, activation_bits=8, activation_granularity="per_token", dynamic=True), "int-quantized"),
    "fp8": (dict(weight_bits=8, activation_bits=None, scheme="fp8_e4m3"), "float-quantized"),
    "fp8a8tok": (dict(weight_bits=8, activation_bits=8, scheme="fp8_e4m3", granularity="per_tensor",
                      activation_granularity="per_token", dynamic=True), "float-quantized"),
    "fp8a8tensor": (dict(weight_bits=8, activation_bits=8, scheme="fp8_e4m3", dynamic=True), "float-quantized"),
    "mxfp8": (dict(weight_bits=8, activation_bits=None, scheme="mxfp8"), "mxfp8-quantized"),
    "mxfp6": (dict(weight_bits=6, activation_bits=None, scheme="mxfp6"), "mxfp6-pack-quantized"),
    "mxfp4": (dict(weight_bits=4, activation_bits=None, scheme="mxfp4"), "mxfp4-pack-quantized"),
    # the scales are stored: the rule that chose them does not matter to the loader
    "mxfp4rceil": (dict(weight_bits=4, activation_bits=None, scheme="mxfp4", mx_scale="rceil"), "mxfp4-pack-quantized"),
}
LAYER = "encoder.layer.0.intermediate.dense"


def _converted_reference(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    """Our converted model's output on its float path (group-wise layers dequantize instead of the bf16 int4 kernel)."""
    conv = convert(model)
    for m in conv.modules():
        if isinstance(m, GroupwiseLinear):
            m.kernel = "dequantize"
    with torch.no_grad():
        return conv(input_ids=ids).last_hidden_state, conv


def _no_input_quant(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    for m in model.modules():
        if isinstance(m, ActivationFakeQuantize):
            m.fake_quant_enabled.fill_(0)
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    for m in model.modules():
        if isinstance(m, ActivationFakeQuantize):
            m.fake_quant_enabled.fill_(1)
    return out


def _thin_ffn(model: nn.Module, widths: list[int]) -> None:
    """Structured pruning of each layer's feed-forward units to ``widths``, then ``thin`` of that block."""
    h = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for layer, keep in zip(model.encoder.layer, widths, strict=True):
        with torch.no_grad():
            layer.intermediate.dense.weight[keep:] = 0.0
        small = thin(nn.Sequential(layer.intermediate, layer.output.dense), h)
        layer.intermediate, layer.output.dense = small[0], small[1]


@pytest.mark.slow
def test_transformers_loads_every_format(tmp_path: Path) -> None:
    """W8A8 / W4 / float (test_safetensors.py), the low-bit formats and a thinned BERT, in one transformers process."""
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    first_refs, first_dirs = w8a8_w4_float_cases(tmp_path, ids)
    refs, weights, unquantized_inputs, dirs = {}, {}, {}, {}
    for key, (cfg, fmt) in FORMATS.items():
        model = _tiny_bert(tmp_path)
        _qat(model, ids, **cfg)
        refs[key], conv = _converted_reference(model, ids)
        weights[key] = conv.get_submodule(LAYER).weight.detach()
        if cfg["activation_bits"]:
            unquantized_inputs[key] = _no_input_quant(model, ids)
        dirs[key] = Path(save_pretrained(model, tmp_path / key))
        config = json.loads((dirs[key] / "config.json").read_text())
        assert config["quantization_config"]["format"] == fmt, key
        assert config.get("dtype") == ("bfloat16" if key.startswith("mx") else None), key
    thinned = _tiny_bert(tmp_path)
    _thin_ffn(thinned, [40, 40])
    with torch.no_grad():
        refs["thinned"] = thinned(input_ids=ids).last_hidden_state
    dirs["thinned"] = Path(save_pretrained(thinned, tmp_path / "thinned"))
    assert json.loads((dirs["thinned"] / "config.json").read_text())["intermediate_size"] == 40

    loaded = _load_back(tmp_path, {**first_dirs, **dirs}, ids, weight=LAYER)
    check_w8a8_w4_float(loaded, first_refs, first_dirs, ids, tmp_path)
    for key, ref in refs.items():
        rtol = MX_RTOL if key.startswith("mx") else HF_ATOL
        assert (loaded[key].float() - ref).abs().max() <= rtol * ref.abs().max(), key
        if key in weights:  # the decompressed weights are exactly our stored levels
            assert torch.equal(loaded[key + "/weight"].float(), weights[key]), key
        if key in unquantized_inputs:  # the load-back quantized the inputs at run time as we do
            assert (loaded[key] - unquantized_inputs[key]).abs().max() > 10 * HF_ATOL * ref.abs().max(), key
    assert loaded["thinned/weight"].shape == (40, 32)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))


@pytest.mark.parametrize("key", list(FORMATS))
def test_plain_module_low_bit_round_trip(tmp_path: Path, key: str) -> None:
    cfg, fmt = FORMATS[key]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    net = _mlp()
    prepare_qat(net, ["0", "2"], QuantConfig(**cfg))
    set_qat_flags(net, fake_quant=True, observe=True)
    net.train()
    net(x)
    net.eval()
    d = Path(save_pretrained(net, tmp_path / key))
    meta = json.loads((d / "quantization_config.json").read_text())["quantization_config"]
    (group,) = meta["config_groups"].values()
    assert meta["format"] == group["format"] == fmt and group["targets"] == ["0", "2"]
    with safe_open(d / "model.safetensors", "pt") as f:
        names = set(f.keys())
        if fmt == "pack-quantized":
            assert f.get_tensor("0.weight_packed").dtype == torch.int32 and f.get_tensor("0.weight_packed").shape == (32, 8)
            assert f.get_tensor("0.weight_scale").shape == (32, 64 // cfg["group_size"])
            assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == cfg["group_size"]
        elif fmt.startswith("mxfp") and fmt.endswith("pack-quantized"):
            packed = f.get_tensor("0.weight_packed")
            assert packed.dtype == torch.uint8 and packed.shape == (32, 64 * cfg["weight_bits"] // 8)
            assert f.get_tensor("0.weight_scale").dtype == torch.uint8 and f.get_tensor("0.weight_scale").shape == (32, 2)
        elif fmt in ("float-quantized", "mxfp8-quantized"):
            assert f.get_tensor("0.weight").dtype == torch.float8_e4m3fn
        else:
            assert f.get_tensor("0.weight").dtype == torch.int8
    inputs = group["input_activations"]
    assert (inputs is None) == (cfg["activation_bits"] is None)
    dynamic = cfg.get("dynamic", False)
    assert any(n.startswith("0.input_") for n in names) == (inputs is not None and not dynamic)  # static range only
    if inputs is not None:
        assert inputs["dynamic"] is dynamic
        assert inputs["strategy"] == ("token" if cfg.get("activation_granularity") == "per_token" else "tensor")
    fresh = load_safetensors(d, _mlp())
    conv = convert(net)
    for m in conv.modules():
        if isinstance(m, GroupwiseLinear):
            m.kernel = "dequantize"
    with torch.no_grad():
        ref = conv(x)
        assert (fresh(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize(("cfg", "match"), [
    (dict(weight_bits=4, activation_bits=None, granularity="per_group", group_size=32, symmetric=False),
     "layer '0' \\(uniform-group, 4 bits, asymmetric"),
    (dict(weight_bits=8, activation_bits=None, scheme="fp8_e5m2"), "layer '0' \\(fp8_e5m2, 8 bits"),
    (dict(weight_bits=8, activation_bits=None, scheme="mxint8"), "layer '0' \\(mxint8, 8 bits"),
    (dict(weight_bits=4, activation_bits=4, scheme="mxfp4", dynamic=True), "layer '0' \\(mxfp4, 4 bits, symmetric, dynamic"),
])
def test_formats_without_an_encoding_raise_before_writing(tmp_path: Path, cfg: dict, match: str) -> None:
    net = nn.Sequential(nn.Linear(64, 32))
    prepare_qat(net, ["0"], QuantConfig(**cfg))
    set_qat_flags(net, fake_quant=True, observe=True)
    net.train()
    net(torch.randn(4, 64))
    with pytest.raises(ValueError, match=match + ".*no compressed-tensors encoding"):
        save_pretrained(net, tmp_path / "out")
    assert os.listdir(tmp_path) == []  # nothing written, no temporary folder left


def test_thinned_bert_config(tmp_path: Path) -> None:
    same = _tiny_bert(tmp_path)
    _thin_ffn(same, [48, 48])
    d = Path(save_pretrained(same, tmp_path / "same"))
    assert json.loads((d / "config.json").read_text())["intermediate_size"] == 48
    with safe_open(d / "model.safetensors", "pt") as f:
        assert f.get_tensor("encoder.layer.1.output.dense.weight").shape == (32, 48)
    mixed = _tiny_bert(tmp_path)
    _thin_ffn(mixed, [48, 40])
    with pytest.raises(ValueError, match=r"different widths: encoder\.layer\.0\.intermediate\.dense \(48\), "
                                         r"encoder\.layer\.1\.intermediate\.dense \(40\).*one `intermediate_size`"):
        save_pretrained(mixed, tmp_path / "mixed")
    assert sorted(os.listdir(tmp_path)) == ["same", "source"]
