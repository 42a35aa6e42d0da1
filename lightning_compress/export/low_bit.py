"""Converted layers for the low-bit formats of quantization-aware training: group-wise integer weights on the
int4 kernel, fp8 weights and MX block formats. :func:`~lightning_compress.export.quantization.convert` builds them.

- :class:`GroupwiseLinear`: uniform codes with one step (and zero point) per group of ``group_size`` inputs.
  With at most 4 bits and a group of 32/64/128/256 it runs ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on CPU
  (``_weight_int4pack_mm`` on CUDA, **not tested here**: no GPU was available), bf16 activations, the weight in
  the kernel's packed layout built once per device; otherwise it dequantizes and runs ``F.linear``. The kernel
  computes ``(q - 8) * s + zero`` in bf16, so results equal the fake-quantized model within bf16 rounding of the
  activations and steps (steps are stored in bf16, the kernel's type).
- :class:`Float8Linear`: the weight stored as ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` with a float32 scale
  per channel or tensor; the forward dequantizes (bit-exact to the fake-quantized weight).
- :class:`MXLinear`: element codes packed at their exact width (8, 6 or 4 bits) plus one E8M0 scale (uint8) per
  block of 32 inputs; the forward dequantizes (bit-exact).

Inputs quantized during training are quantized the same way here (observed ranges, or at run time per token /
per MX block) before the matmul.

**Format description for exporters.** Every layer has ``quant_format() -> dict`` with the keys of
compressed-tensors' ``QuantizationArgs`` where they exist: ``{"weights": {"type": "int" | "float", "num_bits",
"symmetric", "strategy": "tensor" | "channel" | "group", "group_size", "element" (fp8/MX element name or None),
"scale_dtype": "bfloat16" | "float32" | "e8m0", "tensors": {role: buffer name}, "packing"}, "input_activations":
None | {"type", "num_bits", "strategy": "tensor" | "token" | "group", "dynamic", "symmetric"}, "format":
suggested compressed-tensors format name}``; ``getattr(layer, name)`` gives each tensor named in ``tensors``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_compress.export.quantization import convert
    >>> from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags
    >>> net = nn.Sequential(nn.Linear(64, 32))
    >>> prepare_qat(net, ["0"], QuantConfig(4, None, granularity="per_group", group_size=32))
    >>> set_qat_flags(net, fake_quant=True)
    >>> x = torch.randn(2, 64)
    >>> y = net(x)
    >>> layer = convert(net)[0]
    >>> type(layer).__name__, layer.kernel, layer.quant_format()["weights"]["group_size"]
    ('GroupwiseLinear', 'int4pack_mm', 32)
    >>> bool(((layer(x) - y).abs().max() / y.abs().max()) < 0.02)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional import formats as ff
from lightning_compress.functional import quantization as qf
from lightning_compress.functional.packing import pack_bits, pack_codes, unpack_bits, unpack_codes
from lightning_compress.layers.quantization import quantize_input_dynamic

__all__ = ["LOW_BIT_LAYERS", "Float8Linear", "GroupwiseLinear", "MXLinear", "quant_format", "weight_storage_bits"]

INT4_GROUP_SIZES = (32, 64, 128, 256)


class _LowBitLinear(nn.Module):
    """Bias and input quantization shared by the low-bit layers (``input_qparams``: static step and zero point)."""

    def _set_common(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                    input_quant: dict[str, Any] | None) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.input_quant = dict(input_quant) if input_quant else None
        static = self.input_quant is not None and not self.input_quant["dynamic"]
        qp = torch.stack([self.input_quant.pop("scale").reshape(()), self.input_quant.pop("zero_point").reshape(())]) if static else None
        self.register_buffer("input_qparams", None if qp is None else qp.detach().float())

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        iq = self.input_quant
        if iq is None:
            return x
        if self.input_qparams is not None:
            return qf.fake_quantize_uniform(x, self.input_qparams[:1], self.input_qparams[1:], 0, 255)
        return quantize_input_dynamic(x, iq["scheme"], iq["granularity"], iq["bits"], iq.get("mx_scale", "floor"))

    def _input_format(self) -> dict[str, Any] | None:
        iq = self.input_quant
        if iq is None:
            return None
        kind = "int" if iq["scheme"] in ("uniform", "power_of_two") else "float"
        strategy = "group" if iq["scheme"] in ff.MX_ELEMENT else "token" if iq["granularity"] == "per_token" else "tensor"
        fmt = {"type": kind, "num_bits": iq["bits"], "strategy": strategy, "dynamic": iq["dynamic"],
               "symmetric": kind == "float", "element": None if kind == "int" else ff.MX_ELEMENT.get(iq["scheme"], iq["scheme"])}
        return {**fmt, "scale_rounding": iq.get("mx_scale", "floor")} if strategy == "group" else fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = self._quantize_input(x.reshape(-1, self.in_features).float())
        y = self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_quant={self.input_quant}"


class GroupwiseLinear(_LowBitLinear):
    """A ``Linear`` with group-wise uniform integer weights (see the module docstring).

    Buffers: ``qweight`` (uint8: codes minus ``qmin``, packed 2/4/8 bits per code, row-major ``(out, in)``, first
    code in the lowest bits), ``scale`` (bf16, ``(out, in / group_size)``), ``zero_point`` (int8, same shape; only
    if asymmetric), ``bias`` (float32).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
                 qmin: int, bias: torch.Tensor | None, input_quant: dict[str, Any] | None = None) -> None:
        super().__init__()
        n, k = codes.shape
        self.bits, self.qmin, self.group_size = bits, qmin, k // scale.shape[1]
        self._set_common(k, n, bias, input_quant)
        self.register_buffer("qweight", pack_codes(codes - qmin, bits))
        self.register_buffer("scale", scale.detach().to(torch.bfloat16).clone())
        zp = zero_point if zero_point is not None and bool((zero_point != 0).any()) else None
        self.register_buffer("zero_point", None if zp is None else zp.to(torch.int8).clone())
        self.kernel = "int4pack_mm" if bits <= 4 and self.group_size in INT4_GROUP_SIZES else "dequantize"
        self._packed: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def codes(self) -> torch.Tensor:
        """Signed integer codes ``(out, in)`` (int64)."""
        return unpack_codes(self.qweight, self.bits, (self.out_features, self.in_features)) + self.qmin

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight ``(q - z) * s`` (with the stored bf16 steps)."""
        zp = self.zero_point.float() if self.zero_point is not None else torch.zeros_like(self.scale, dtype=torch.float32)
        return qf.dequantize_grouped(self.codes(), self.scale.float(), zp)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = {}
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": {}}

    def _kernel_weight(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The int4 kernel's packed weight and ``(in / g, out, 2)`` bf16 steps and zeros (rows padded to 16 on CPU)."""
        if device not in self._packed:
            q = (self.codes() + 8).to(torch.int32)
            s = self.scale.float()
            zero = -(self.zero_point.float() * s) if self.zero_point is not None else torch.zeros_like(s)
            pad = (-self.out_features) % 16
            if pad:
                q = torch.cat([q, q.new_full((pad, q.shape[1]), 8)])
                s, zero = F.pad(s, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
            sz = torch.stack([s.t(), zero.t()], -1).to(torch.bfloat16).contiguous().to(device)
            if device.type == "cuda":  # pragma: no cover - untested here (no GPU)
                tiles = 8 if self.in_features % 128 == 0 else 4 if self.in_features % 64 == 0 else 2
                nib = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
                packed = torch.ops.aten._convert_weight_to_int4pack(nib, tiles)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(device), 1)
            self._packed[device] = (packed, sz)
        return self._packed[device]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "int4pack_mm":
            return F.linear(x, self.weight.to(x.device))
        packed, sz = self._kernel_weight(x.device)
        op = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = op(x.to(torch.bfloat16).contiguous(), packed, self.group_size, sz)
        return y[:, : self.out_features].float()

    def quant_format(self) -> dict[str, Any]:
        """The format description for exporters (see the module docstring)."""
        tensors = {"codes": "qweight", "scale": "scale"} | ({"zero_point": "zero_point"} if self.zero_point is not None else {})
        return {"format": "pack-quantized", "input_activations": self._input_format(), "weights": {
            "type": "int", "num_bits": self.bits, "symmetric": self.zero_point is None, "strategy": "group",
            "group_size": self.group_size, "element": None, "scale_dtype": "bfloat16", "tensors": tensors,
            "packing": f"codes - ({self.qmin}) as unsigned, {'2' if self.bits <= 2 else '4' if self.bits <= 4 else '8'}"
                       "-bit slots, row-major (out, in), first code in the lowest bits"}}


