"""Fake-quantization modules and the prepare step that puts them into a model.

:func:`prepare_qat` replaces each chosen ``Linear``/``Conv{1,2,3}d`` by a ``QAT*`` subclass that holds the
*same* ``weight``/``bias`` parameters (so optimizers, pruning masks and state-dict keys are unchanged) plus
two small submodules: ``weight_quant`` (a :class:`WeightFakeQuantize`) and, with activation quantization,
``input_quant`` (an :class:`ActivationFakeQuantize`, 8-bit unsigned affine, EMA min/max observer). Their
state (steps, zero points, observer ranges, on/off flags) are buffers, so every checkpoint written while
training carries them; with ``learn_scale`` the step is a parameter (LSQ) and is trained by the optimizer.

A conv directly followed by a ``BatchNorm`` in the same parent is trained with the BN folded into its
quantized weight (``w * gamma / sqrt(var + eps)``, as in Jacob et al. 2018 and ``torch.ao``'s ConvBn
modules) so that the conversion, which folds the BN for good, computes what was trained.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> w = net[0].weight
    >>> prepare_qat(net, ["0", "2"], QuantConfig(weight_bits=4, activation_bits=8))
    >>> type(net[0]).__name__, net[0].weight is w
    ('QATLinear', True)
    >>> set_qat_flags(net, fake_quant=True, observe=True)
    >>> net(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    >>> len(torch.unique(net[0].weight_quant(net[0].weight)[0])) <= 15
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional import formats as ff
from lightning_compress.functional import quantization as qf
from lightning_compress.layers._quant_config import QuantConfig
from lightning_compress.layers._quant_observing import observes
from lightning_compress.layers._quant_sharded import observe_weights, reduce_input_range
from lightning_compress.layers._quant_smoothing import InputSmoothing
from lightning_compress.layers._quant_state import fill_missing

__all__ = [
    "ActivationFakeQuantize",
    "QATConv1d",
    "QATConv2d",
    "QATConv3d",
    "QATLinear",
    "QuantConfig",
    "WeightFakeQuantize",
    "find_conv_bn_pairs",
    "is_qat_module",
    "observe_weights",
    "prepare_qat",
    "set_qat_flags",
]

class WeightFakeQuantize(nn.Module):
    """Fake-quantizes a weight tensor (channel on dim 0) on the grid of ``config``.

    While ``observer_enabled``, a uniform step/zero point (or the power-of-two top level) is recomputed from
    the weight at every call; frozen, the stored one is used. With ``learn_scale`` the step is an LSQ
    parameter, initialized once from the weights when fake quantization first runs.
    """

    def __init__(self, config: QuantConfig, channels: int, in_features: int | None = None) -> None:
        super().__init__()
        self.config = config
        shape = (channels if config.per_channel and not config.is_mx else 1,)
        if config.per_group:
            shape = (channels, (in_features or config.group_size) // config.group_size)
        if config.learn_scale:
            self.scale = nn.Parameter(torch.ones(shape))
        else:
            self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("fake_quant_enabled", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("full_range", torch.tensor(int(config.full_range), dtype=torch.uint8))
        self._register_load_state_dict_pre_hook(fill_missing, with_module=True)

    @property
    def qrange(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the grid recorded in ``full_range`` (see ``layers._quant_state``)."""
        return qf.int_range(self.config.weight_bits, self.config.symmetric, full_range=bool(self.full_range))

    @torch.no_grad()
    def _observe(self, w: torch.Tensor) -> None:
        c = self.config
        if c.scheme == "power_of_two":
            self.scale.copy_(qf.pow2_scale(w, c.per_channel))
        elif c.is_fp8:
            self.scale.copy_(ff.fp8_scale(w, c.scheme, c.per_channel))
        elif c.is_mx:  # the shared scales are computed from each block as it is quantized
            pass
        elif c.learn_scale and not c.per_group:
            self.scale.copy_(qf.lsq_init_scale(w, c.weight_bits, c.symmetric, c.per_channel))
            if not c.symmetric:
                self.zero_point.copy_(qf.uniform_qparams(w, c.weight_bits, False, c.per_channel)[1])
        else:  # grouped (LSQ or not) or a fixed uniform grid: step and zero point from the weight
            full = bool(self.full_range)
            scale, zp = (qf.group_qparams(w, c.weight_bits, c.symmetric, c.group_size, c.learn_scale, full) if c.per_group
                         else qf.uniform_qparams(w, c.weight_bits, c.symmetric, c.per_channel, full))
            self.scale.copy_(scale)
            self.zero_point.copy_(zp)
        self.initialized.fill_(1)

    def update(self, w: torch.Tensor) -> None:
        """Refresh the grid from ``w`` if the observer runs (LSQ: only the first time)."""
        first = not bool(self.initialized)
        if first or (bool(self.observer_enabled) and not self.config.learn_scale):
            self._observe(w)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``w`` on the current grid (no observer update)."""
        c = self.config
        if c.scheme == "power_of_two":
            return qf.fake_quantize_pow2(w, self.scale, c.weight_bits)
        if c.is_fp8:
            return ff.fake_quantize_fp8(w, self.scale, c.scheme)
        if c.is_mx:
            return ff.fake_quantize_mx(w, c.scheme, c.mx_scale)
        qmin, qmax = self.qrange
        if c.per_group:
            return qf.fake_quantize_grouped(w, self.scale, self.zero_point, qmin, qmax)
        return qf.fake_quantize_uniform(w, self.scale, self.zero_point, qmin, qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.fake_quant_enabled):
            # an LSQ step not yet in use still takes part in the graph (zero gradient), so that DDP without
            # `find_unused_parameters` does not stop on it
            return w + 0.0 * self.scale.sum() if self.config.learn_scale else w
        self.update(w)
        return self.quantize(w)

    def extra_repr(self) -> str:
        c = self.config
        group = f", group_size={c.group_size}" if c.per_group else ""
        grid = f", range={self.qrange}" if c.scheme == "uniform" else ""
        return f"bits={c.weight_bits}, scheme={c.scheme}, {c.granularity}{group}, symmetric={c.symmetric}{grid}, lsq={c.learn_scale}"


def quantize_input_dynamic(x: torch.Tensor, scheme: str, granularity: str, bits: int = 8,
                           mx_scale: str = "floor") -> torch.Tensor:
    """Fake-quantize a layer input at run time (no observer): unsigned ``bits`` affine per token for integer
    schemes, the fp8 format with an ``amax`` scale per token (or per tensor), or MX blocks along the last dim
    (shared scales by ``mx_scale``). Converted layers call it too, so they compute exactly what was trained."""
    if scheme.startswith("fp8_"):
        rows = x.reshape(-1, x.shape[-1]) if granularity == "per_token" else x
        return ff.fake_quantize_fp8(rows, ff.fp8_scale(rows, scheme, granularity == "per_token"), scheme).reshape(x.shape)
    if scheme in ff.MX_ELEMENT:
        return ff.fake_quantize_mx(x, scheme, mx_scale)
    return qf.fake_quantize_per_token(x, bits)


class ActivationFakeQuantize(nn.Module):
    """Fake-quantizes a layer input to unsigned 8-bit affine levels (zero point exact) from an EMA min/max.

    The observer updates in training mode, and in a fit's training batches whatever the mode (``momentum`` of
    the moving average, first batch taken as is; see :mod:`~lightning_compress.layers._quant_observing`).
    With ``dynamic`` there is no observer: each input is quantized with its own ranges at run time (see
    :func:`quantize_input_dynamic`; ``scheme``, ``granularity`` and ``mx_scale`` say how).
    """
    mx_scale = "floor"  # the rule of a quantizer pickled before the option existed (instances set their own)

    def __init__(self, bits: int = 8, momentum: float = 0.01, dynamic: bool = False, scheme: str = "uniform",
                 granularity: str = "per_tensor", mx_scale: str = "floor") -> None:
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.dynamic, self.scheme, self.granularity, self.mx_scale = dynamic, scheme, granularity, mx_scale
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("min_val", torch.zeros(1))
        self.register_buffer("max_val", torch.zeros(1))
        self.register_buffer("fake_quant_enabled", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._register_load_state_dict_pre_hook(fill_missing, with_module=True)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = reduce_input_range(self, x.detach().amin().reshape(1).float(), x.detach().amax().reshape(1).float())
        if bool(self.initialized):
            lo = self.min_val + self.momentum * (lo - self.min_val)
            hi = self.max_val + self.momentum * (hi - self.max_val)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        scale, zp = qf.activation_qparams(self.min_val, self.max_val, self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fake_quant_enabled):
            return x
        if self.dynamic:
            self.initialized.fill_(1)
            return quantize_input_dynamic(x, self.scheme, self.granularity, self.bits, self.mx_scale)
        if not bool(self.initialized) or observes(self):
            self._observe(x)
        return qf.fake_quantize_uniform(x, self.scale, self.zero_point, 0, 2**self.bits - 1)

    def extra_repr(self) -> str:
        if self.dynamic:
            mx = f", mx_scale={self.mx_scale}" if self.scheme in ff.MX_ELEMENT else ""
            return f"bits={self.bits}, dynamic, {self.scheme}, {self.granularity}{mx}"
        return f"bits={self.bits}, momentum={self.momentum}"


class _QATMixin:
    """Forward of a fake-quantized layer; ``_float_forward(x, weight, bias)`` is the layer's own op."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quant: WeightFakeQuantize
    input_quant: ActivationFakeQuantize | None

    def folded_bn(self) -> nn.Module | None:
        """The BatchNorm folded into this conv's quantized weight, if any."""
        return self.__dict__.get("_bn")

    def effective_weight(self) -> torch.Tensor:
        """The float weight the quantizer sees: ``weight`` x ``gamma / sqrt(var + eps)`` (folded BN) x SmoothQuant factors."""
        bn, sm = self.folded_bn(), self._modules.get("smoothing")
        w = self.weight if bn is None else self.weight * qf.bn_factor(bn).reshape([-1] + [1] * (self.weight.dim() - 1))
        return w if sm is None else sm.scale_weight(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sm = self._modules.get("smoothing")
        if sm is not None:  # factors from the first training batch with fake quantization (then fixed)
            if not bool(sm.initialized) and bool(self.weight_quant.fake_quant_enabled) and observes(self.input_quant):
                sm.calibrate(x, self.weight, self.input_quant)
            x = sm.divide(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        bn = self.folded_bn()
        if bn is None or not bool(self.weight_quant.fake_quant_enabled):
            w = self.weight if bn is not None else self.effective_weight()  # a BN is folded only while quantizing
            return self._float_forward(x, self.weight_quant(w), self.bias)
        factor = qf.bn_factor(bn)
        y = self._float_forward(x, self.weight_quant(self.effective_weight()), None)
        shape = [1, -1] + [1] * (y.dim() - 2)
        y = y / factor.reshape(shape)
        return y if self.bias is None else y + self.bias.reshape(shape)

    def _float_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight (and input); same parameters and state-dict keys plus quantizers."""

    def _float_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)


class _QATConv(_QATMixin):
    def _float_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, w, b)  # type: ignore[attr-defined]


class QATConv1d(_QATConv, nn.Conv1d):
    """Fake-quantized ``nn.Conv1d`` (see :class:`QATLinear`)."""


class QATConv2d(_QATConv, nn.Conv2d):
    """Fake-quantized ``nn.Conv2d`` (see :class:`QATLinear`); may carry a folded BatchNorm."""


class QATConv3d(_QATConv, nn.Conv3d):
    """Fake-quantized ``nn.Conv3d`` (see :class:`QATLinear`)."""


QAT_CLASSES: dict[type, type] = {nn.Linear: QATLinear, nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Conv3d: QATConv3d}
_BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def is_qat_module(module: nn.Module) -> bool:
    """Whether ``module`` is a fake-quantized layer made by :func:`prepare_qat`."""
    return isinstance(module, _QATMixin)


def find_conv_bn_pairs(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Conv name -> BatchNorm name for each chosen conv whose next sibling (same parent) is a matching BN.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
        >>> find_conv_bn_pairs(net, ["0", "3"])
        {'0': '1'}
    """
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for name in names:
        conv = modules[name]
        base = next((b for b in _BN_FOR if isinstance(conv, b)), None)
        if base is None:
            continue
        parent_name, _, child = name.rpartition(".")
        children = list(modules[parent_name]._modules.items())
        idx = [k for k, _ in children].index(child)
        if idx + 1 < len(children):
            nxt_name, nxt = children[idx + 1]
            if isinstance(nxt, _BN_FOR[base]) and nxt.num_features == conv.out_channels and nxt.track_running_stats:
                pairs[name] = f"{parent_name}.{nxt_name}" if parent_name else nxt_name
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _swap_class(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` instance sharing ``module``'s parameters, buffers, children and hooks.

    The one place that copies ``nn.Module`` internals (``__dict__``, ``_parameters``/``_buffers``/``_modules``):
    torch has no public way to change a module's class while keeping the same ``Parameter`` objects (which the
    optimizer and other callbacks hold) and its hooks.
    """
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = dict(module.__dict__[key])
    return new


def prepare_qat(
    model: nn.Module, names: Iterable[str], config: QuantConfig, bn_pairs: Mapping[str, str] | None = None
) -> None:
    """Replace the layers ``names`` of ``model`` by fake-quantized ones, in place (idempotent).

    Args:
        model: the model.
        names: fully-qualified names of ``Linear``/``Conv{1,2,3}d`` layers (exactly those types).
        config: the quantization settings.
        bn_pairs: conv name -> name of the BatchNorm to fold into it (see :func:`find_conv_bn_pairs`).

    Raises:
        ValueError: a layer is not exactly one of the supported types (a subclass may have its own forward).
    """
    bn_pairs = dict(bn_pairs or {})
    names = list(names)
    for name in names:
        _check_layer(name, model.get_submodule(name), config)
    for name in names:
        module = model.get_submodule(name)
        if is_qat_module(module):
            continue
        new = _swap_class(module, QAT_CLASSES[type(module)])
        channels, fan_in = module.weight.shape[0], module.weight[0].numel()
        new.weight_quant = WeightFakeQuantize(config, channels, fan_in).to(module.weight.device)
        new.input_quant = None
        if config.activation_bits:
            new.input_quant = ActivationFakeQuantize(
                config.activation_bits, dynamic=config.dynamic, scheme=config.scheme,
                granularity=config.activation_granularity, mx_scale=config.mx_scale).to(module.weight.device)
        if config.smooth_quant is not None and isinstance(new, QATLinear):
            new.smoothing = InputSmoothing(module.in_features, config.smooth_quant).to(module.weight.device)
        if name in bn_pairs:
            new.__dict__["_bn"] = model.get_submodule(bn_pairs[name])
            new.__dict__["_bn_name"] = bn_pairs[name]
        _set_submodule(model, name, new)


def _check_layer(name: str, module: nn.Module, config: QuantConfig) -> None:
    """Raise ``ValueError`` naming ``name`` if ``config`` cannot quantize ``module``."""
    if is_qat_module(module):
        return
    if type(module) not in QAT_CLASSES:
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}; quantization-aware training supports exactly "
            f"{[t.__name__ for t in QAT_CLASSES]} (not subclasses, whose forward it would replace)"
        )
    c = config
    new_kind = c.per_group or c.is_fp8 or c.is_mx or c.dynamic
    if new_kind and type(module) is not nn.Linear:
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}: `scheme`={c.scheme!r}, `granularity`={c.granularity!r}, "
            f"`dynamic`={c.dynamic} quantize Linear layers only; leave it out with `exclude`"
        )
    k = module.weight.shape[1]
    if c.per_group and k % c.group_size:
        raise ValueError(f"layer {name!r}: `group_size`={c.group_size} does not divide its in_features={k}")
    if c.is_mx and k % ff.MX_BLOCK:
        raise ValueError(f"layer {name!r}: `scheme`={c.scheme!r} needs in_features divisible by {ff.MX_BLOCK}, got {k}")


def set_qat_flags(model: nn.Module, fake_quant: bool | None = None, observe: bool | None = None) -> None:
    """Turn fake quantization and/or observers on or off in every quantizer of ``model``."""
    for m in model.modules():
        if isinstance(m, (WeightFakeQuantize, ActivationFakeQuantize)):
            if fake_quant is not None:
                m.fake_quant_enabled.fill_(int(fake_quant))
            if observe is not None:
                m.observer_enabled.fill_(int(observe))
