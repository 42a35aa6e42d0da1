"""The custom ops :func:`~lightning_compress.export.onnx.to_onnx` traces: ``torch.export`` keeps them as single
nodes, and :func:`translation_table` writes each as its ONNX QDQ nodes (opset 21 ``onnxscript``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_compress.functional import quantization as qf


@torch.library.custom_op("lightning_compress::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                      block_size: int) -> torch.Tensor:
    """``(codes - zero_point) * scale``: one step per tensor, per channel on ``axis``, or (``block_size > 0``)
    per block of ``block_size`` consecutive elements along ``axis`` (scale and zero point ``codes.shape`` with
    that axis divided by ``block_size``)."""
    if block_size:
        scale, zero_point = (t.repeat_interleave(block_size, dim=axis) for t in (scale, zero_point))
        return (codes.float() - zero_point.float()) * scale
    shape = [1] * codes.dim()
    if scale.dim():
        shape[axis] = -1
    return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@dequantize_weight.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("lightning_compress::fake_quantize_input", mutates_args=())
def fake_quantize_input(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 quantize-dequantize of ``x`` with one (static) step and zero point."""
    return qf.fake_quantize_uniform(x, scale.reshape(1), zero_point.float().reshape(1), 0, 255)


@fake_quantize_input.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lightning_compress::dynamic_int8_matmul", mutates_args=())
def dynamic_int8_matmul(
    x: torch.Tensor, codes_t: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``x`` quantized to uint8 per tensor at run time (as ``DynamicQuantizeLinear``) times uint8 codes."""
    lo, hi = x.amin().clamp(max=0), x.amax().clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-12)
    z = torch.clamp(torch.round(-lo / s), 0, 255)
    xq = torch.clamp(torch.round(x / s) + z, 0, 255)
    return ((xq - z) @ (codes_t.float() - zero_point.float())) * (s * scale) + bias


@dynamic_int8_matmul.register_fake
def _(x: torch.Tensor, codes_t: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
      bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], codes_t.shape[1]))


@torch.library.custom_op("lightning_compress::dequantize_bias", mutates_args=())
def dequantize_bias(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``codes * step``: an int32 bias on the grid of the integer accumulator (``step`` = input step x weight step
    per output channel), written as ``DequantizeLinear`` so that onnxruntime fuses it into ``QGemm`` (a float
    bias leaves a Linear layer unfused when its output is not quantized again, e.g. a model's last layer)."""
    return codes.float() * step


@dequantize_bias.register_fake
def _(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("lightning_compress::add_bias", mutates_args=())
def add_bias(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y + bias``, written as ONNX ``Sum``: onnxruntime 1.32 fuses ``MatMul`` + ``Add`` into ``Gemm`` before its
    DequantizeLinear + MatMul -> ``MatMulNBits`` fusion, which then leaves the 4-bit weight dequantized on every run
    (measured 27x slower on a 1024-wide MLP); a ``Sum`` keeps the MatMul for ``MatMulNBits``."""
    return y + bias


@add_bias.register_fake
def _(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(y)


def translation_table(opset: int = 21) -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: each custom op above as ONNX nodes of ``opset``."""
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}")

    def dequantize(codes: Any, scale: Any, zero_point: Any, axis: int, block_size: int) -> Any:
        if block_size:
            return op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    def fake_quantize(x: Any, scale: Any, zero_point: Any) -> Any:
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def dynamic_matmul(x: Any, codes_t: Any, zero_point: Any, scale: Any, bias: Any) -> Any:
        xq, xs, xz = op.DynamicQuantizeLinear(x)
        acc = op.Cast(op.MatMulInteger(xq, codes_t, xz, zero_point), to=1)  # 1 = FLOAT
        return op.Add(op.Mul(acc, op.Mul(xs, scale)), bias)

    def bias_dequantize(codes: Any, step: Any) -> Any:
        return op.DequantizeLinear(codes, step, axis=0)

    def bias_sum(y: Any, bias: Any) -> Any:
        return op.Sum(y, bias)

    ops = torch.ops.lightning_compress
    return {ops.dequantize_weight.default: dequantize, ops.fake_quantize_input.default: fake_quantize,
            ops.dynamic_int8_matmul.default: dynamic_matmul, ops.add_bias.default: bias_sum,
            ops.dequantize_bias.default: bias_dequantize}