class Float8Linear(_LowBitLinear):
    """A ``Linear`` whose weight is stored in fp8 (``weight_fp8``) with a float32 ``weight_scale`` per channel or
    tensor; the forward dequantizes (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, element: str, bias: torch.Tensor | None,
                 input_quant: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.element = element
        self._set_common(weight.shape[1], weight.shape[0], bias, input_quant)
        s = scale.detach().float().reshape(-1)
        scaled = ff.round_to_format(weight.detach().float() / s.reshape(-1, 1), element)
        self.register_buffer("weight_fp8", scaled.to(ff.FP8_DTYPES[element]))
        self.register_buffer("weight_scale", s.clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)

    def quant_format(self) -> dict[str, Any]:
        """The format description for exporters (see the module docstring)."""
        return {"format": "float-quantized", "input_activations": self._input_format(), "weights": {
            "type": "float", "num_bits": 8, "symmetric": True, "group_size": None, "element": self.element,
            "strategy": "channel" if self.weight_scale.numel() > 1 else "tensor", "scale_dtype": "float32",
            "tensors": {"codes": "weight_fp8", "scale": "weight_scale"}, "packing": str(self.weight_fp8.dtype)}}


class MXLinear(_LowBitLinear):
    """A ``Linear`` in an OCP MX format: ``qweight`` (element codes packed at their exact width, row-major) and
    ``scales`` (uint8 E8M0, ``(out, in / 32)``); the forward dequantizes (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, fmt: str, bias: torch.Tensor | None,
                 input_quant: dict[str, Any] | None = None, scale_rounding: str = "floor") -> None:
        super().__init__()
        self.fmt = fmt
        self.bits = ff.ELEMENTS[ff.MX_ELEMENT[fmt]].bits
        self._set_common(weight.shape[1], weight.shape[0], bias, input_quant)
        codes, e8m0 = ff.quantize_mx(weight.detach().float(), fmt, scale_rounding)  # the rule the QAT trained with
        self.register_buffer("qweight", pack_bits(codes, self.bits))
        self.register_buffer("scales", e8m0)

    @property
    def weight(self) -> torch.Tensor:
        codes = unpack_bits(self.qweight, self.bits, (self.out_features, self.in_features))
        return ff.dequantize_mx(codes, self.scales, self.fmt)

    def quant_format(self) -> dict[str, Any]:
        """The format description for exporters (see the module docstring)."""
        return {"format": f"{self.fmt}-pack-quantized", "input_activations": self._input_format(), "weights": {
            "type": "int" if self.fmt == "mxint8" else "float", "num_bits": self.bits, "symmetric": True,
            "strategy": "group", "group_size": ff.MX_BLOCK, "element": ff.MX_ELEMENT[self.fmt], "scale_dtype": "e8m0",
            "tensors": {"codes": "qweight", "scale": "scales"},
            "packing": f"{self.bits}-bit element codes back to back, row-major (out, in), lowest bit first"}}


