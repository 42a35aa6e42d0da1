"""Converted quantized layers described for export: :class:`QuantizedWeight` (integer codes, steps, zero points,
bias, input quantization) and ``READERS`` (layer type -> the function that describes it), shared by
:func:`~lightning_compress.export.onnx.to_onnx` and :func:`~lightning_compress.export.safetensors.save_pretrained`.
A new converted layer type gets a reader here (low-bit ones in ``export/_onnx_low_bit.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.export import _onnx_low_bit as lowbit
from lightning_compress.export.quantization import Int8Conv2d, Int8Linear, PackedConv, PackedLinear
from lightning_compress.functional import quantization as qf
from lightning_compress.functional.packing import unpack_codes

__all__ = ["READERS", "QuantizedWeight"]




@dataclass
class QuantizedWeight:
    """A converted layer described for export: integer ``codes`` (out, in, *k), step and zero point per channel
    (or one), bias, the input's (scale, zero point) or None, and how the input is quantized."""

    scheme: str
    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bias: torch.Tensor | None
    activations: str
    input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None
    conv: dict[str, Any] = field(default_factory=dict)
    block_size: int = 0  # > 0: one step per block of inputs (scale (out, in / block_size))


def _conv_args(layer: nn.Module) -> dict[str, Any]:
    args = {"stride": tuple(layer.stride), "padding": tuple(layer.padding), "dilation": tuple(layer.dilation)}
    args["groups"] = getattr(layer, "groups", 1)
    args["pad"] = None if getattr(layer, "padding_mode", "zeros") == "zeros" else (
        layer.reversed_padding, layer.padding_mode)
    return args


def _read_int8(layer: nn.Module) -> QuantizedWeight:
    codes = layer.weight_int8.to(torch.int32)
    if isinstance(layer, Int8Conv2d):
        codes = codes.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)
    zp = layer.weight_zero_point
    static = layer.input_scale is not None
    return QuantizedWeight(
        "uniform", 8, codes, layer.weight_scale.clone(), torch.zeros_like(layer.weight_scale) if zp is None else zp.float(),
        None if layer.bias is None else layer.bias.clone(), "static" if static else "dynamic",
        (layer.input_scale, layer.input_zero_point) if static else None,
        _conv_args(layer) if isinstance(layer, Int8Conv2d) else {},
    )


def _read_packed(layer: nn.Module) -> QuantizedWeight:
    codes = unpack_codes(layer.packed, layer.bits, layer.weight_shape)
    if layer.kind == "power_of_two":
        # levels +/- s 2^-k (k < n) are the integers 2^(n-1-k) times the step s 2^-(n-1), exactly
        top = 2.0 ** (qf.pow2_levels(layer.bits) - 1)
        unit = torch.ones(codes.shape[0])
        codes = torch.round(qf.dequantize_pow2(codes, unit, layer.bits) * top).to(torch.int64)
        scale, zp = layer.weight_scale / top, torch.zeros_like(layer.weight_scale)
    else:
        codes = codes.to(torch.int32) + layer.qmin
        scale = layer.weight_scale.clone()
        zp = layer.zero_point.float() if layer.zero_point is not None else torch.zeros_like(scale)
    static = layer.input_scale is not None
    return QuantizedWeight(
        layer.kind, layer.bits, codes, scale, zp, None if layer.bias is None else layer.bias.clone(),
        "static" if static else "dynamic" if getattr(layer, "dynamic_input", False) else "none", (layer.input_scale, layer.input_zero_point) if static else None,
        _conv_args(layer) if isinstance(layer, PackedConv) else {},
    )


READERS: dict[type, Callable[[nn.Module], QuantizedWeight]] = {
    Int8Linear: _read_int8, Int8Conv2d: _read_int8, PackedLinear: _read_packed, PackedConv: _read_packed, **lowbit.READERS,
}
