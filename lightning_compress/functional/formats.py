"""Floating-point and microscaling (MX) number formats as pure tensor functions: fp8 (e4m3 / e5m2) and the OCP
Microscaling formats MXFP8, MXFP6, MXFP4 and MXINT8.

**Minifloats.** An element format with ``e`` exponent bits, ``m`` mantissa bits and exponent bias ``2**(e-1) - 1``
has the levels ``+/- 2**E * (1 + M / 2**m)`` (normals) and ``+/- 2**emin * M / 2**m`` (subnormals);
:func:`round_to_format` rounds to the nearest level (ties to even, as torch's float8 casts do) and saturates at the
largest finite value (e4m3: 448, e5m2: 57344, e2m3: 7.5, e3m2: 28, e2m1: 6).

**fp8** (:func:`fake_quantize_fp8`): ``x_hat = round_to_format(x / s) * s`` with a float32 scale ``s = amax / max``
per tensor or per output channel, so that the largest magnitude maps to the largest fp8 value.

**MX** (OCP Microscaling Formats spec v1.0): blocks of 32 consecutive values along the last dimension share one
power-of-two scale ``X = 2**(floor(log2(amax)) - emax_elem)`` stored as E8M0 (an 8-bit biased exponent, bias 127;
255 is NaN and never produced), where ``emax_elem`` is the exponent of the element format's largest normal; each
element is ``round_to_format(v / X)``, saturating. That is the spec's scale rule (``scale_rounding="floor"``); it
saturates the block's largest values where ``amax / X`` exceeds the element's largest value (e4m3: ``amax / X`` in
``[256, 512)`` against 448; e2m1: ``[4, 8)`` against 6). ``scale_rounding="rceil"`` takes instead the smallest power
of two at which nothing saturates, ``X = 2**ceil(log2(amax / max_elem))`` (the rule NVIDIA's MXFP8 kernels and
torchao use by default as RCEIL): finer steps are lost where the block maximum is just above a power of two, no
value clips. Any rule gives valid MX data (the E8M0 scale is stored). MXINT8 elements are 8-bit two's complement with an implicit
scale ``2**-6`` (``[-2, 2 - 2**-6]``). ``mxfp6`` uses the E2M3 element (the finer of the two FP6 variants).

Example:
    >>> import torch
    >>> round_to_format(torch.tensor([0.3, 5.2, 100.0]), "fp4_e2m1")
    tensor([0.5000, 6.0000, 6.0000])
    >>> x = torch.arange(64, dtype=torch.float32).reshape(1, 64) / 8
    >>> codes, e8m0 = quantize_mx(x, "mxfp4")
    >>> codes.dtype, e8m0.tolist()
    (torch.uint8, [[126, 127]])
    >>> torch.equal(dequantize_mx(codes, e8m0, "mxfp4"), fake_quantize_mx(x, "mxfp4"))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ELEMENTS",
    "FP8_DTYPES",
    "MX_BLOCK",
    "MX_ELEMENT",
    "MX_SCALE_ROUNDINGS",
    "decode_elements",
    "dequantize_mx",
    "encode_elements",
    "fake_quantize_fp8",
    "fake_quantize_mx",
    "fp8_scale",
    "mx_shared_exponent",
    "quantize_mx",
    "round_to_format",
]

MX_BLOCK = 32
MX_SCALE_ROUNDINGS = ("floor", "rceil")  # the OCP spec's shared-exponent rule, and the one that never saturates


@dataclass(frozen=True)
class Element:
    """An element format: exponent and mantissa bits (``ebits=0``: a fixed-point integer scaled by ``2**-mbits``)."""

    ebits: int
    mbits: int
    max_value: float

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits if self.ebits else 8  # the integer element: 8-bit two's complement

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1 if self.ebits else 0

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (``1 - bias``); the subnormal step is ``2**(emin - mbits)``."""
        return 1 - self.bias if self.ebits else 0

    @property
    def emax(self) -> int:
        """Exponent of the largest normal, ``floor(log2(max_value))``."""
        return math.floor(math.log2(self.max_value))