LOW_BIT_LAYERS = (GroupwiseLinear, Float8Linear, MXLinear)


def weight_storage_bits(layer: nn.Module) -> float:
    """Bits per weight of a converted layer counted from its stored tensors: weight codes, scales, zero points.

    Example:
        >>> layer = MXLinear(torch.randn(4, 64), "mxfp4", None)
        >>> weight_storage_bits(layer)  # 4-bit elements + one 8-bit scale per 32
        4.25
    """
    names = ("qweight", "weight_fp8", "weight_int8", "packed", "scale", "scales", "weight_scale", "zero_point",
             "weight_zero_point")
    total = sum(b.numel() * b.element_size() for n, b in layer.named_buffers(recurse=False) if n in names and b is not None)
    if hasattr(layer, "qparams"):  # Int8Linear / PackedLinear: weight steps are the first entries of qparams
        total += layer.weight_scale.numel() * 4
    return 8.0 * total / layer.weight.numel()


def quant_format(layer: nn.Module) -> dict[str, Any]:
    """The format description (see the module docstring) of any converted Linear: the low-bit layers here, and
    ``Int8Linear`` / ``PackedLinear`` of :mod:`~lightning_compress.export.quantization` (per-channel or per-tensor
    int weights; inputs static per tensor, per token at run time, or float).

    Example:
        >>> quant_format(MXLinear(torch.randn(4, 32), "mxfp4", None))["format"]
        'mxfp4-pack-quantized'
    """
    if isinstance(layer, LOW_BIT_LAYERS):
        return layer.quant_format()
    from lightning_compress.export.quantization import Int8Linear, PackedLinear

    if not isinstance(layer, (Int8Linear, PackedLinear)) or getattr(layer, "kind", "uniform") != "uniform":
        raise ValueError(f"no quantization format description for a {type(layer).__name__}")
    int8 = isinstance(layer, Int8Linear)
    zp = layer.weight_zero_point if int8 else layer.zero_point
    tensors = {"codes": "weight_int8" if int8 else "packed", "scale": "weight_scale"}
    if zp is not None:
        tensors["zero_point"] = "weight_zero_point" if int8 else "zero_point"
    static = layer.input_scale is not None
    dynamic = int8 and not static or getattr(layer, "dynamic_input", False)
    inputs = None if not (static or dynamic) else {
        "type": "int", "num_bits": 8, "strategy": "token" if dynamic else "tensor", "dynamic": dynamic,
        "symmetric": False, "element": None}
    bits = 8 if int8 else layer.bits
    return {"format": "int-quantized" if int8 and inputs else "pack-quantized", "input_activations": inputs,
            "weights": {"type": "int", "num_bits": bits, "symmetric": zp is None, "group_size": None, "element": None,
                        "strategy": "channel" if layer.weight_scale.numel() > 1 else "tensor",
                        "scale_dtype": "float32", "tensors": tensors,
                        "packing": "int8 (out, in)" if int8 else f"codes - qmin in {bits}-bit slots, row-major (out, in)"}}


def convert_linear(m: nn.Module, w: torch.Tensor, bias: torch.Tensor | None,
                   input_quant: dict[str, Any] | None) -> nn.Module:
    """The converted layer of a fake-quantized ``Linear`` with a per-group, fp8 or MX weight quantizer."""
    wq = m.weight_quant
    c = wq.config
    if c.is_fp8:
        return Float8Linear(w, wq.scale, c.scheme, bias, input_quant)
    if c.is_mx:
        return MXLinear(w, c.scheme, bias, input_quant, c.mx_scale)
    qmin, qmax = wq.qrange
    codes = qf.quantize_grouped(w, wq.scale, wq.zero_point, qmin, qmax)
    return GroupwiseLinear(codes, wq.scale, wq.zero_point, c.weight_bits, qmin, bias, input_quant)
