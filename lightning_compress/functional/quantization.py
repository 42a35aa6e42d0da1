"""Quantization math as pure tensor functions: integer grids, fake quantization with a straight-through
estimator (STE), LSQ step sizes, and power-of-two (logarithmic) levels.

Two families of levels:

- **uniform** (affine): ``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` with a step ``s`` and an
  integer zero point ``z`` (``z = 0`` when symmetric). Zero is always a level, so pruned zeros stay zero.
- **power of two** (Miyashita et al. 2016): ``x_hat = sign(x) * s * 2**e`` with ``e`` in
  ``{0, -1, ..., -(n-1)}``, ``n = 2**(bits-1) - 1``, plus exact zero; each value goes to the nearest level
  (nearest in value: on the digits MLP at 4 bits it lost 0.1 points where rounding in the log domain lost 0.6).

Gradients: rounding passes gradients straight through; values clipped by the grid get none. The step ``s``
gets the LSQ gradient (Esser et al. 2020) when it requires grad.

Example:
    >>> import torch
    >>> qmin, qmax = int_range(4, symmetric=True)
    >>> (qmin, qmax)
    (-7, 7)
    >>> w = torch.tensor([[-1.0, 0.0, 0.3, 0.7]])
    >>> s, z = uniform_qparams(w, 4, symmetric=True, per_channel=True)
    >>> fake_quantize_uniform(w, s, z, qmin, qmax)
    tensor([[-1.0000,  0.0000,  0.2857,  0.7143]])
    >>> fake_quantize_pow2(w, pow2_scale(w, per_channel=False), bits=3)
    tensor([[-1.0000,  0.0000,  0.2500,  0.5000]])
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "activation_qparams",
    "bn_factor",
    "dequantize_grouped",
    "dequantize_pow2",
    "dequantize_uniform",
    "fake_quantize_grouped",
    "fake_quantize_per_token",
    "fake_quantize_pow2",
    "fake_quantize_uniform",
    "group_qparams",
    "grad_scale",
    "int_range",
    "lsq_init_scale",
    "pow2_levels",
    "per_token_qparams",
    "pow2_scale",
    "quantize_grouped",
    "quantize_pow2",
    "quantize_uniform",
    "range_qparams",
    "round_ste",
    "sqnr_db",
    "uniform_qparams",
]

_EPS = 1e-12


def int_range(bits: int, symmetric: bool, signed: bool = True, full_range: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide grid.

    Symmetric signed grids drop the most negative code (``[-127, 127]`` at 8 bits) so that ``+/-`` are alike,
    unless ``full_range``: then they keep all ``2**bits`` codes (``[-8, 7]`` at 4 bits, as torchao's symmetric
    int4 and compressed-tensors' symmetric ``q_min``; see :func:`range_qparams` for the step). Asymmetric signed
    grids are ``[-2**(bits-1), 2**(bits-1) - 1]``, unsigned grids ``[0, 2**bits - 1]``.

    Example:
        >>> int_range(8, True), int_range(8, False), int_range(8, False, signed=False)
        ((-127, 127), (-128, 127), (0, 255))
        >>> int_range(4, True), int_range(4, True, full_range=True)
        ((-7, 7), (-8, 7))
    """
    if not signed:
        return 0, 2**bits - 1
    if symmetric and not full_range:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``g`` in the backward pass (LSQ)."""
    return (x - x * g).detach() + x * g


def _reduce_dims(x: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    return tuple(range(1, x.dim())) if per_channel and x.dim() > 1 else tuple(range(x.dim()))


def _shape(stat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-channel (dim 0) or per-tensor statistic against ``like``."""
    if stat.numel() == 1:
        return stat.reshape([1] * like.dim()) if like.dim() else stat.reshape(())
    return stat.reshape([-1] + [1] * (like.dim() - 1))


