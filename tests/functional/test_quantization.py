"""Quantization math checked against torch's reference ops and against its own definitions."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_compress.functional import quantization as qf
from lightning_compress.functional.packing import container_bits, pack_codes, packed_bytes, unpack_codes
from lightning_compress.layers.quantization import QuantConfig


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_uniform_matches_torch_reference(bits: int, symmetric: bool, per_channel: bool) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 10, generator=g) + (0.5 if not symmetric else 0.0)
    scale, zp = qf.uniform_qparams(w, bits, symmetric, per_channel)
    qmin, qmax = qf.int_range(bits, symmetric)
    ours = qf.fake_quantize_uniform(w, scale, zp, qmin, qmax)
    if per_channel:
        ref = torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qmin, qmax)
    else:
        ref = torch.fake_quantize_per_tensor_affine(w, scale.item(), int(zp.item()), qmin, qmax)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # the grid spans the data: every value is within half a step of its quantized value
    step = scale.reshape(-1, 1) if per_channel else scale
    assert bool(((ours - w).abs() <= step / 2 + 1e-6).all())
    codes = qf.quantize_uniform(w, scale, zp, qmin, qmax)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    assert len(torch.unique(codes)) <= 2**bits
    torch.testing.assert_close(qf.dequantize_uniform(codes, scale, zp), ours, rtol=0, atol=0)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", ["sym", "asym", "pow2"])
def test_zeros_stay_exactly_zero(bits: int, kind: str) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(8, 32, generator=g) + 0.3
    w[torch.rand(8, 32, generator=g) < 0.5] = 0.0
    if kind == "pow2":
        out = qf.fake_quantize_pow2(w, qf.pow2_scale(w, True), bits)
    else:
        sym = kind == "sym"
        scale, zp = qf.uniform_qparams(w, bits, sym, True)
        out = qf.fake_quantize_uniform(w, scale, zp, *qf.int_range(bits, sym))
    assert bool((out[w == 0] == 0).all())


def test_ste_and_lsq_gradients() -> None:
    x = torch.tensor([-3.0, -0.26, 0.0, 0.74, 2.0], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    z = torch.zeros(1)
    qmin, qmax = qf.int_range(3, True)  # [-3, 3] -> representable [-1.5, 1.5]
    out = qf.fake_quantize_uniform(x, s, z, qmin, qmax, grad_factor=1.0)
    out.sum().backward()
    # straight through inside the range, zero where clipped
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ: d/ds = round(x/s) - x/s inside, qmin/qmax outside
    v = x.detach() / 0.5
    expected = torch.where(v < qmin, torch.tensor(float(qmin)), torch.where(v > qmax, torch.tensor(float(qmax)), v.round() - v))
    assert s.grad.item() == pytest.approx(expected.sum().item(), abs=1e-6)


def test_lsq_gradient_scale_and_init() -> None:
    w = torch.randn(4, 16)
    s1 = qf.lsq_init_scale(w, 4, True, per_channel=True).requires_grad_()
    qf.fake_quantize_uniform(w, s1, torch.zeros(4), -7, 7).sum().backward()
    s2 = s1.detach().clone().requires_grad_()
    qf.fake_quantize_uniform(w, s2, torch.zeros(4), -7, 7, grad_factor=1.0).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad / math.sqrt(16 * 7))
    torch.testing.assert_close(s1.detach(), 2 * w.abs().mean(1) / math.sqrt(7))


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_power_of_two_levels_and_codes(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 40, generator=g)
    w[0, :3] = 0.0
    scale = qf.pow2_scale(w, per_channel=True)
    out = qf.fake_quantize_pow2(w, scale, bits)
    n = qf.pow2_levels(bits)
    rel = (out / scale.reshape(-1, 1)).abs()
    allowed = torch.cat([torch.zeros(1), torch.exp2(-torch.arange(n, dtype=torch.float32))])
    assert bool(torch.isin(rel, allowed).all())
    assert bool((torch.sign(out) * torch.sign(w) >= 0).all())
    # the chosen level is the nearest one (brute force over all levels as the reference)
    levels = torch.cat([allowed, -allowed[1:]])
    ratio = w / scale.reshape(-1, 1)
    nearest = levels[(ratio.unsqueeze(-1) - levels).abs().argmin(-1)]
    torch.testing.assert_close(out / scale.reshape(-1, 1), nearest, rtol=0, atol=1e-7)
    codes = qf.quantize_pow2(w, scale, bits)
    assert int(codes.max()) < 2**bits
    torch.testing.assert_close(qf.dequantize_pow2(codes, scale, bits), out, rtol=0, atol=0)
    # gradient flows straight through for values inside the top level
    x = w.clone().requires_grad_()
    qf.fake_quantize_pow2(x, scale, bits).sum().backward()
    assert bool((x.grad == 1).all())


def test_more_bits_less_noise() -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    sqnr = {}
    for bits in (2, 4, 8):
        scale, zp = qf.uniform_qparams(w, bits, True, True)
        sqnr[bits] = qf.sqnr_db(w, qf.fake_quantize_uniform(w, scale, zp, *qf.int_range(bits, True)))
    assert sqnr[2] < sqnr[4] < sqnr[8]
    assert sqnr[8] > 35  # about 6 dB per bit


def test_activation_qparams_keep_zero_exact() -> None:
    s, z = qf.activation_qparams(torch.tensor([-0.37]), torch.tensor([5.1]))
    assert z.item() == round(z.item())
    out = qf.fake_quantize_uniform(torch.tensor([0.0, -0.37, 5.1]), s, z, 0, 255)
    assert out[0].item() == 0.0
    assert out[1].item() == pytest.approx(-0.37, abs=s.item())


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 64, 333])
def test_pack_round_trip(bits: int, numel: int) -> None:
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(numel))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(numel, bits)
    assert packed.numel() == math.ceil(numel * container_bits(bits) / 8)
    assert torch.equal(unpack_codes(packed, bits, (numel,)), codes)


def test_pack_rejects_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"codes must be in \[0, 3\]"):
        pack_codes(torch.tensor([0, 4]), bits=2)
    with pytest.raises(ValueError, match="`bits` must be in"):
        container_bits(9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weight_bits=1), "`weight_bits` must be an integer in"),
        (dict(weight_bits=True), "`weight_bits` must be an integer in"),
        (dict(activation_bits=4), "`activation_bits` must be 8"),
        (dict(scheme="power_of_two", activation_bits=4), "power-of-two levels are for weights only"),
        (dict(scheme="log"), "`scheme` must be one of"),
        (dict(granularity="per_row"), "`granularity` must be one of"),
        (dict(scheme="power_of_two", symmetric=False), "symmetric around 0"),
        (dict(scheme="power_of_two", learn_scale=True), "not available with `scheme`='power_of_two'"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)
    with pytest.raises(TypeError, match="`symmetric` must be a bool"):
        QuantConfig(symmetric="yes")  # type: ignore[arg-type]


def test_symmetric_grids_restricted_and_full_range() -> None:
    assert qf.int_range(4, True) == (-7, 7) and qf.int_range(4, True, full_range=True) == (-8, 7)
    assert qf.int_range(2, True, full_range=True) == (-2, 1) and qf.int_range(8, True) == (-127, 127)
    # asymmetric and unsigned grids already use every code: full_range changes nothing there
    assert qf.int_range(4, False, full_range=True) == qf.int_range(4, False) == (-8, 7)
    assert qf.int_range(4, False, signed=False, full_range=True) == (0, 15)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_full_range_step_is_max_over_half_the_code_span(bits: int) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    amax = w.abs().amax(1)
    half = 2 ** (bits - 1) - 0.5  # (qmax - qmin) / 2: 7.5 at 4 bits, as torchao / compressed-tensors
    full, zp = qf.uniform_qparams(w, bits, True, per_channel=True, full_range=True)
    restricted, _ = qf.uniform_qparams(w, bits, True, per_channel=True)
    assert torch.equal(full, amax / half) and torch.equal(restricted, amax / (2 ** (bits - 1) - 1))
    assert torch.equal(zp, torch.zeros_like(zp))
    qmin, qmax = qf.int_range(bits, True, full_range=True)
    codes = qf.quantize_uniform(w, full, zp, qmin, qmax)
    assert int(codes.min()) == qmin and int(codes.max()) == qmax
    # every value is within half a step of its level (the positive maximum is clamped by exactly half a step)
    err = (qf.fake_quantize_uniform(w, full, zp, qmin, qmax) - w).abs()
    assert bool((err <= full.reshape(-1, 1) * (0.5 + 1e-5)).all())
    # one more level in the same span: less squared error than the restricted grid on Gaussian weights
    r_err = qf.fake_quantize_uniform(w, restricted, zp, *qf.int_range(bits, True)) - w
    assert float(err.pow(2).sum()) < float(r_err.pow(2).sum())


def test_full_range_groups_and_8_bit_unchanged() -> None:
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    s, z = qf.group_qparams(w, 4, True, 32, full_range=True)
    assert torch.equal(s, w.reshape(8, 4, 32).abs().amax(-1) / 7.5)
    codes = qf.quantize_grouped(w, s, z, -8, 7)
    assert int(codes.min()) == -8 and int(codes.max()) == 7
    assert torch.equal(qf.dequantize_grouped(codes, s, z), qf.fake_quantize_grouped(w, s, z, -8, 7))
    # the 8-bit symmetric step is bit-for-bit the restricted max / 127 it always was
    s8, _ = qf.uniform_qparams(w, 8, True, per_channel=True)
    assert torch.equal(s8, w.abs().amax(1) / 127)
    # LSQ's first step uses qmax = 2^(b-1) - 1 on both symmetric grids
    assert torch.equal(qf.group_qparams(w, 4, True, 32, lsq=True, full_range=True)[0],
                       qf.group_qparams(w, 4, True, 32, lsq=True)[0])
