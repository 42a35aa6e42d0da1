"""Conversion of a fake-quantized model into one whose weights really are integers.

:func:`convert` replaces every layer prepared by ``QuantizationAwareTraining`` (or
:func:`~lightning_compress.layers.quantization.prepare_qat`):

- 8-bit uniform ``Linear`` and ``Conv2d`` (``groups=1``, zero padding) become :class:`Int8Linear` /
  :class:`Int8Conv2d`: int8 weights, inputs quantized to 8 bits (with the ranges observed in training, or per
  row at run time for weight-only layers), products accumulated in int32 by :func:`int8_matmul` (see below),
  rescaled to float once per output. Conv runs as im2col (``F.unfold``) + the same integer matmul.
- every other layer (2-7 bits, power-of-two levels, other convs) becomes a :class:`PackedLinear` /
  :class:`PackedConv`: codes packed 2, 4 or 8 bits per weight plus per-channel scales; the forward unpacks,
  dequantizes and runs the float op (correct, not faster).
- group-wise, fp8 and MX weights become the layers of :mod:`~lightning_compress.export.low_bit` (4-bit groups on
  the int4 kernel); layers trained with dynamic per-token inputs quantize their inputs per row at run time.
- a BatchNorm folded during training is folded into its conv for good and replaced by ``nn.Identity``.

Choice of the int8 kernel, by what the CPU has: ``torch._int_mm`` (oneDNN) where the CPU has VNNI or AMX int8
instructions, and always on CUDA. Without them (AVX2-only x86 CPUs, many ARM servers) oneDNN's int8 GEMM is 20-30x
slower than fp32 (measured here on an AVX2 AMD EPYC: 954 vs 43 ms for 1024x384 @ 384x1536, 1 thread), and the
fused u8s8 kernels that are fast there (fbgemm, oneDNN ``qlinear``) saturate 16-bit pair sums with full-range
8-bit inputs, so they are not exact. There :func:`int8_matmul` multiplies the integer codes in float32, in chunks
of 1,024 along the inner dimension: every product and partial sum is an integer below 2^24, so the int32 result is
exact, at fp32 speed (nothing faster is exact there; ONNX Runtime's u8u8 kernel via ``to_onnx`` is the fast path
on such CPUs). :data:`INT8_BACKEND` names the CPU choice. ``torch.ao``'s dynamic quantized Linear is not used: it is
deprecated, needs quantized tensor types that ``torch.save`` ties to ``torch.ao``, and covers Linear only.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> prepare_qat(net, ["0", "2"], QuantConfig(weight_bits=8, activation_bits=8))
    >>> set_qat_flags(net, fake_quant=True)
    >>> x = torch.randn(8, 16)
    >>> _ = net(x)  # observes input ranges
    >>> int_net = convert(net.eval())
    >>> type(int_net[0]).__name__, int_net[0].weight_int8.dtype
    ('Int8Linear', torch.int8)
    >>> torch.allclose(int_net(x), net(x), atol=1e-4)
    True
"""

from __future__ import annotations

import copy
import io
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress._sharding import local
from lightning_compress.export import low_bit
from lightning_compress.export._int8_kernel import INT8_BACKEND, int8_matmul
from lightning_compress.functional import quantization as qf
from lightning_compress.functional.packing import pack_codes, unpack_codes
from lightning_compress.functional.quantization import bn_factor
from lightning_compress.layers._quant_sharded import gathered
from lightning_compress.layers._quant_smoothing import SmoothedInput
from lightning_compress.layers.quantization import is_qat_module, quantize_input_dynamic

__all__ = [
    "INT8_BACKEND",
    "Int8Conv2d",
    "Int8Linear",
    "PackedConv",
    "PackedLinear",
    "convert",
    "int8_matmul",
    "serialized_size",
]

def serialized_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of the artefact as it would be written to disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _quantize_input(x: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None):
    """uint8 codes of ``x`` shifted to int8 (``q - 128``), with the step and zero point used (per row if dynamic)."""
    if scale is None:
        scale, zero_point = qf.activation_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    q = torch.round(x / scale)
    q.add_(zero_point - 128).clamp_(-128, 127)
    return q.to(torch.int8), scale, zero_point


