"""One converted layer in the compressed-tensors layout: :data:`CT_FORMATS` (the one table of format choices), the
``QuantizationArgs`` of its weights and inputs, its tensors, and the way back to float weights.

Tensor names, dtypes and shapes are those compressed-tensors 0.20 creates for each format when
``transformers`` loads a compressed checkpoint (read from its compressors; its packers are called, not copied):

- ``int-quantized`` / ``naive-quantized`` / ``float-quantized``: ``weight`` (int8 or ``float8_e4m3fn``, ``(out, in)``),
  ``weight_scale`` float32 ``(out, 1)`` per channel or ``(1,)`` per tensor;
- ``pack-quantized``: ``weight_packed`` (int32, 32 / bits codes per word, along the input dim), ``weight_shape``
  (int64 ``[out, in]``), ``weight_scale`` float32 ``(out, 1)``, ``(1,)`` or ``(out, in / group_size)``;
- ``mxfp4-pack-quantized`` / ``mxfp6-pack-quantized``: ``weight_packed`` (uint8, 2 elements per byte / 4 per 3
  bytes), ``weight_scale`` (uint8 E8M0 exponents, ``(out, in / 32)``); ``mxfp8-quantized``: ``weight``
  (``float8_e4m3fn``) and the same E8M0 ``weight_scale``;
- static 8-bit inputs add ``input_scale`` (float32 ``(1,)``) and ``input_zero_point`` (int8: our uint8 zero point
  minus 128); inputs quantized at run time (per token, or per tensor for fp8) add no tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.export import low_bit
from lightning_compress.export._readers import READERS as _READERS
from lightning_compress.functional import formats as ff
from lightning_compress.functional.packing import unpack_bits


@dataclass(frozen=True)
class CtFormat:
    """One compressed-tensors encoding: its format name, the weight bit widths it takes, whether an asymmetric
    weight grid (a zero point per channel or group) loads back, and the model dtype ``config.json`` must ask for
    (None: the model's own)."""

    format: str
    bits: frozenset[int]
    asymmetric: bool = True
    dtype: str | None = None


_LOW = frozenset(range(2, 8))
_PACKED = CtFormat("pack-quantized", _LOW, asymmetric=False)
_GROUPED = CtFormat("pack-quantized", frozenset(range(2, 9)), asymmetric=False)
_FP8 = CtFormat("float-quantized", frozenset({8}), asymmetric=False)

#: (weights, activations) -> the compressed-tensors encodings to pick from by bit width. ``weights``: "uniform"
#: (a step per tensor or channel), "uniform-group" (a step per ``group_size`` inputs), "fp8_e4m3", or an MX format;
#: ``activations``: "static" (trained input range), "dynamic" (ranges at run time: per token for int8, per token or
#: tensor for fp8) or "none". Packed zero points do not load (transformers 5.25 + compressed-tensors 0.20 create
#: unpacked ones at load: size mismatch), so packed formats are symmetric only. Not in the table (a ``ValueError``):
#: power-of-two levels, fp8 e5m2 and MXINT8 (no compressed-tensors type), MX inputs (compressed-tensors rounds
#: the block maximum before taking its exponent, OCP MX floors it: other scales), conv layers. MX rows ask for a
#: bfloat16 model: compressed-tensors 0.20 decompresses MX weights to bfloat16 (exact: MX values have at most
#: 3 mantissa bits), which a float32 model's ``F.linear`` refuses (measured: dtype error at the first forward).
CT_FORMATS: dict[tuple[str, str], tuple[CtFormat, ...]] = {
    ("uniform", "static"): (CtFormat("int-quantized", frozenset({8})), _PACKED),
    ("uniform", "dynamic"): (CtFormat("int-quantized", frozenset({8})), _PACKED),
    ("uniform", "none"): (CtFormat("naive-quantized", frozenset({8})), _PACKED),
    ("uniform-group", "none"): (_GROUPED,),
    ("uniform-group", "static"): (_GROUPED,),
    ("uniform-group", "dynamic"): (_GROUPED,),
    ("fp8_e4m3", "none"): (_FP8,),
    ("fp8_e4m3", "dynamic"): (_FP8,),
    ("mxfp8", "none"): (CtFormat("mxfp8-quantized", frozenset({8}), False, "bfloat16"),),
    ("mxfp6", "none"): (CtFormat("mxfp6-pack-quantized", frozenset({6}), False, "bfloat16"),),
    ("mxfp4", "none"): (CtFormat("mxfp4-pack-quantized", frozenset({4}), False, "bfloat16"),),
}

_SUPPORTED = ("Linear layers with uniform integer weights (8 bits, or 2-7 bits symmetric per tensor/channel, "
              "or 2-8 bits symmetric per group) and int8 inputs (static or per token at run time), fp8 e4m3 "
              "weights with fp8 inputs at run time, MXFP8/MXFP6/MXFP4 weights without input quantization")


@dataclass
class _Layer:
    """A converted layer described in compressed-tensors terms."""

    weights: str
    bits: int
    symmetric: bool
    activations: str
    args: dict[str, Any]
    inputs: dict[str, Any] | None
    tensors: dict[str, Any]
    conv: bool = False
    what: str = ""


def _int_inputs(activations: str) -> dict[str, Any] | None:
    if activations == "none":
        return None
    return {"num_bits": 8, "type": "int", "symmetric": False, "dynamic": activations == "dynamic",
            "strategy": "token" if activations == "dynamic" else "tensor", "zp_dtype": "torch.int8"}


def _from_reader(layer: nn.Module) -> _Layer:
    q = _READERS[type(layer)](layer)
    activations = "dynamic" if getattr(layer, "dynamic_input", False) else q.activations
    symmetric = not bool((q.zero_point != 0).any())
    strategy = "tensor" if q.scale.numel() == 1 else "channel"
    args = {"num_bits": q.bits, "type": "int", "symmetric": symmetric, "strategy": strategy, "dynamic": False}
    tensors: dict[str, Any] = {"codes": q.codes.to(torch.int8), "scale": q.scale.float().reshape(-1, 1)
                               if strategy == "channel" else q.scale.float().reshape(1), "bias": q.bias}
    if not symmetric:
        tensors["zero_point"] = q.zero_point.to(torch.int8).reshape(tensors["scale"].shape)
    tensors["input"] = q.input_qparams
    return _Layer("uniform" if q.scheme == "uniform" else q.scheme, q.bits, symmetric, activations, args,
                  _int_inputs(activations), tensors, bool(q.conv), f"{q.scheme}, {q.bits} bits")


def _from_low_bit(layer: nn.Module) -> _Layer:
    fmt = layer.quant_format()
    w, iq = fmt["weights"], fmt["input_activations"]
    activations = "none" if iq is None else "dynamic" if iq["dynamic"] else "static"
    tensors: dict[str, Any] = {"bias": layer.bias, "input": None}
    if isinstance(layer, low_bit.GroupwiseLinear):
        kind = "uniform-group"
        args = {"num_bits": layer.bits, "type": "int", "symmetric": layer.zero_point is None, "strategy": "group",
                "group_size": layer.group_size, "dynamic": False}
        tensors.update(codes=layer.codes().to(torch.int8), scale=layer.scale.float())
        if layer.zero_point is not None:
            tensors["zero_point"] = layer.zero_point.clone()
        if layer.input_qparams is not None:
            tensors["input"] = (layer.input_qparams[0], layer.input_qparams[1])
        inputs = _int_inputs(activations)
    elif isinstance(layer, low_bit.Float8Linear):
        kind = layer.element
        per_tensor = layer.weight_scale.numel() == 1
        args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor" if per_tensor else "channel",
                "dynamic": False}
        scale = layer.weight_scale.float()
        tensors.update(values=layer.weight_fp8, scale=scale.reshape(1) if per_tensor else scale.reshape(-1, 1))
        inputs = None if iq is None else {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                          "strategy": iq["strategy"]}
    else:
        kind = layer.fmt
        args = {"num_bits": layer.bits, "type": "float", "symmetric": True, "strategy": "group",
                "group_size": ff.MX_BLOCK,
                "dynamic": False, "scale_dtype": "torch.uint8"}
        if layer.fmt != "mxint8":
            codes = unpack_bits(layer.qweight, layer.bits, (layer.out_features, layer.in_features))
            tensors.update(values=ff.decode_elements(codes, ff.MX_ELEMENT[layer.fmt]), scale=layer.scales.clone())
        inputs = None  # MX inputs are refused (see CT_FORMATS)
    what = f"{kind}, {w['num_bits']} bits"
    return _Layer(kind, w["num_bits"], bool(w["symmetric"]), activations, args, inputs, tensors, False, what)