def uniform_qparams(
    x: torch.Tensor, bits: int, symmetric: bool, per_channel: bool, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point from the min/max of ``x`` (per output channel = dim 0, or per tensor).

    Returns float tensors of shape ``(C,)`` or ``(1,)``; the zero point holds integers and is 0 when
    ``symmetric``. The range always contains 0, so 0 is exactly representable. ``full_range``: see
    :func:`range_qparams`.
    """
    dims = _reduce_dims(x, per_channel)
    x = x.detach().float()
    lo, hi = torch.amin(x, dim=dims).reshape(-1), torch.amax(x, dim=dims).reshape(-1)
    return range_qparams(lo, hi, bits, symmetric, full_range)


def range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of :func:`uniform_qparams` from already reduced ranges ``lo``/``hi`` (e.g. over shards).

    A symmetric step is ``max|x| / ((qmax - qmin) / 2)``: ``max / 127`` on the restricted 8-bit grid, and with
    ``full_range`` (codes ``[-8, 7]`` at 4 bits) ``max / 7.5``, the convention of torchao's symmetric intx fake
    quantization and of compressed-tensors; the largest magnitude then lands between the two outermost codes
    and is clamped to ``7 * s`` (positive) or hit as ``-8 * s`` (its half-step rounding error).

    Example:
        >>> range_qparams(torch.tensor([-1.0]), torch.tensor([0.5]), 8, symmetric=True)[0] * 127
        tensor([1.])
        >>> range_qparams(torch.tensor([-1.5]), torch.tensor([0.5]), 4, symmetric=True, full_range=True)[0]
        tensor([0.2000])
    """
    lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
    qmin, qmax = int_range(bits, symmetric, full_range=full_range)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=_EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned affine step and zero point for activations observed in ``[lo, hi]`` (0 always representable).

    Example:
        >>> s, z = activation_qparams(torch.tensor([-1.0]), torch.tensor([3.0]))
        >>> round(s.item() * 255, 4), z.item()
        (4.0, 64.0)
    """
    qmin, qmax = int_range(bits, symmetric=False, signed=False)
    lo = lo.detach().float().clamp(max=0.0)
    hi = hi.detach().float().clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def lsq_init_scale(x: torch.Tensor, bits: int, symmetric: bool, per_channel: bool) -> torch.Tensor:
    """LSQ initial step ``2 * mean(|x|) / sqrt(qmax)`` (Esser et al. 2020), per channel or per tensor.

    ``qmax`` is the largest positive code, ``2**(bits-1) - 1`` for a symmetric grid whether or not it keeps the
    extra negative code (``full_range``), so LSQ starts from the same step on both symmetric grids."""
    _, qmax = int_range(bits, symmetric)
    mean_abs = x.detach().float().abs().mean(dim=_reduce_dims(x, per_channel)).reshape(-1)
    return (2.0 * mean_abs / math.sqrt(qmax)).clamp(min=1e-8)


def fake_quantize_uniform(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float | None = None,
) -> torch.Tensor:
    """Round ``x`` to the uniform grid and back to float, with the STE (and LSQ gradient for ``scale``).

    Args:
        x: values to quantize (weights: channel on dim 0).
        scale: step, shape ``(C,)`` or ``(1,)``.
        zero_point: integer-valued zero point, same shape as ``scale``.
        qmin: lowest integer code.
        qmax: highest integer code.
        grad_factor: LSQ gradient scale for ``scale`` (default ``1 / sqrt(numel_per_channel * qmax)``).
    """
    s, z = _shape(scale, x), _shape(zero_point, x)
    if s.requires_grad:
        per = x.numel() // max(1, scale.numel())
        s = grad_scale(s, grad_factor if grad_factor is not None else 1.0 / math.sqrt(per * qmax))
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def quantize_uniform(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (int32) of ``x`` on the uniform grid: ``clamp(round(x / s) + z, qmin, qmax)``."""
    s, z = _shape(scale, x), _shape(zero_point, x)
    return torch.clamp(torch.round(x.detach() / s.detach()) + z, qmin, qmax).to(torch.int32)


def dequantize_uniform(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Float values of integer ``codes``: ``(q - z) * s`` (the same float ops as :func:`fake_quantize_uniform`)."""
    s, z = _shape(scale, codes), _shape(zero_point, codes)
    return (codes.float() - z) * s


def pow2_levels(bits: int) -> int:
    """Number of non-zero magnitudes of a ``bits``-wide power-of-two grid: ``2**(bits-1) - 1``.

    Example:
        >>> pow2_levels(3), pow2_levels(4)
        (3, 7)
    """
    return 2 ** (bits - 1) - 1


def pow2_scale(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Largest magnitude per channel (or per tensor): the top level ``s`` of the power-of-two grid."""
    dims = _reduce_dims(x, per_channel)
    return torch.amax(x.detach().float().abs(), dim=dims).reshape(-1).clamp(min=_EPS)


def _pow2_exponent(x: torch.Tensor, s: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponent ``e`` in ``[-(n-1), 0]`` of the nearest level of each value, and a mask of values nearest to 0."""
    n = pow2_levels(bits)
    ratio = x.detach().abs() / s
    e = torch.floor(torch.log2(ratio.clamp(min=1e-30)))
    e = torch.where(ratio >= 0.75 * torch.exp2(e + 1), e + 1, e)  # 2**e or 2**(e+1), whichever is nearer
    zero = ratio < 0.5 * 2.0 ** -(n - 1)
    return e.clamp(-(n - 1), 0), zero


def fake_quantize_pow2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` to the nearest of ``{0, +/- s * 2**-k, k = 0..n-1}``, with the clipped STE."""
    s = _shape(scale, x).detach()
    e, zero = _pow2_exponent(x, s, bits)
    xq = torch.where(zero, torch.zeros_like(x), torch.sign(x.detach()) * s * torch.exp2(e))
    inside = (x.detach().abs() <= s).to(x.dtype)
    return xq.detach() + (x - x.detach()) * inside


def quantize_pow2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int32) of power-of-two levels: ``0`` is zero, ``1 + k`` is ``+s*2**-k``, ``1 + n + k`` is ``-s*2**-k``.

    Example:
        >>> quantize_pow2(torch.tensor([0.0, 1.0, 0.5, -0.25, -1.0]), torch.tensor([1.0]), bits=3)
        tensor([0, 1, 2, 6, 4], dtype=torch.int32)
    """
    n = pow2_levels(bits)
    s = _shape(scale, x)
    e, zero = _pow2_exponent(x, s, bits)
    k = (-e).to(torch.int32)
    codes = torch.where(x < 0, 1 + n + k, 1 + k)
    return torch.where(zero, torch.zeros_like(codes), codes)


def dequantize_pow2(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Float values of power-of-two ``codes`` (see :func:`quantize_pow2`): a table look-up times ``s``."""
    n = pow2_levels(bits)
    mags = torch.exp2(-torch.arange(n, dtype=torch.float32))
    table = torch.cat([torch.zeros(1), mags, -mags])
    return table[codes.long()] * _shape(scale, codes)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(C, K)`` -> ``(C * K / g, g)``: one row per group of ``group_size`` consecutive inputs of a channel."""
    if x.dim() != 2 or x.shape[1] % group_size:
        raise ValueError(f"groups of {group_size} need a 2-D tensor whose dim 1 they divide, got shape {tuple(x.shape)}")
    return x.reshape(-1, group_size)


def group_qparams(
    x: torch.Tensor, bits: int, symmetric: bool, group_size: int, lsq: bool = False, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of each group of ``group_size`` inputs of each output channel, shape ``(C, K / g)``.

    The min/max grid of :func:`uniform_qparams` (or LSQ's initial step, ``lsq=True``) taken per group;
    ``full_range``: see :func:`range_qparams`.

    Example:
        >>> w = torch.tensor([[1.0, -2.0, 0.5, 0.25]])
        >>> s, z = group_qparams(w, 4, symmetric=True, group_size=2)
        >>> (s * 7).tolist(), z.tolist()
        ([[2.0, 0.5]], [[0.0, 0.0]])
    """
    rows = _groups(x, group_size)
    scale, zero_point = uniform_qparams(rows, bits, symmetric, per_channel=True, full_range=full_range)
    if lsq:
        scale = lsq_init_scale(rows, bits, symmetric, per_channel=True)
    return scale.reshape(x.shape[0], -1), zero_point.reshape(x.shape[0], -1)


def fake_quantize_grouped(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """:func:`fake_quantize_uniform` with one step (and zero point) per group: ``scale`` is ``(C, K / g)``.

    The LSQ gradient of a learned ``scale`` is scaled by ``1 / sqrt(g * qmax)``, ``g`` values per step.
    """
    g = x.shape[1] // scale.shape[1]
    out = fake_quantize_uniform(_groups(x, g), scale.reshape(-1), zero_point.reshape(-1), qmin, qmax)
    return out.reshape(x.shape)


def quantize_grouped(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (int32, shape of ``x``) of :func:`fake_quantize_grouped`."""
    g = x.shape[1] // scale.shape[1]
    return quantize_uniform(_groups(x, g), scale.reshape(-1), zero_point.reshape(-1), qmin, qmax).reshape(x.shape)


def dequantize_grouped(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Float values of grouped integer ``codes``: ``(q - z) * s`` with the step of each group.

    Example:
        >>> dequantize_grouped(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0.5, 2.0]]), torch.zeros(1, 2))
        tensor([[0.5000, 1.0000, 6.0000, 8.0000]])
    """
    g = codes.shape[1] // scale.shape[1]
    rows = dequantize_uniform(_groups(codes, g), scale.reshape(-1).float(), zero_point.reshape(-1).float())
    return rows.reshape(codes.shape)


def per_token_qparams(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned affine step and zero point of each row of ``x`` (a token: all dims but the last), shape ``(..., 1)``.

    The same numbers as :func:`activation_qparams` applied to each row's min and max.
    """
    x = x.detach()
    return activation_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits)


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token fake quantization: each row of ``x`` on its own unsigned ``bits`` grid (STE, no observer).

    Example:
        >>> x = torch.tensor([[0.0, 1.0, 2.0], [-4.0, 0.0, 4.0]])
        >>> torch.equal(fake_quantize_per_token(x), x)
        False
        >>> (fake_quantize_per_token(x) - x).abs().max().item() < 4.0 / 255
        True
    """
    scale, zero_point = per_token_qparams(x, bits)
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``.

    Example:
        >>> round(sqnr_db(torch.ones(4), torch.full((4,), 0.9)), 1)
        20.0
    """
    noise = (reference.float() - approx.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * math.log10(signal / noise)


def bn_factor(bn: torch.nn.Module) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)`` of a BatchNorm: the per-channel factor folded into the conv before it.

    Example:
        >>> bn = torch.nn.BatchNorm1d(2, eps=0.0).eval()
        >>> _ = bn.running_var.fill_(4.0)
        >>> bn_factor(bn).tolist()
        [0.5, 0.5]
    """
    var = bn.running_var
    gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)
