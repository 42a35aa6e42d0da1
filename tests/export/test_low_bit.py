"""Converted low-bit layers: group-wise weights on the int4 kernel, per-token dynamic int8, fp8 and MX storage,
each against the fake-quantized model it came from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.export.low_bit import Float8Linear, GroupwiseLinear, MXLinear, weight_storage_bits
from lightning_compress.export.quantization import Int8Linear, PackedLinear, convert, serialized_size
from lightning_compress.functional.quantization import sqnr_db
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags


def _prepared(net: nn.Module, x: torch.Tensor, **cfg) -> nn.Module:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    prepare_qat(net, names, QuantConfig(**cfg))
    set_qat_flags(net, fake_quant=True, observe=True)
    net.train()
    for _ in range(2):
        net(x)
    return net.eval()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (3, 64)])
def test_groupwise_int4_kernel_matches_fake_quant_within_bf16(symmetric: bool, bits: int, group_size: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 40))  # 40 outputs: the kernel's rows are padded to 16
    with torch.no_grad():
        net[0].weight.add_(0.02)  # off-centre, so the asymmetric grid has zero points
    x = torch.randn(5, 3, 256)
    _prepared(net, x, weight_bits=bits, activation_bits=None, granularity="per_group", group_size=group_size,
              symmetric=symmetric)
    with torch.no_grad():
        ref = net(x)
        fq_weight = net[0].weight_quant(net[0].weight)
        int_net = convert(net)
        out = int_net(x)
    layer = int_net[0]
    assert isinstance(layer, GroupwiseLinear) and layer.kernel == "int4pack_mm"
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == layer.weight.numel() // 2
    assert (layer.zero_point is None) == symmetric and layer.scale.dtype == torch.bfloat16
    # the stored weight is the trained one up to the bf16 rounding of each step (relative 2^-8)
    torch.testing.assert_close(layer.weight, fq_weight, rtol=2**-8, atol=1e-6)
    # the kernel output equals the fake-quantized model within bf16 rounding (activations, steps, products)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    assert sqnr_db(ref, out) > 40
    # against its own dequantized weight in float32, the kernel is as exact as bf16 allows
    exact = torch.nn.functional.linear(x.to(torch.bfloat16).float(), layer.weight, layer.bias)
    assert ((layer(x) - exact).abs().max() / exact.abs().max()).item() < 1e-2
    # the state round-trips into a fresh conversion (kernel layout rebuilt from the stored codes)
    other = convert(net)
    other.load_state_dict(int_net.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), out)


def test_groupwise_wide_codes_fall_back_to_a_dequantizing_forward() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 20))
    x = torch.randn(4, 64)
    _prepared(net, x, weight_bits=6, activation_bits=None, granularity="per_group", group_size=16)
    with torch.no_grad():
        ref = net(x)
        layer = convert(net)[0]
        out = layer(x)
    assert isinstance(layer, GroupwiseLinear) and layer.kernel == "dequantize"
    torch.testing.assert_close(layer.weight, net[0].weight_quant(net[0].weight), rtol=2**-8, atol=1e-6)
    assert ((out - ref).norm() / ref.norm()).item() < 2**-8


def test_groupwise_with_static_int8_inputs_and_lsq() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(8, 64)
    _prepared(net, x, weight_bits=4, activation_bits=8, granularity="per_group", group_size=32, learn_scale=True)
    assert net[0].weight_quant.scale.shape == (32, 2) and isinstance(net[0].weight_quant.scale, nn.Parameter)
    with torch.no_grad():
        ref = net(x)
        int_net = convert(net)
        out = int_net(x)
    assert isinstance(int_net[2], GroupwiseLinear) and int_net[2].input_qparams is not None
    assert sqnr_db(ref, out) > 35


def test_per_token_dynamic_int8_converts_to_the_int8_kernel_exactly() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    x = torch.randn(6, 32) * torch.logspace(-2, 2, 6).reshape(-1, 1)  # rows of very different ranges
    _prepared(net, x, weight_bits=8, activation_bits=8, activation_granularity="per_token", dynamic=True)
    iq = net[0].input_quant
    assert iq.dynamic and iq.min_val.item() == 0.0  # no observer ran
    with torch.no_grad():
        ref = net(x)
        int_net = convert(net)
        out = int_net(x)
    assert isinstance(int_net[0], Int8Linear) and int_net[0].input_scale is None
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # a static per-tensor range would lose the small rows; per token keeps them
    static = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    static.load_state_dict({k: v for k, v in net.state_dict().items() if "quant" not in k})
    _prepared(static, x, weight_bits=8, activation_bits=8)
    with torch.no_grad():
        floaty = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
        floaty.load_state_dict({k: v for k, v in net.state_dict().items() if "quant" not in k})
        f = floaty(x[:1])
        assert sqnr_db(f, net(x[:1])) > sqnr_db(f, static(x[:1])) + 10


def test_per_token_dynamic_with_4bit_weights_packs_and_quantizes_inputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(5, 32)
    _prepared(net, x, weight_bits=4, activation_bits=8, activation_granularity="per_token", dynamic=True)
    with torch.no_grad():
        ref = net(x)
        layer = convert(net)[0]
        out = layer(x)
    assert isinstance(layer, PackedLinear) and layer.dynamic_input
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_fp8_weights_stored_in_float8_exactly(scheme: str, granularity: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))
    x = torch.randn(4, 32)
    _prepared(net, x, scheme=scheme, activation_bits=None, granularity=granularity)
    with torch.no_grad():
        ref = net(x)
        fq = net[0].weight_quant(net[0].weight)
        int_net = convert(net)
        out = int_net(x)
    layer = int_net[0]
    assert isinstance(layer, Float8Linear)
    assert layer.weight_fp8.dtype == {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[scheme]
    assert layer.weight_scale.numel() == (24 if granularity == "per_channel" else 1)
    assert torch.equal(layer.weight, fq)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert weight_storage_bits(layer) == 8 + 32 * layer.weight_scale.numel() / (24 * 32)


@pytest.mark.parametrize(("fmt", "bits"), [("mxfp8", 8), ("mxfp6", 6), ("mxfp4", 4), ("mxint8", 8)])
def test_mx_weights_packed_with_e8m0_scales_exactly(fmt: str, bits: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(4, 64)
    _prepared(net, x, scheme=fmt, weight_bits=bits, activation_bits=bits, dynamic=True)
    with torch.no_grad():
        ref = net(x)
        fq = net[0].weight_quant(net[0].weight)
        int_net = convert(net)
        out = int_net(x)
    layer = int_net[0]
    assert isinstance(layer, MXLinear) and layer.scales.dtype == torch.uint8 and layer.scales.shape == (32, 2)
    assert layer.qweight.numel() == 32 * 64 * bits // 8  # exactly `bits` per element
    assert torch.equal(layer.weight, fq)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert weight_storage_bits(layer) == bits + 8 / 32
    fmt_desc = layer.quant_format()
    assert fmt_desc["weights"]["scale_dtype"] == "e8m0" and fmt_desc["weights"]["group_size"] == 32
    assert fmt_desc["input_activations"]["dynamic"] is True


def test_sizes_and_format_descriptions_come_from_the_tensors() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    sizes = {}
    for name, cfg in {"g128": dict(weight_bits=4, granularity="per_group", group_size=128),
                      "g32": dict(weight_bits=4, granularity="per_group", group_size=32),
                      "fp8": dict(scheme="fp8_e4m3"), "mxfp4": dict(scheme="mxfp4", weight_bits=4)}.items():
        net = _prepared(nn.Sequential(nn.Linear(256, 256, bias=False)), x, activation_bits=None, **cfg)
        layer = convert(net)[0]
        sizes[name] = (weight_storage_bits(layer), serialized_size(nn.Sequential(layer)))
        desc = layer.quant_format()
        for role, buf in desc["weights"]["tensors"].items():
            assert isinstance(getattr(layer, buf), torch.Tensor), (name, role)
    assert sizes["g128"][0] == 4 + 16 / 128 and sizes["g32"][0] == 4 + 16 / 32
    assert sizes["mxfp4"][0] == 4.25 and sizes["fp8"][0] == 8 + 32 / 256
    assert sizes["g128"][1] < sizes["g32"][1] < sizes["fp8"][1] < 256 * 256 * 4 / 3


def test_bad_layers_are_named() -> None:
    with pytest.raises(ValueError, match="layer '0': `group_size`=32 does not divide its in_features=48"):
        prepare_qat(nn.Sequential(nn.Linear(48, 8)), ["0"], QuantConfig(4, None, granularity="per_group", group_size=32))
    with pytest.raises(ValueError, match="layer '1'.*in_features divisible by 32, got 40"):
        prepare_qat(nn.Sequential(nn.Linear(32, 40), nn.Linear(40, 8)), ["0", "1"], QuantConfig(8, None, scheme="mxfp8"))
    with pytest.raises(ValueError, match="layer '0' is a Conv2d.*Linear layers only"):
        prepare_qat(nn.Sequential(nn.Conv2d(3, 4, 3)), ["0"], QuantConfig(8, None, scheme="fp8_e4m3"))
    net = nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError):
        prepare_qat(net, ["0", "1"], QuantConfig(8, None, scheme="mxfp8"))
    assert type(net[0]) is nn.Linear  # nothing was prepared before the error


def test_the_int8_layers_describe_their_format_too() -> None:
    from lightning_compress.export.low_bit import quant_format

    torch.manual_seed(0)
    x = torch.randn(4, 32)
    dyn = convert(_prepared(nn.Sequential(nn.Linear(32, 16)), x, weight_bits=8, activation_bits=8,
                            activation_granularity="per_token", dynamic=True))[0]
    static = convert(_prepared(nn.Sequential(nn.Linear(32, 16)), x, weight_bits=8, activation_bits=8))[0]
    packed = convert(_prepared(nn.Sequential(nn.Linear(32, 16)), x, weight_bits=4, activation_bits=None))[0]
    assert quant_format(dyn)["input_activations"]["strategy"] == "token" and quant_format(dyn)["input_activations"]["dynamic"]
    assert quant_format(static)["input_activations"] == {"type": "int", "num_bits": 8, "strategy": "tensor",
                                                         "dynamic": False, "symmetric": False, "element": None}
    assert quant_format(packed)["input_activations"] is None and quant_format(packed)["weights"]["num_bits"] == 4
    assert quant_format(packed)["weights"]["strategy"] == "channel"
    with pytest.raises(ValueError, match="no quantization format description for a Linear"):
        quant_format(nn.Linear(2, 2))
    for layer in (dyn, static, packed):
        for name in quant_format(layer)["weights"]["tensors"].values():
            assert isinstance(getattr(layer, name), torch.Tensor)
