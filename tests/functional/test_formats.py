"""fp8 / MX format math against torch's own float8 casts and the OCP MX rules; group-wise and per-token grids."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.functional import formats as ff
from lightning_compress.functional import quantization as qf
from lightning_compress.functional.packing import pack_bits, unpack_bits


def _wide_values(n: int = 20000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, generator=g) * torch.exp2(torch.randint(-24, 14, (n,), generator=g).float())


@pytest.mark.parametrize("element", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_rounding_and_codes_are_bit_exact_to_torch_casts(element: str) -> None:
    mx = ff.ELEMENTS[element].max_value
    x = _wide_values().clamp(-mx, mx)
    ref = x.to(ff.FP8_DTYPES[element])
    mine = ff.round_to_format(x, element)
    assert torch.equal(mine, ref.float())
    assert torch.equal(ff.encode_elements(mine, element), ref.view(torch.uint8))
    # saturation instead of inf/nan
    assert ff.round_to_format(torch.tensor([1e9, -1e9]), element).tolist() == [mx, -mx]


@pytest.mark.parametrize("element", ["fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8"])
def test_every_code_decodes_and_encodes_back(element: str) -> None:
    el = ff.ELEMENTS[element]
    codes = torch.arange(2**el.bits, dtype=torch.int32).to(torch.uint8)
    values = ff.decode_elements(codes, element)
    assert values.max().item() == el.max_value
    assert torch.equal(ff.round_to_format(values, element), values)  # every code is a level
    back = ff.encode_elements(values, element)
    nonneg_zero = values != 0
    assert torch.equal(back[nonneg_zero], codes[nonneg_zero])
    # fp4 e2m1 levels as listed in the OCP MX spec
    if element == "fp4_e2m1":
        assert values[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_mx_shared_scale_follows_the_spec() -> None:
    # block amax 3.0 -> floor(log2 3) = 1; fp4 emax = 2 -> X = 2^-1 -> E8M0 126; elements v / X, saturating at 6
    block = torch.zeros(1, 32)
    block[0, :3] = torch.tensor([3.0, -1.3, 0.2])
    codes, e8m0 = ff.quantize_mx(block, "mxfp4")
    assert e8m0.tolist() == [[126]]
    deq = ff.dequantize_mx(codes, e8m0, "mxfp4")
    assert deq[0, :3].tolist() == [3.0, -1.5, 0.25]
    assert torch.equal(deq, ff.fake_quantize_mx(block, "mxfp4"))
    # an all-zero block gets the smallest scale and stays zero; mxint8 elements are k / 64 in [-2, 2)
    codes, e8m0 = ff.quantize_mx(torch.zeros(2, 32), "mxint8")
    assert e8m0.unique().tolist() == [0] and not codes.any()
    x = _wide_values(64 * 32).reshape(64, 32)
    for fmt in ff.MX_ELEMENT:
        xq = ff.fake_quantize_mx(x, fmt)
        exp = ff.mx_shared_exponent(x, fmt).float()  # (64, 1): one block per row
        scaled = xq / torch.exp2(exp)
        assert scaled.abs().max() <= ff.ELEMENTS[ff.MX_ELEMENT[fmt]].max_value
        assert torch.equal(ff.round_to_format(scaled, ff.MX_ELEMENT[fmt]), scaled)
    assert qf.sqnr_db(x, ff.fake_quantize_mx(x, "mxfp8")) > 25 > qf.sqnr_db(x, ff.fake_quantize_mx(x, "mxfp4")) > 10


@pytest.mark.parametrize("fmt", list(ff.MX_ELEMENT))
def test_mx_rceil_scale_is_the_smallest_at_which_nothing_saturates(fmt: str) -> None:
    el = ff.ELEMENTS[ff.MX_ELEMENT[fmt]]
    x = _wide_values(256 * 32).reshape(256, 32)
    # four blocks whose largest magnitude lies between the element's largest value and the next power of two
    top = 2.0 ** (el.emax + 1)
    target = (el.max_value + torch.tensor([0.05, 0.3, 0.6, 0.95]) * (top - el.max_value)) * 2.0 ** torch.tensor([-3.0, 0.0, 2.0, 5.0])
    x[:4] = x[:4] / x[:4].abs().amax(-1, keepdim=True) * target.unsqueeze(-1)
    exp = ff.mx_shared_exponent(x, fmt, "rceil").float()
    amax = x.abs().amax(-1, keepdim=True)
    assert (amax / torch.exp2(exp) <= el.max_value).all()  # nothing saturates
    assert (amax / torch.exp2(exp - 1) > el.max_value).all()  # half that scale would saturate: the smallest
    floor = ff.mx_shared_exponent(x, fmt).float()
    assert ((exp - floor) >= 0).all() and ((exp - floor) <= 1).all()
    assert ((amax / torch.exp2(floor) > el.max_value) == (exp == floor + 1)).all()  # one up exactly where floor clips
    assert (exp[:4] == floor[:4] + 1).all()
    codes, e8m0 = ff.quantize_mx(x, fmt, "rceil")
    assert torch.equal(e8m0, (exp.to(torch.int32) + 127).to(torch.uint8))
    assert torch.equal(ff.dequantize_mx(codes, e8m0, fmt), ff.fake_quantize_mx(x, fmt, "rceil"))
    with pytest.raises(ValueError, match="`scale_rounding` must be one of \\('floor', 'rceil'\\), got 'round'"):
        ff.mx_shared_exponent(x, fmt, "round")


def test_mx_needs_blocks_of_32() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        ff.fake_quantize_mx(torch.randn(4, 48), "mxfp8")


def test_fp8_fake_quant_per_channel_and_ste() -> None:
    w = torch.randn(8, 16) * torch.arange(1, 9).reshape(-1, 1)
    s = ff.fp8_scale(w, "fp8_e4m3", per_channel=True)
    assert s.shape == (8,)
    w.requires_grad_(True)
    wq = ff.fake_quantize_fp8(w, s, "fp8_e4m3")
    ref = (w.detach() / s.reshape(-1, 1)).to(torch.float8_e4m3fn).float() * s.reshape(-1, 1)
    assert torch.equal(wq.detach(), ref)
    assert qf.sqnr_db(w.detach(), wq.detach()) > 28
    wq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_grid_is_the_channel_grid_of_each_group(symmetric: bool) -> None:
    w = torch.randn(6, 64)
    s, z = qf.group_qparams(w, 4, symmetric, group_size=16)
    assert s.shape == (6, 4)
    ref_s, ref_z = qf.uniform_qparams(w.reshape(24, 16), 4, symmetric, per_channel=True)
    assert torch.equal(s.reshape(-1), ref_s) and torch.equal(z.reshape(-1), ref_z)
    qmin, qmax = qf.int_range(4, symmetric)
    fq = qf.fake_quantize_grouped(w, s, z, qmin, qmax)
    codes = qf.quantize_grouped(w, s, z, qmin, qmax)
    assert codes.min() >= qmin and codes.max() <= qmax
    assert torch.equal(qf.dequantize_grouped(codes, s, z), fq)
    # finer groups, less error than one step per channel
    cs, cz = qf.uniform_qparams(w, 4, symmetric, per_channel=True)
    assert qf.sqnr_db(w, fq) > qf.sqnr_db(w, qf.fake_quantize_uniform(w, cs, cz, qmin, qmax)) + 1.0
    with pytest.raises(ValueError, match="divide"):
        qf.group_qparams(torch.randn(4, 60), 4, symmetric, group_size=16)


def test_grouped_lsq_step_gets_a_gradient_per_group() -> None:
    w = torch.randn(4, 32)
    s = qf.group_qparams(w, 4, True, 8, lsq=True)[0].clone().requires_grad_(True)
    out = qf.fake_quantize_grouped(w, s, torch.zeros_like(s), -7, 7)
    out.pow(2).sum().backward()
    assert s.grad.shape == (4, 4) and bool((s.grad != 0).all())


def test_per_token_grid_is_each_rows_own() -> None:
    x = torch.randn(3, 5, 24) * torch.tensor([0.01, 1.0, 100.0]).reshape(3, 1, 1)
    fq = qf.fake_quantize_per_token(x)
    for row, out in zip(x.reshape(-1, 24), fq.reshape(-1, 24), strict=True):
        s, z = qf.activation_qparams(row.amin().reshape(1), row.amax().reshape(1))
        assert torch.equal(out, qf.fake_quantize_uniform(row, s, z, 0, 255))
    assert qf.sqnr_db(x[0], fq[0]) > 40  # the small rows keep their own resolution


def test_pack_bits_is_exact_width() -> None:
    codes = torch.randint(0, 64, (7, 32))
    packed = pack_bits(codes, 6)
    assert packed.numel() == 7 * 32 * 6 // 8
    assert torch.equal(unpack_bits(packed, 6, codes.shape).long(), codes)
