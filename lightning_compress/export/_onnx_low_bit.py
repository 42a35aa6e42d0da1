"""ONNX export of the low-bit formats (:mod:`~lightning_compress.export.low_bit`) and of int4 / fp8 weight storage.

Readers describe :class:`~lightning_compress.export.low_bit.GroupwiseLinear` and
:class:`~lightning_compress.export.low_bit.Float8Linear` as a
:class:`~lightning_compress.export._readers.QuantizedWeight` (codes, steps, block size, element type);
:class:`~lightning_compress.export.low_bit.MXLinear` has no ONNX encoding onnxruntime runs and raises (see
:func:`read_mx`). ``torch`` has no usable int4 or fp8 tensor for the traced export, so the export form keeps the
codes as exact int8 / float32 values and :func:`retype_initializers` rewrites those initializers of the exported
graph to ONNX ``INT4`` / ``UINT4`` / ``FLOAT8E4M3FN`` / ``FLOAT8E5M2`` (the same values) before the file is saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import torch
from torch import nn

from lightning_compress.export.low_bit import Float8Linear, GroupwiseLinear, MXLinear

if TYPE_CHECKING:
    from lightning_compress.export._readers import QuantizedWeight

#: ONNX element types (name -> numpy dtype of ``ml_dtypes``) written by :func:`retype_initializers`.
ONNX_ELEMENTS: dict[str, Any] = {"INT4": ml_dtypes.int4, "UINT4": ml_dtypes.uint4,
                                 "FLOAT8E4M3FN": ml_dtypes.float8_e4m3fn, "FLOAT8E5M2": ml_dtypes.float8_e5m2}
FP8_ELEMENTS = {"fp8_e4m3": "FLOAT8E4M3FN", "fp8_e5m2": "FLOAT8E5M2"}


def _activations(layer: nn.Module) -> tuple[str, tuple[torch.Tensor, torch.Tensor] | None]:
    if layer.input_quant is None:
        return "none", None
    if layer.input_qparams is not None:
        return "static", (layer.input_qparams[0], layer.input_qparams[1])
    return "dynamic", None


def read_groupwise(layer: GroupwiseLinear) -> QuantizedWeight:
    """Codes ``(out, in)``, steps and zero points ``(out, in / group_size)`` (the stored bf16 steps, exactly)."""
    from lightning_compress.export._readers import QuantizedWeight

    scale = layer.scale.float()
    zp = layer.zero_point.float() if layer.zero_point is not None else torch.zeros_like(scale)
    acts, qparams = _activations(layer)
    bias = None if layer.bias is None else layer.bias.clone()
    return QuantizedWeight("uniform_group", layer.bits, layer.codes(), scale, zp, bias, acts, qparams,
                           block_size=layer.group_size)


def read_float8(layer: Float8Linear) -> QuantizedWeight:
    """fp8 element values ``(out, in)`` as float32 (exact) with their float32 step per channel or tensor."""
    from lightning_compress.export._readers import QuantizedWeight

    scale = layer.weight_scale.float().clone()
    if scale.numel() == 1:
        scale = scale.reshape(())
    acts, qparams = _activations(layer)
    bias = None if layer.bias is None else layer.bias.clone()
    return QuantizedWeight(layer.element, 8, layer.weight_fp8.float(), scale, torch.zeros_like(scale), bias, acts,
                           qparams)


def read_mx(layer: MXLinear) -> QuantizedWeight:
    """MX formats are not exported: onnxruntime 1.32's CPU provider has no ``DequantizeLinear`` for FLOAT4E2M1
    (opset 23; tried: NOT_IMPLEMENTED), FP6 has no ONNX type at all, and writing the dequantized float weight would
    silently make the file 8x larger than the format claims; so this raises (``ValueError``, naming the format)."""
    raise ValueError(f"{layer.fmt} ({layer.bits}-bit elements, E8M0 scale per block of 32) has no ONNX encoding "
                     "that onnxruntime's CPU provider runs (no FLOAT4E2M1 DequantizeLinear kernel, no FP6 type); "
                     "export it with save_pretrained (compressed-tensors) or lcdc, or train with 'per_group' int4")


def storage_for(codes: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype) -> tuple[torch.dtype, str | None]:
    """The torch dtype the export form keeps (int8 / float32 stand-ins for int4 / fp8) and the ONNX element
    type to write, for the table's ``dtype`` (``torch.int4`` becomes ``UINT4`` when the codes are 0..15)."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.float32, "FLOAT8E4M3FN" if dtype == torch.float8_e4m3fn else "FLOAT8E5M2"
    if dtype != torch.int4:
        return dtype, None
    lo, hi = min(int(codes.min()), int(zero_point.min())), max(int(codes.max()), int(zero_point.max()))
    if -8 <= lo and hi <= 7:
        return torch.int8, "INT4"
    if 0 <= lo and hi <= 15:
        return torch.int8, "UINT4"
    return torch.int8, None  # does not fit four bits: stays int8


def _typed(value: Any, kind: str, name: str) -> Any:
    import onnx_ir as ir

    array = value.const_value.numpy()
    typed = array.astype(ONNX_ELEMENTS[kind])
    if not np.array_equal(typed.astype(np.float64), array.astype(np.float64)):
        raise ValueError(f"initializer {value.name!r} does not hold exact {kind} values")
    return ir.Value(name=name, type=ir.TensorType(getattr(ir.DataType, kind)), shape=value.shape,
                    const_value=ir.Tensor(typed, dtype=getattr(ir.DataType, kind), name=name))


def retype_initializers(graph: Any, codes: dict[str, str]) -> None:
    """Retype the initializers ``codes`` (name -> ONNX element type) of an ``onnx_ir`` graph, and the zero points
    of the ``DequantizeLinear`` nodes reading them, values unchanged (a value the type cannot hold raises). Zero
    points get new initializers: the exporter shares equal constants between nodes."""
    for name, kind in codes.items():
        value = graph.initializers.get(name)
        if value is None:
            continue
        uses = list(value.uses())
        if any(u.node.op_type != "DequantizeLinear" or u.idx != 0 for u in uses):
            raise ValueError(f"initializer {name!r} is read by other nodes than DequantizeLinear: cannot retype it")
        new = _typed(value, kind, name)
        graph.initializers.pop(name)
        graph.register_initializer(new)
        for u in uses:
            u.node.replace_input_with(0, new)
            zp = _typed(u.node.inputs[2], kind, f"{name.removesuffix('codes')}zero_point_{kind.lower()}")
            if zp.name not in graph.initializers:
                graph.register_initializer(zp)
            u.node.replace_input_with(2, graph.initializers[zp.name])
    used = {v.name for n in graph for v in n.inputs if v is not None}
    for name in [k for k in graph.initializers if k not in used]:
        graph.initializers.pop(name)  # zero points no node reads any more


READERS = {GroupwiseLinear: read_groupwise, Float8Linear: read_float8, MXLinear: read_mx}
