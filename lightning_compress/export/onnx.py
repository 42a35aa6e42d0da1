"""ONNX export for onnxruntime: float models as a plain graph, quantized ones as QDQ with integer weights.

:func:`to_onnx` exports any model our callbacks produce. A float model (dense, pruned, thinned, low-rank, one
width of a slimmable network) is exported as it is by ``torch.onnx.export(dynamo=True)``. A quantized model,
prepared (fake-quantized, straight from ``QuantizationAwareTraining``) or converted (:func:`convert_quantized`), is
first brought to its integer layers; each one is then written in the ONNX encoding :data:`ONNX_FORMATS` gives for
its scheme and its activations (the one table of format choices):

=====================  ===========  ========  ==========================================================================
scheme                 activations  weight    ONNX pattern (and what onnxruntime's CPU provider runs)
=====================  ===========  ========  ==========================================================================
uniform, 2-8 bits      static       (u)int4/  QuantizeLinear/DequantizeLinear on the input with its trained scale and
                                   (u)int8    zero point, DequantizeLinear on the weight (``axis`` per channel)
                                              -> MatMul/Conv (5-8 bits: fused to QGemm / QLinearConv, integer
                                              kernels; a Linear on 2-D inputs writes its bias as int32 on the
                                              accumulator's step + a float remainder, see ``_QDQLayer``)
uniform, 8 bits        dynamic      uint8     DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add (fused to
                                              DynamicQuantizeMatMul); Linear only
uniform, 2-8 bits      none         (u)int4/  DequantizeLinear on the weight -> float op (weight-only: smaller file;
                                   (u)int8    Linear: fused to MatMulNBits, see below)
uniform_group, 2-8     none/static  (u)int4/  blocked DequantizeLinear (opset 21 ``block_size`` = the group, ``axis`` 0
bits (GroupwiseLinear)             (u)int8    of the (in, out) weight, float32 steps (in / g, out)) -> MatMul (fused
                                              to MatMulNBits); Linear only
fp8_e4m3 / fp8_e5m2    none/static  float8    DequantizeLinear of a FLOAT8E4M3FN / FLOAT8E5M2 weight (opset >= 19) with
(Float8Linear)                                its float32 step per channel or tensor -> MatMul (not fused: float)
power of two, 2-4 bits static/none  int8      levels ``+/- s 2^-k`` stored exactly as integers ``2^(n-1-k)`` with
                                              step ``s 2^-(n-1)``
power of two, 5-6 bits static/none  int32     the same, the integers need more than 8 bits
=====================  ===========  ========  ==========================================================================

Weights of 2-4 bits are exported exactly at their trained levels as ONNX INT4 (UINT4 where the codes are 0..15)
at opset >= 21 (int8 below), 5-7 bits as int8, 8 bits as the same values moved to uint8 (see ``weight_dtype`` in
:func:`to_onnx`). MX formats (:class:`~lightning_compress.export.low_bit.MXLinear`) raise a ``ValueError`` naming
the layer before anything is written: onnxruntime 1.32's CPU provider has no FLOAT4E2M1 ``DequantizeLinear``, FP6
has no ONNX type, and a dequantized float weight would not be the format's size (use ``save_pretrained``).
Layers whose inputs are quantized at run time with sub-8-bit or grouped weights raise as well. A prepared model
is exported as the fake-quantized model computes (weight-only layers keep float inputs; group-wise steps as the
converted layer stores them, in bf16); a converted model as it computes, except that its per-row dynamic input
quantization becomes onnxruntime's per-tensor ``DynamicQuantizeLinear``.

Tolerances (tested in ``tests/export/test_onnx.py``, largest absolute difference over the largest absolute
output): a float model's onnxruntime outputs match PyTorch within ``1e-4``; a quantized model's within
``ONNX_QUANT_RTOL`` (5 %), because onnxruntime's fused kernels requantize with their own rounding (a value at a
rounding boundary moves one step, which propagates through the following layers) and its weight-only kernel
(``MatMulNBits``, which onnxruntime fuses from DequantizeLinear + MatMul) quantizes its inputs to int8 per block by
default (session ``accuracy_level`` 4: 0.5-1 % per layer measured). With the session config entry
:data:`EXACT_NBITS_CONFIG` it computes in float32 (weight-only Linear layers add their bias with ``Sum``, not
``Add``: onnxruntime's MatMul + Add -> Gemm fusion would otherwise run first and dequantize the weight every run) and matches the dequantized weights within ``1e-5`` (tested; the
fp8 layers are not fused and match within ``1e-5`` by default); ``weight_dtype="int8"`` on a CPU without
VNNI may saturate (see :func:`to_onnx`), which this tolerance does not cover. A converted
model's dynamic layers (per-row input steps in PyTorch, per-tensor in ONNX) are held to the same 5 %.

New schemes are added as rows of :data:`ONNX_FORMATS` plus a reader in ``export/_readers.py`` that describes their
converted layer as a :class:`QuantizedWeight` (low-bit ones in ``export/_onnx_low_bit.py``).

Example:
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "net.onnx")
    >>> to_onnx(net, path, torch.randn(3, 4)) == path and os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.export import _onnx_low_bit as lowbit
from lightning_compress.export._common import copy_model, resolve_example
from lightning_compress.export._onnx_embedding import embedding_tables, quantize_gathers
from lightning_compress.export._onnx_graph import drop_records, float_bias_where_requantized
from lightning_compress.export._onnx_ops import (
    add_bias,
    dequantize_bias,
    dequantize_weight,
    dynamic_int8_matmul,
    fake_quantize_input,
    translation_table,
)
from lightning_compress.export._readers import READERS, QuantizedWeight
from lightning_compress.export.quantization import convert
from lightning_compress.layers.quantization import is_qat_module

__all__ = ["DEFAULT_OPSET", "EXACT_NBITS_CONFIG", "ONNX_FORMATS", "ONNX_QUANT_RTOL", "OnnxFormat", "QuantizedWeight",
           "to_onnx"]

DEFAULT_OPSET = 21
ONNX_QUANT_RTOL = 0.05
#: onnxruntime session config entries (``SessionOptions.add_session_config_entry``) for float32 ``MatMulNBits``
EXACT_NBITS_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


@dataclass(frozen=True)
class OnnxFormat:
    """How one kind of quantized layer is written: weight storage per bit width, layers it applies to, the pattern."""

    storage: Mapping[int, torch.dtype]
    layers: frozenset[str]
    pattern: str


_ALL, _LINEAR = frozenset({"linear", "conv"}), frozenset({"linear"})
# 8-bit codes are stored as uint8 (the same values and zero point moved by 128): see `weight_dtype` in to_onnx;
# torch.int4 stands for ONNX INT4, or UINT4 where the codes are 0..15 (opset >= 21, else int8)
_INT8 = {**{b: torch.int4 for b in range(2, 5)}, **{b: torch.int8 for b in range(5, 8)}, 8: torch.uint8}
# weight storage onnxruntime runs on its integer kernels (QGemm / QLinearConv) with static inputs
_FUSED_INT8 = (torch.int8, torch.uint8)
_FP8 = {"fp8_e4m3": {8: torch.float8_e4m3fn}, "fp8_e5m2": {8: torch.float8_e5m2}}

#: (scheme, activations) -> encoding. ``activations`` is "static" (trained scale), "dynamic" (run time) or "none".
ONNX_FORMATS: dict[tuple[str, str], OnnxFormat] = {
    ("uniform", "static"): OnnxFormat(_INT8, _ALL, "QDQ input (static) + DQ int8 weight (+ DQ int32 bias) -> QGemm / QLinearConv"),
    ("uniform", "dynamic"): OnnxFormat({8: torch.uint8}, frozenset({"linear"}),
                                       "DynamicQuantizeLinear -> MatMulInteger -> Mul (DynamicQuantizeMatMul)"),
    ("uniform", "none"): OnnxFormat(_INT8, _ALL, "DQ int8 weight -> float op (weight-only)"),
    ("power_of_two", "static"): OnnxFormat({2: torch.int8, 3: torch.int8, 4: torch.int8, 5: torch.int32, 6: torch.int32},
                                           _ALL, "QDQ input (static) + DQ exact power-of-two integers"),
    ("power_of_two", "none"): OnnxFormat({2: torch.int8, 3: torch.int8, 4: torch.int8, 5: torch.int32, 6: torch.int32},
                                         _ALL, "DQ exact power-of-two integers -> float op"),
    ("uniform_group", "none"): OnnxFormat(_INT8, _LINEAR, "blocked DQ int4/uint4 weight (block_size) -> MatMul (MatMulNBits)"),
    ("uniform_group", "static"): OnnxFormat(_INT8, _LINEAR, "QDQ input (static) + blocked DQ int4 weight -> MatMul"),
    **{(e, a): OnnxFormat(_FP8[e], _LINEAR, f"DQ {e} weight -> MatMul") for e in _FP8 for a in ("none", "static")},
}


class _QDQLayer(nn.Module):
    """The export form of one quantized layer: integer codes + steps as buffers, forward through the custom ops."""

    def __init__(self, q: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.activations, self.conv, self.block_size = q.activations, q.conv, q.block_size
        linear = not q.conv
        codes = q.codes.t() if linear else q.codes  # linear: (in, out) for MatMul, channel on axis 1
        self.axis = 0 if q.block_size else 1 if linear else 0  # blocks: along the inputs (axis 0 of (in, out))
        per_tensor = q.scale.numel() == 1
        shift = 128 if dtype == torch.uint8 else 0  # int8 codes stored as uint8: the same values, zero point + 128
        scale, zp = (q.scale.t(), q.zero_point.t()) if q.block_size else (q.scale, q.zero_point)
        zp = zp.reshape(()) if per_tensor else zp
        dtype, self.onnx_type = lowbit.storage_for(codes, zp, dtype)  # int4 / fp8: exact stand-ins, retyped later
        self.register_buffer("codes", (codes + shift).to(dtype).contiguous())
        self.register_buffer("scale", scale.float().reshape(()) if per_tensor else scale.float().contiguous())
        self.register_buffer("zero_point", (zp + shift).to(dtype).contiguous())
        self.register_buffer("bias", None if q.bias is None else q.bias.float().clone())
        if q.input_qparams is not None:
            self.register_buffer("input_scale", q.input_qparams[0].float().reshape(()).clone())
            self.register_buffer("input_zero_point", q.input_qparams[1].reshape(()).to(torch.uint8).clone())
        for name in ("bias_int32", "bias_step", "bias_rest"):  # set by _bias_on_accumulator_grid where it splits
            self.register_buffer(name, None)
        if (self.bias is not None and q.input_qparams is not None and linear and not q.block_size
                and dtype in _FUSED_INT8 and self.onnx_type is None):
            self._bias_on_accumulator_grid(q.scale.float().reshape(-1))

    def _bias_on_accumulator_grid(self, weight_step: torch.Tensor) -> None:
        """The bias split into int32 codes of the integer accumulator's step (input step x weight step per
        channel) and a float remainder, for Linear layers with 2-D inputs: onnxruntime fuses MatMul + Add into
        Gemm, and Gemm into its integer QGemm only with an int32 bias; where the layer's output is not quantized
        again (a model's last layer) a float bias left it unfused, its weight dequantized on every run. The
        remainder, added after, keeps the sum the float bias: rounding the bias alone moves every output of a
        channel the same way (measured on MiniLM's W8A8 layers, whose steps reach 0.009: cosine of onnxruntime's
        output to the PyTorch model's 0.9940 instead of 0.9994).
        Not split where a step is not positive or a code would overflow int32; joined back into one float bias
        after export where the layer's output is quantized again (``_onnx_graph.float_bias_where_requantized``)."""
        step = self.input_scale * (weight_step.reshape(()) if weight_step.numel() == 1 else weight_step)
        if not bool(torch.isfinite(step).all() and (step > 0).all()):
            return
        codes = torch.round(self.bias / step)
        if bool(codes.abs().max() < 2**31 - 1):
            self.bias_int32, self.bias_step, self.bias_rest = codes.to(torch.int32), step, self.bias - codes * step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "dynamic":
            n = self.codes.shape[1]
            bias = self.bias if self.bias is not None else torch.zeros(n)
            scale, zp = self.scale.expand(n).contiguous(), self.zero_point.expand(n).contiguous()
            return dynamic_int8_matmul(x, self.codes, zp, scale, bias)
        if self.activations == "static":
            x = fake_quantize_input(x, self.input_scale, self.input_zero_point)
        w = dequantize_weight(self.codes, self.scale, self.zero_point, self.axis, self.block_size)
        if not self.conv:
            y = x @ w
            if self.bias is None:
                return y
            if self.bias_int32 is not None and x.dim() == 2:  # MatMul + Add -> Gemm -> QGemm (2-D inputs only)
                return y + dequantize_bias(self.bias_int32, self.bias_step) + self.bias_rest
            return add_bias(y, self.bias) if self.activations == "none" else y + self.bias  # weight-only: MatMulNBits
        c = self.conv
        op = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
        if c["pad"] is not None:
            return op(F.pad(x, c["pad"][0], mode=c["pad"][1]), w, self.bias, c["stride"], 0, c["dilation"], c["groups"])
        return op(x, w, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])


def _qdq_layer(name: str, layer: nn.Module, weight_dtype: str, opset: int) -> _QDQLayer:
    try:
        q = READERS[type(layer)](layer)
    except ValueError as err:
        raise ValueError(f"layer {name!r} ({type(layer).__name__}): {err}") from None
    fmt = ONNX_FORMATS.get((q.scheme, q.activations))
    kind = "conv" if q.conv else "linear"
    if fmt is None or q.bits not in fmt.storage or kind not in fmt.layers:
        allowed = {f"{s}/{a}": (sorted(f.storage), sorted(f.layers)) for (s, a), f in ONNX_FORMATS.items()}
        raise ValueError(
            f"layer {name!r} ({type(layer).__name__}: {q.scheme}, {q.bits} bits, {q.activations} activations, {kind}) "
            f"has no ONNX encoding; encodings (bits, layers): {allowed}"
            + ("; convert with dynamic_activations=False to keep its inputs in float" if q.activations == "dynamic" else "")
        )
    dtype = fmt.storage[q.bits]
    if weight_dtype == "int8" and dtype == torch.uint8 or dtype == torch.int4 and opset < 21:
        dtype = torch.int8
    need = 21 if q.block_size else 19 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else 13
    if opset < need:
        raise ValueError(f"layer {name!r} ({q.scheme}{', blocks' if q.block_size else ''}) needs `opset` >= {need}, got {opset}")
    return _QDQLayer(q, dtype)


def _as_args(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example, dict):
        return (), dict(example)
    return (tuple(example), {}) if isinstance(example, (tuple, list)) else ((example,), {})


def _batch_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Examples with batch >= 2 (a batch of 1 would be specialized) and ``dynamic_shapes`` marking dim 0."""
    batch = torch.export.Dim("batch")

    def widen(t: Any) -> Any:
        return torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t

    def spec(t: Any) -> Any:
        return {0: batch} if isinstance(t, torch.Tensor) and t.dim() else None

    args, kwargs = tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}
    shapes = {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)
    return args, kwargs, shapes


def _writable_target(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK) or os.path.isdir(path):
        raise ValueError(f"`path` {path!r} is not a writable file location (its folder {parent!r} must exist and be writable)")
    return path


def prepare_for_onnx(model: nn.Module, weight_dtype: str = "uint8", opset: int = 21) -> tuple[nn.Module, int]:
    """A copy of ``model`` in eval mode whose quantized layers are in their export form; the number of them.

    Raises:
        ValueError: a quantized layer without an ONNX encoding (naming it), or a prepared layer whose input range
            was never observed.
    """
    out = copy_model(model).eval()
    if any(is_qat_module(m) for m in out.modules()):
        convert(out, inplace=True, dynamic_activations=False)
    layers = [(n, m) for n, m in out.named_modules() if type(m) in READERS]
    for name, layer in layers:
        new = _qdq_layer(name, layer, weight_dtype, opset)
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, new)
    return out, len(layers)


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any = None,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    weight_dtype: Literal["int8", "uint8"] = "uint8",
    embeddings: Literal["float", "int8"] = "float",
) -> str:
    """Write ``model`` as an ONNX file for onnxruntime (float graph, or QDQ with integer weights if quantized).

    Args:
        model: a float model, a model prepared by ``QuantizationAwareTraining`` (fake-quantized) or one converted by
            :func:`convert_quantized`; a LightningModule exports its ``forward``.
        path: the ``.onnx`` file to write (written to a temporary file in the same folder, then renamed).
        example_input: one input batch (a tensor, a tuple of tensors for several positional inputs, or a dict of
            keyword inputs); defaults to the model's ``example_input_array``.
        opset: the ONNX opset (default :data:`DEFAULT_OPSET`, 21; at least 13 for per-channel quantization).
        dynamic_batch: let dimension 0 of every input vary (otherwise the example's shapes are fixed).
        weight_dtype: storage of 8-bit weight codes. ``"uint8"`` (default) stores the codes and zero point moved
            by 128 (the same values): onnxruntime runs uint8 x uint8 kernels, which never saturate. ``"int8"``
            (what onnxruntime's own quantizer writes) selects its uint8 x int8 kernels; on x86 CPUs without VNNI
            these add pairs of products in int16 and saturate with 8-bit weights (onnxruntime's documented
            caveat; measured here up to 27 % output error on a small MLP), so it is only for VNNI/ARM targets.
            Codes of 2-7 bits cannot saturate and are always int8.
        embeddings: ``"int8"`` stores every ``nn.Embedding`` table the graph gathers from as int8 with one float
            step per row (symmetric, ``max |row| / 127``), looked up as ``Gather`` int8 rows -> ``Cast`` -> ``Mul``
            by the rows' steps: onnxruntime keeps the table int8 in memory (30522 x 384: +25 MB resident, 0.48 ms
            per 32 x 32 lookup vs 0.26 ms float), whereas ``DequantizeLinear(axis=0) -> Gather`` is not constant-folded
            and rebuilds the float table each run (7.0 ms, +74 MB; ``benchmarks/onnx_embedding.py``). This is
            post-training quantization at export time, not QAT, for float and QAT models alike: each table value
            moves by at most half its row's step (``max |row| / 254``); a zero (``padding_idx``) row stays 0.
            ``"float"`` (default) keeps the tables. Pretrained MiniLM, float encoder: 0.61x of the fp32 file.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: no example input, an unwritable ``path``, an opset below 13, a layer without an ONNX encoding
            (named), a bad ``embeddings`` or with ``"int8"`` an embedding tied to another layer, or a model
            ``torch.onnx`` cannot export (with its reason); nothing is written then.

    Example:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> to_onnx(nn.Linear(2, 2), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        Traceback (most recent call last):
        ...
        ValueError: `example_input` is required (one input batch for the model's forward, e.g. torch.zeros(1, 1, 8, 8)) unless the model sets `example_input_array`; got None for Linear
        >>> ids, emb = torch.randint(0, 1000, (2, 5)), nn.Embedding(1000, 16)
        >>> f, q = (to_onnx(emb, os.path.join(tempfile.mkdtemp(), "e.onnx"), ids, embeddings=e) for e in ("float", "int8"))
        >>> round(os.path.getsize(q) / os.path.getsize(f), 2)  # int8 rows + one float32 step per row
        0.32
    """
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(f"`opset` must be an integer >= 13 (per-channel QuantizeLinear/DequantizeLinear), got {opset!r}")
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"`weight_dtype` must be one of ['int8', 'uint8'], got {weight_dtype!r}")
    tables = embedding_tables(model, embeddings)
    example = resolve_example(model, example_input)
    path = _writable_target(path)
    export_model, n_quant = prepare_for_onnx(model, weight_dtype, opset)
    args, kwargs = _as_args(example)
    shapes = None
    if dynamic_batch:
        args, kwargs, shapes = _batch_dims(args, kwargs)
    table = translation_table(opset) if n_quant else None
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            program = torch.onnx.export(export_model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                        dynamic_shapes=shapes, custom_translation_table=table, verbose=False)
    except Exception as err:  # the exporter's own errors are many types; one ValueError with its reason
        raise ValueError(f"torch.onnx could not export {type(model).__name__}: {str(err).strip().splitlines()[0]}") from err
    lowbit.retype_initializers(program.model.graph, {f"{n}.codes": m.onnx_type for n, m in export_model.named_modules()
                                                     if getattr(m, "onnx_type", None)})
    quantize_gathers(program.model.graph, tables)
    float_bias_where_requantized(program.model.graph)
    drop_records(program.model.graph)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        program.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

