"""Converted integer models compute what the fake-quantized models computed, from really integer storage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.export.quantization import (
    Int8Conv2d,
    Int8Linear,
    PackedConv,
    PackedLinear,
    convert,
    int8_matmul,
    serialized_size,
)
from lightning_compress.functional.quantization import sqnr_db
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags


def _prepared(net: nn.Module, names: list[str], x: torch.Tensor, **cfg) -> nn.Module:
    prepare_qat(net, names, QuantConfig(**cfg))
    set_qat_flags(net, fake_quant=True, observe=True)
    net.train()
    for _ in range(3):
        net(x)  # observe input ranges
    return net.eval()


def test_int8_matmul_exact_at_the_extremes() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (33, 515), generator=g, dtype=torch.int64).to(torch.int8)
    b = torch.randint(-128, 128, (515, 17), generator=g, dtype=torch.int64).to(torch.int8)
    a[0], b[:, 0] = -128, -128
    assert torch.equal(int8_matmul(a, b), a.to(torch.int64).matmul(b.to(torch.int64)).to(torch.int32))
    assert int8_matmul(a, b)[0, 0].item() == 515 * 128 * 128


def test_float_kernel_is_exact_past_the_float32_integer_limit() -> None:
    # the kernel of CPUs without int8 dot-product instructions: 2,100 products of 127 * 127 sum to an odd integer
    # past 2**24, which no float32 holds; chunking keeps every partial sum exact
    from lightning_compress.export._int8_kernel import _float_int8_matmul

    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (9, 2100), generator=g, dtype=torch.int64).to(torch.int8)
    b = torch.randint(-128, 128, (2100, 7), generator=g, dtype=torch.int64).to(torch.int8)
    a[0], b[:, 0] = 127, 127
    a[1], b[:, 1] = -128, -128
    exact = a.to(torch.int64).matmul(b.to(torch.int64))
    assert exact[0, 0].item() == 2100 * 127 * 127 > 2**24 and exact[1, 1].item() == 2100 * 128 * 128
    assert torch.equal(_float_int8_matmul(a, b).to(torch.int64), exact)
    assert (a.float() @ b.float())[0, 0].item() != exact[0, 0].item()  # what one float32 GEMM would give


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_int8_linear_matches_fake_quant(symmetric: bool, granularity: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 5))
    with torch.no_grad():
        net[0].weight.add_(0.1)  # an off-centre range, so that the affine grid has a zero point
    x = torch.randn(32, 24)
    _prepared(net, ["0", "2"], x, weight_bits=8, activation_bits=8, symmetric=symmetric, granularity=granularity)
    with torch.no_grad():
        ref = net(x)
        int_net = convert(net)
        out = int_net(x)
    assert isinstance(int_net[0], Int8Linear) and int_net[0].weight_int8.dtype == torch.int8
    assert (int_net[0].weight_zero_point is None) == symmetric
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # the original is untouched (convert works on a copy)
    assert type(net[0]).__name__ == "QATLinear"
    # a fresh conversion loads the saved state (a saved artefact can be read back)
    other = convert(net)
    other.load_state_dict(int_net.state_dict())
    torch.testing.assert_close(other(x), out)


def test_weight_only_int8_uses_dynamic_inputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(16, 32)
    _prepared(net, ["0", "2"], x, weight_bits=8, activation_bits=None)
    with torch.no_grad():
        ref = net(x)
        dyn = convert(net)
        exact = convert(net, dynamic_activations=False)
    assert isinstance(dyn[0], Int8Linear) and dyn[0].input_scale is None
    assert isinstance(exact[0], PackedLinear)
    torch.testing.assert_close(exact(x), ref, rtol=1e-5, atol=1e-5)
    assert sqnr_db(ref, dyn(x)) > 30


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_int8_conv_matches_fake_quant(stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=stride, padding=padding, dilation=dilation), nn.ReLU())
    x = torch.randn(4, 3, 9, 9)
    _prepared(net, ["0"], x, weight_bits=8, activation_bits=8)
    with torch.no_grad():
        ref = net(x)
        int_net = convert(net)
        out = int_net(x)
    assert isinstance(int_net[0], Int8Conv2d)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("scheme", ["uniform", "power_of_two"])
def test_packed_layers_match_fake_quant(bits: int, scheme: str) -> None:
    torch.manual_seed(bits)
    net = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(4 * 10, 6))
    x = torch.randn(8, 2, 10)
    _prepared(net, ["0", "2"], x, weight_bits=bits, activation_bits=8, scheme=scheme)
    with torch.no_grad():
        ref = net(x)
        int_net = convert(net)
        out = int_net(x)
    assert isinstance(int_net[0], PackedConv) and isinstance(int_net[2], PackedLinear)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # really packed: bytes of codes are 1/4, 1/2 or 1 per weight
    per_byte = {2: 4, 3: 2, 4: 2, 6: 1}[bits]
    assert int_net[2].packed.numel() == -(-net[2].weight.numel() // per_byte)
    levels = len(torch.unique(int_net[2].weight[0]))
    assert levels <= 2**bits


def test_batchnorm_is_folded() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 3, bias=True), nn.BatchNorm2d(4, affine=False), nn.ReLU())
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
    plain = nn.Sequential(*[m for m in net]).eval()
    x = torch.randn(5, 1, 8, 8)
    float_ref = plain(x).detach().clone()
    from lightning_compress.layers.quantization import find_conv_bn_pairs

    pairs = find_conv_bn_pairs(net, ["0", "3"])
    assert pairs == {"0": "1", "3": "4"}
    prepare_qat(net, ["0", "3"], QuantConfig(weight_bits=8, activation_bits=8), pairs)
    set_qat_flags(net, fake_quant=True)
    net.eval()
    with torch.no_grad():
        ref = net(x)
        int_net = convert(net)
        out = int_net(x)
    assert isinstance(int_net[1], nn.Identity) and isinstance(int_net[4], nn.Identity)
    assert isinstance(int_net[0], Int8Conv2d)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert sqnr_db(float_ref, out) > 25  # and it is still the float network, 8-bit close


def test_pruned_zeros_stay_zero_in_the_integer_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    mask = torch.rand(32, 16) < 0.6
    with torch.no_grad():
        net[0].weight[mask] = 0.0
    x = torch.randn(8, 16)
    for scheme, bits, sym in (("uniform", 8, False), ("uniform", 4, True), ("power_of_two", 3, True)):
        copy = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        copy.load_state_dict(net.state_dict())
        _prepared(copy, ["0", "2"], x, weight_bits=bits, scheme=scheme, symmetric=sym)
        w = convert(copy)[0].weight
        assert bool((w[mask] == 0).all()), scheme


def test_serialized_sizes() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    fp32 = serialized_size(net)
    x = torch.randn(4, 256)
    sizes = {}
    for bits in (8, 4, 2):
        q = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
        _prepared(q, ["0", "2"], x, weight_bits=bits)
        sizes[bits] = serialized_size(convert(q))
    assert sizes[8] <= 0.27 * fp32
    assert sizes[4] < 0.6 * sizes[8] and sizes[2] < 0.7 * sizes[4]


def test_convert_errors() -> None:
    with pytest.raises(ValueError, match="has no fake-quantized layer"):
        convert(nn.Sequential(nn.Linear(2, 2)))
    net = nn.Sequential(nn.Linear(2, 2))
    prepare_qat(net, ["0"], QuantConfig())
    with pytest.raises(ValueError, match="layer '0' has no observed input range"):
        convert(net)


def test_int8_conv_takes_an_unbatched_image_as_nn_conv2d_does() -> None:
    # nn.Conv2d accepts (C, H, W); its int8 conversion unpacked four sizes from the shape and failed
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    net = _prepared(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)), ["0"], x, weight_bits=8, activation_bits=8)
    int_net = convert(net)
    assert type(int_net[0]) is Int8Conv2d
    torch.testing.assert_close(int_net(x[0]), int_net(x[:1])[0])
    torch.testing.assert_close(int_net(x[0]), net(x[0]), atol=1e-5, rtol=0)


def test_converting_a_converted_model_says_it_is_converted_already() -> None:
    # it said "prepare it with QuantizationAwareTraining first" about a model the fit had converted
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    converted = convert(_prepared(model, ["0", "2"], torch.randn(4, 8), weight_bits=8, activation_bits=8))
    with pytest.raises(ValueError, match=r"already converted.*'0'.*Int8Linear"):
        convert(converted)
    with pytest.raises(ValueError, match="no fake-quantized layer: prepare it"):
        convert(nn.Sequential(nn.Linear(8, 2)))