def _int8_linear_2d(layer: _Int8Base, x: torch.Tensor) -> torch.Tensor:
    a, s_x, z_x = _quantize_input(x, layer.input_scale, layer.input_zero_point)
    w_t, w_rowsum = layer._cache()
    acc = int8_matmul(a, w_t)
    if layer.input_scale is not None and layer.weight_zero_point is None:
        # static input, symmetric weights: the zero-point correction and the bias fold into one float epilogue
        scale, bias = layer._epilogue()
        return torch.addcmul(bias, acc.float(), scale)
    a0 = (z_x - 128).to(torch.int32)
    acc = acc - a0 * w_rowsum
    if layer.weight_zero_point is not None:
        zw = layer.weight_zero_point.to(torch.int32)
        acc = acc - zw * a.sum(1, keepdim=True, dtype=torch.int32) + a.shape[1] * a0 * zw
    y = acc.float() * (s_x * layer.weight_scale)
    return y if layer.bias is None else y + layer.bias


class _FloatParams(nn.Module):
    """The small float tensors of a converted layer in one buffer ``qparams`` (one record in the saved file):
    the weight step(s), the bias, and the input step and zero point; exposed as properties."""

    def _set_float_params(self, scale: torch.Tensor, bias: torch.Tensor | None,
                          input_qparams: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        parts = [scale.detach().float().reshape(-1)]
        self._n_scale = parts[0].numel()
        self._n_bias = 0 if bias is None else bias.numel()
        if bias is not None:
            parts.append(bias.detach().float().reshape(-1))
        self._static_input = input_qparams is not None
        if input_qparams is not None:
            parts += [input_qparams[0].detach().float().reshape(1), input_qparams[1].detach().float().reshape(1)]
        self.register_buffer("qparams", torch.cat(parts).clone())

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.qparams[: self._n_scale]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.qparams[self._n_scale : self._n_scale + self._n_bias] if self._n_bias else None

    @property
    def input_scale(self) -> torch.Tensor | None:
        return self.qparams[-2:-1] if self._static_input else None

    @property
    def input_zero_point(self) -> torch.Tensor | None:
        return self.qparams[-1:] if self._static_input else None


class _Int8Base(_FloatParams):
    """An int8 layer: ``weight_int8`` (out, in*k) codes, ``weight_zero_point`` (only if asymmetric) and
    ``qparams`` (see :class:`_FloatParams`; no input step: inputs quantized per row at run time)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bias: torch.Tensor | None, input_qparams: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        super().__init__()
        self.register_buffer("weight_int8", codes.to(torch.int8).contiguous())
        zp = zero_point if zero_point is not None and bool((zero_point != 0).any()) else None
        self.register_buffer("weight_zero_point", None if zp is None else zp.to(torch.int8).clone())
        self._set_float_params(scale, bias, input_qparams)
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cached_epilogue: tuple[torch.Tensor, torch.Tensor] | None = None

    def _cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached is None:
            w = self.weight_int8
            self._cached = (w.t().contiguous(), w.to(torch.int32).sum(1))
        return self._cached

    def _epilogue(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_x * s_w, bias - (z_x - 128) * rowsum(w) * s_x * s_w)`` for static inputs and symmetric weights."""
        if self._cached_epilogue is None:
            scale = self.input_scale * self.weight_scale
            bias = self.bias if self.bias is not None else torch.zeros(self.weight_int8.shape[0])
            shift = (self.input_zero_point - 128) * self._cache()[1].float() * scale
            self._cached_epilogue = (scale.expand(self.weight_int8.shape[0]).contiguous(), bias - shift)
        return self._cached_epilogue

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cached = self._cached_epilogue = None
        super()._load_from_state_dict(*args, **kwargs)

    def _dequantized(self) -> torch.Tensor:
        zp = self.weight_zero_point if self.weight_zero_point is not None else torch.zeros(1)
        return qf.dequantize_uniform(self.weight_int8, self.weight_scale, zp.float())


class Int8Linear(_Int8Base):
    """A ``Linear`` with int8 weights run by the int8 kernel (see :func:`convert`)."""

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight (for inspection and monitoring; the forward does not use it)."""
        return self._dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _int8_linear_2d(self, x.reshape(-1, x.shape[-1]).float())
        return y.reshape(*lead, y.shape[-1]).to(x.dtype)  # the input's dtype, as the float layer (e.g. bf16-true)

    def extra_repr(self) -> str:
        o, i = self.weight_int8.shape
        return f"in_features={i}, out_features={o}, static_input={self.input_scale is not None}"


class Int8Conv2d(_Int8Base):
    """A ``Conv2d`` (``groups=1``, zero padding) as im2col + the int8 kernel (see :func:`convert`)."""

    def __init__(self, conv: nn.Conv2d, *args: Any) -> None:
        super().__init__(*args)
        self.out_channels = conv.out_channels
        self.in_channels = conv.in_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight ``(out, in, kh, kw)``."""
        return self._dequantized().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # an unbatched (C, H, W) input, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        n, _, h, w = x.shape
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x.float(), self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*k*k, L)
        y = _int8_linear_2d(self, cols.transpose(1, 2).reshape(n * ho * wo, -1))
        return y.reshape(n, ho * wo, -1).transpose(1, 2).reshape(n, -1, ho, wo).to(x.dtype)