ELEMENTS: dict[str, Element] = {
    "fp8_e4m3": Element(4, 3, 448.0),
    "fp8_e5m2": Element(5, 2, 57344.0),
    "fp6_e2m3": Element(2, 3, 7.5),
    "fp6_e3m2": Element(3, 2, 28.0),
    "fp4_e2m1": Element(2, 1, 6.0),
    "int8": Element(0, 6, 127 / 64),
}
MX_ELEMENT = {"mxfp8": "fp8_e4m3", "mxfp6": "fp6_e2m3", "mxfp4": "fp4_e2m1", "mxint8": "int8"}
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def round_to_format(x: torch.Tensor, element: str) -> torch.Tensor:
    """Nearest value of the element format (ties to even), saturating at its largest finite magnitude.

    Example:
        >>> round_to_format(torch.tensor([1.0625, 1.1, 500.0, -2.0**-10]), "fp8_e4m3").tolist()
        [1.0, 1.125, 448.0, -0.0]
    """
    el = ELEMENTS[element]
    x = x.float()
    if el.ebits == 0:
        return torch.clamp(torch.round(x * 2**el.mbits), -128, 127) / 2**el.mbits
    exp = torch.floor(torch.log2(x.abs().clamp(min=2.0**el.emin)))
    step = torch.exp2(exp - el.mbits)
    return torch.clamp(torch.round(x / step) * step, -el.max_value, el.max_value)