def describe(layer: nn.Module, name: str) -> tuple[CtFormat, dict[str, Any], _Layer]:
    """The table row, the ``config_groups`` scheme (weights, inputs, format) and the description of ``layer``.

    Raises:
        ValueError: the layer has no compressed-tensors encoding (names it, its scheme and what is supported).
    """
    d = _from_low_bit(layer) if isinstance(layer, low_bit.LOW_BIT_LAYERS) else _from_reader(layer)
    rows = CT_FORMATS.get((d.weights, d.activations), ())
    row = next((r for r in rows if d.bits in r.bits and (d.symmetric or r.asymmetric)), None)
    if row is None or d.conv:
        raise ValueError(
            f"layer {name!r} ({d.what}, {'symmetric' if d.symmetric else 'asymmetric'}, {d.activations} "
            f"activations{', conv' if d.conv else ''}) has no compressed-tensors encoding; supported: {_SUPPORTED} "
            "(use to_onnx or the .lcdc format for the others)"
        )
    args = dict(d.args)
    if not d.symmetric:
        args["zp_dtype"] = "torch.int8"
    scheme = {"weights": args, "input_activations": d.inputs, "output_activations": None, "format": row.format}
    return row, scheme, d


def layer_tensors(row: CtFormat, d: _Layer, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one described layer under ``prefix`` (its module name plus a dot)."""
    t = d.tensors
    out = {prefix + "weight_scale": t["scale"]}
    if row.format == "pack-quantized":
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        out[prefix + "weight_packed"] = pack_to_int32(t["codes"], d.bits)
        out[prefix + "weight_shape"] = torch.tensor(list(t["codes"].shape))
    elif row.format == "mxfp4-pack-quantized":
        from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

        out[prefix + "weight_packed"] = pack_fp4_to_uint8(t["values"])
    elif row.format == "mxfp6-pack-quantized":
        from compressed_tensors.compressors.mxfp6.helpers import pack_fp6_to_uint8

        out[prefix + "weight_packed"] = pack_fp6_to_uint8(t["values"])
    elif "values" in t:
        out[prefix + "weight"] = t["values"].to(torch.float8_e4m3fn)
    else:
        out[prefix + "weight"] = t["codes"]
    if "zero_point" in t:
        out[prefix + "weight_zero_point"] = t["zero_point"]
    if t["bias"] is not None:
        out[prefix + "bias"] = t["bias"].float()
    if t["input"] is not None:
        out[prefix + "input_scale"] = t["input"][0].float().reshape(1)
        out[prefix + "input_zero_point"] = (t["input"][1].reshape(1) - 128).to(torch.int8)
    return out


WEIGHT_KEYS = ("weight_scale", "weight_zero_point", "weight_packed", "weight_shape")


def dequantized(state: Mapping[str, torch.Tensor], prefix: str, scheme: Mapping[str, Any]) -> torch.Tensor:
    """The float32 weight of one layer written by :func:`layer_tensors` (exactly the stored levels)."""
    w, fmt = scheme["weights"], scheme.get("format")
    scale = state[prefix + "weight_scale"]
    if fmt in ("mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized"):
        if fmt == "mxfp8-quantized":
            values = state[prefix + "weight"].float()
        else:
            from compressed_tensors.compressors.mxfp6.helpers import unpack_fp6_from_uint8
            from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

            packed = state[prefix + "weight_packed"]
            fp4 = fmt.startswith("mxfp4")
            unpack, per_byte = (unpack_fp4_from_uint8, 2.0) if fp4 else (unpack_fp6_from_uint8, 4 / 3)
            values = unpack(packed, packed.shape[0], round(packed.shape[1] * per_byte), dtype=torch.float32)
        blocks = values.reshape(values.shape[0], -1, ff.MX_BLOCK) * torch.exp2(scale.float() - 127).unsqueeze(-1)
        return blocks.reshape(values.shape)
    if prefix + "weight_packed" in state:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        shape = torch.Size(state[prefix + "weight_shape"].tolist())
        codes = unpack_from_int32(state[prefix + "weight_packed"], w["num_bits"], shape)
    else:
        codes = state[prefix + "weight"]
    scale = scale.float()
    zp = state.get(prefix + "weight_zero_point")
    zp = torch.zeros_like(scale) if zp is None else zp.float().reshape(scale.shape)
    if w.get("strategy") == "group":
        g = w["group_size"]
        scale, zp = scale.repeat_interleave(g, 1), zp.repeat_interleave(g, 1)
    return (codes.float() - zp) * scale