class _PackedBase(_FloatParams):
    """Packed integer weight codes (``packed``, uint8), ``zero_point`` (only if asymmetric) and ``qparams``."""

    def __init__(self, kind: str, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 qmin: int, bias: torch.Tensor | None, input_qparams: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        super().__init__()
        self.kind, self.bits, self.qmin = kind, bits, qmin
        self.weight_shape = tuple(codes.shape)
        unsigned = codes if kind == "power_of_two" else codes - qmin
        self.register_buffer("packed", pack_codes(unsigned, bits))
        zp = zero_point if zero_point is not None and bool((zero_point != 0).any()) else None
        self.register_buffer("zero_point", None if zp is None else zp.to(torch.int8).clone())
        self._set_float_params(scale, bias, input_qparams)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight, exactly the fake-quantized weight of training."""
        codes = unpack_codes(self.packed, self.bits, self.weight_shape)
        if self.kind == "power_of_two":
            return qf.dequantize_pow2(codes, self.weight_scale, self.bits)
        zp = self.zero_point.float() if self.zero_point is not None else torch.zeros(1)
        return qf.dequantize_uniform(codes + self.qmin, self.weight_scale, zp)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "dynamic_input", False):
            return quantize_input_dynamic(x, "uniform", "per_token")
        if self.input_scale is None:
            return x
        return qf.fake_quantize_uniform(x, self.input_scale, self.input_zero_point, 0, 255)

    def _float_args(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Input, weight and bias in one dtype: the input's, at least float32 (a bf16 input is computed in float32)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return self._input(x.to(dtype)).to(dtype), self.weight.to(dtype), bias

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, weight_shape={self.weight_shape}"


class PackedLinear(_PackedBase):
    """A ``Linear`` whose weight is stored as packed integer codes (see :func:`convert`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*self._float_args(x)).to(x.dtype)


class PackedConv(_PackedBase):
    """A ``Conv{1,2,3}d`` whose weight is stored as packed integer codes (see :func:`convert`)."""

    def __init__(self, conv: nn.Module, *args: Any) -> None:
        super().__init__(*args)
        self.dims = conv.weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self.reversed_padding = conv._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        xq, w, b = self._float_args(x)
        if self.padding_mode != "zeros":
            xq = F.pad(xq, self.reversed_padding, mode=self.padding_mode)
            return op(xq, w, b, self.stride, 0, self.dilation, self.groups).to(x.dtype)
        return op(xq, w, b, self.stride, self.padding, self.dilation, self.groups).to(x.dtype)


def _int8_conv_ok(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


@torch.no_grad()
def _convert_layer(m: nn.Module, name: str, dynamic_activations: bool) -> nn.Module:
    wq = m.weight_quant
    cfg = wq.config
    w = m.effective_weight().detach()
    wq.update(w)
    bias = m.bias.detach() if m.bias is not None else None
    bn = m.folded_bn()
    if bn is not None:
        factor = bn_factor(bn).detach()
        b = bias if bias is not None else torch.zeros_like(factor)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(factor)
        bias = (b - bn.running_mean) * factor + beta
    input_qparams = None
    iq = m.input_quant
    if cfg.per_group or cfg.is_fp8 or cfg.is_mx:
        spec = None if iq is None else {"dynamic": iq.dynamic, "scheme": iq.scheme, "granularity": iq.granularity,
                                        "bits": iq.bits, "scale": iq.scale, "zero_point": iq.zero_point,
                                        "mx_scale": iq.mx_scale}
        if spec is not None and not iq.dynamic and not bool(iq.initialized):
            raise ValueError(f"layer {name!r} has no observed input range: run a training step with fake quantization first")
        return low_bit.convert_linear(m, w, bias, spec)
    if iq is not None and iq.dynamic:  # per-token ranges at run time: the int8 layer's dynamic path
        dynamic_activations = True
    elif iq is not None:
        if not bool(iq.initialized):
            raise ValueError(
                f"layer {name!r} has no observed input range: run at least one training step with fake "
                "quantization on before converting"
            )
        input_qparams = (iq.scale, iq.zero_point)
    if cfg.scheme == "power_of_two":
        codes = qf.quantize_pow2(w, wq.scale, cfg.weight_bits)
        args = ("power_of_two", cfg.weight_bits, codes, wq.scale, None, 0, bias, input_qparams)
    else:
        qmin, qmax = wq.qrange
        codes = qf.quantize_uniform(w, wq.scale, wq.zero_point, qmin, qmax)
        int8 = cfg.weight_bits == 8 and (input_qparams is not None or dynamic_activations)
        if int8 and isinstance(m, nn.Linear):
            return Int8Linear(codes, wq.scale, wq.zero_point, bias, input_qparams)
        if int8 and _int8_conv_ok(m):
            return Int8Conv2d(m, codes.reshape(codes.shape[0], -1), wq.scale, wq.zero_point, bias, input_qparams)
        args = ("uniform", cfg.weight_bits, codes, wq.scale, wq.zero_point, qmin, bias, input_qparams)
    new = PackedLinear(*args) if isinstance(m, nn.Linear) else PackedConv(m, *args)
    new.dynamic_input = iq is not None and iq.dynamic
    return new


def convert(model: nn.Module, inplace: bool = False, dynamic_activations: bool = True) -> nn.Module:
    """Turn every fake-quantized layer of ``model`` into an integer layer; see the module docstring.

    Args:
        model: a model prepared for quantization-aware training.
        inplace: change ``model`` itself (default: convert a deep copy and leave ``model`` as it is).
        dynamic_activations: weight-only 8-bit layers quantize their inputs per row at run time to use the
            int8 kernel; ``False`` keeps their inputs in float (packed storage, exactly the trained model).

    Returns:
        The converted model, in eval mode.

    Raises:
        ValueError: ``model`` has no fake-quantized layer, or an input range was never observed.

    Example:
        >>> from torch import nn
        >>> from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags
        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> prepare_qat(net, ["0"], QuantConfig(weight_bits=8, activation_bits=None))
        >>> set_qat_flags(net, fake_quant=True)
        >>> int_net = convert(net)  # a converted copy: ``net`` stays fake-quantized
        >>> type(int_net[0]).__name__, int_net[0].weight_int8.dtype, type(net[0]).__name__
        ('Int8Linear', torch.int8, 'QATLinear')
    """
    if not inplace:
        model = copy.deepcopy(model)
    layers = [(n, m) for n, m in model.named_modules() if is_qat_module(m)]
    done = [f"{n!r} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, _FloatParams)]
    if not layers and done:
        raise ValueError(
            f"`model` is already converted: its layers {', '.join(done)} are integer layers (as after "
            "`convert_on_fit_end=True`); use it as it is"
        )
    if not layers:
        raise ValueError("`model` has no fake-quantized layer: prepare it with QuantizationAwareTraining or prepare_qat first")
    for name, m in layers:
        new = _convert_layer(gathered(m), name, dynamic_activations).to(local(m.weight).device)
        sm = m._modules.get("smoothing")
        if sm is not None and bool(sm.initialized):  # SmoothQuant: the integer layer sees x / s
            new = SmoothedInput(new, sm.factor)
        _replace(model, name, new)
        bn_name = m.__dict__.get("_bn_name")
        if bn_name is not None:
            _replace(model, bn_name, nn.Identity())
    return model.eval()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