def _ste(x: torch.Tensor, xq: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``xq`` forward; gradient straight through where ``inside``, zero where the format saturated."""
    return xq.detach() + (x - x.detach()) * inside.to(x.dtype)


def fp8_scale(x: torch.Tensor, element: str, per_channel: bool) -> torch.Tensor:
    """Float32 scale ``amax / max`` per output channel (dim 0) or per tensor, shape ``(C,)`` or ``(1,)``."""
    dims = tuple(range(1, x.dim())) if per_channel and x.dim() > 1 else tuple(range(x.dim()))
    amax = x.detach().float().abs().amax(dim=dims).reshape(-1)
    return (amax / ELEMENTS[element].max_value).clamp(min=1e-12)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor, element: str) -> torch.Tensor:
    """``round_to_format(x / s) * s`` (``scale`` per channel, dim 0, or per tensor), with the clipped STE."""
    s = scale.reshape([-1] + [1] * (x.dim() - 1)) if scale.numel() > 1 else scale.reshape([1] * x.dim())
    y = x.detach() / s
    inside = y.abs() <= ELEMENTS[element].max_value * (1 + 1e-6)  # amax / (amax / max) may round above max
    return _ste(x, (round_to_format(y, element) * s).to(x.dtype), inside)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % MX_BLOCK:
        raise ValueError(f"MX formats quantize blocks of {MX_BLOCK} along the last dim, got shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)


def mx_shared_exponent(x: torch.Tensor, fmt: str, scale_rounding: str = "floor") -> torch.Tensor:
    """Shared exponent of each block of 32 (last dim), in [-127, 127], int32: ``floor(log2(amax)) - emax_elem``
    (``"floor"``, the OCP spec's) or ``ceil(log2(amax / max_elem))`` (``"rceil"``: nothing saturates).

    An all-zero block gets -127 (E8M0 code 0).

    Example:
        >>> block = torch.full((1, 32), 7.0)  # e2m1's largest value is 6
        >>> mx_shared_exponent(block, "mxfp4").item(), mx_shared_exponent(block, "mxfp4", "rceil").item()
        (0, 1)
    """
    amax = _blocks(x).detach().float().abs().amax(-1).clamp(min=2.0**-127)
    el = ELEMENTS[MX_ELEMENT[fmt]]
    if scale_rounding == "floor":
        exp = torch.floor(torch.log2(amax)) - el.emax
    elif scale_rounding == "rceil":
        exp = torch.ceil(torch.log2(amax / el.max_value))
    else:
        raise ValueError(f"`scale_rounding` must be one of {MX_SCALE_ROUNDINGS}, got {scale_rounding!r}")
    return exp.clamp(-127, 127).to(torch.int32)


def _mx_scaled(x: torch.Tensor, fmt: str, scale_rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``x`` divided by their shared scale, and the E8M0 codes (uint8) of the scales."""
    exp = mx_shared_exponent(x, fmt, scale_rounding)
    return _blocks(x.detach().float()) / torch.exp2(exp.float()).unsqueeze(-1), (exp + 127).to(torch.uint8)


def fake_quantize_mx(x: torch.Tensor, fmt: str, scale_rounding: str = "floor") -> torch.Tensor:
    """MX fake quantization (blocks of 32 along the last dim, E8M0 scale by ``scale_rounding``, see
    :func:`mx_shared_exponent`; STE clipped where elements saturate)."""
    scaled, e8m0 = _mx_scaled(x, fmt, scale_rounding)
    el = MX_ELEMENT[fmt]
    xq = round_to_format(scaled, el) * torch.exp2(e8m0.float() - 127).unsqueeze(-1)
    inside = scaled.abs() <= ELEMENTS[el].max_value
    return _ste(x, xq.reshape(x.shape).to(x.dtype), inside.reshape(x.shape))


def encode_elements(v: torch.Tensor, element: str) -> torch.Tensor:
    """Bit patterns (uint8: sign, exponent, mantissa; int8: two's complement) of values already on the grid.

    Example:
        >>> encode_elements(torch.tensor([0.0, 0.5, 1.0, 6.0, -6.0]), "fp4_e2m1").tolist()
        [0, 1, 2, 7, 15]
    """
    el = ELEMENTS[element]
    if el.ebits == 0:
        return torch.round(v * 2**el.mbits).to(torch.int8).view(torch.uint8)
    mag = v.abs()
    sub = mag < 2.0**el.emin
    exp = torch.floor(torch.log2(mag.clamp(min=2.0**el.emin)))
    man = torch.where(sub, mag / 2.0 ** (el.emin - el.mbits), mag / torch.exp2(exp - el.mbits) - 2**el.mbits)
    biased = torch.where(sub, torch.zeros_like(exp), exp + el.bias)
    sign = (v < 0) | ((v == 0) & (torch.signbit(v)))
    code = (sign.to(torch.int32) << (el.ebits + el.mbits)) | (biased.to(torch.int32) << el.mbits) | man.round().to(torch.int32)
    return code.to(torch.uint8)


def decode_elements(codes: torch.Tensor, element: str) -> torch.Tensor:
    """Float32 values of element bit patterns (inverse of :func:`encode_elements`)."""
    el = ELEMENTS[element]
    if el.ebits == 0:
        return codes.view(torch.int8).float() / 2**el.mbits
    c = codes.to(torch.int32)
    man = (c & (2**el.mbits - 1)).float()
    biased = (c >> el.mbits) & (2**el.ebits - 1)
    sign = 1.0 - 2.0 * ((c >> (el.ebits + el.mbits)) & 1).float()
    normal = torch.exp2(biased.float() - el.bias) * (1 + man / 2**el.mbits)
    sub = 2.0 ** (el.emin - el.mbits) * man
    return sign * torch.where(biased == 0, sub, normal)


def quantize_mx(x: torch.Tensor, fmt: str, scale_rounding: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """Element codes (uint8, shape of ``x``, ``bits`` wide) and E8M0 scales (uint8, one per block of 32), the
    scales by ``scale_rounding`` (see :func:`mx_shared_exponent`)."""
    scaled, e8m0 = _mx_scaled(x, fmt, scale_rounding)
    el = MX_ELEMENT[fmt]
    return encode_elements(round_to_format(scaled, el), el).reshape(x.shape), e8m0


def dequantize_mx(codes: torch.Tensor, e8m0: torch.Tensor, fmt: str) -> torch.Tensor:
    """Float32 values of MX codes and their E8M0 scales (see :func:`quantize_mx`)."""
    values = _blocks(decode_elements(codes, MX_ELEMENT[fmt])) * torch.exp2(e8m0.float() - 127).unsqueeze(-1)
    return values.reshape(codes.shape)
