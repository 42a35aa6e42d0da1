"""Quantizer state of fake-quantized layers whose parameters are sharded (FSDP2 ``DTensor``, rows split ``Shard(0)``).

Under Lightning's ``ModelParallelStrategy`` a fake-quantized ``Linear`` is an ``nn.Linear`` subclass, so the user's
``fully_shard`` loop in ``configure_model`` shards it like any other layer: its ``weight``, ``bias`` and, with
``learn_scale``, the LSQ step ``weight_quant.scale`` become ``DTensor`` row pieces; the quantizer's buffers (steps,
zero points, observed input ranges) stay plain, full-size tensors on every rank. Inside ``forward`` FSDP2 has
gathered the full parameters, so the weight observer sees the whole weight as in one process. What differs:

- the layer *inputs* on each rank are that rank's part of the batch: :func:`reduce_input_range` takes the min/max
  over the ranks (a 2-element all-reduce), so every rank holds the range one process would observe on the whole
  batch, and the input quantizer is the same on every rank;
- a learned (LSQ) step written inside ``forward`` would land in FSDP2's temporary unsharded copy and be lost, so
  its one-time initialisation runs outside ``forward`` (:func:`observe_weights`), from each rank's piece: ranges
  per output channel or per group of inputs are local (a rank holds whole rows), per-tensor sums/min/max are
  all-reduced; the result is written to the rank's piece of the parameter (or the full buffer).

:func:`observe_weights` is also the "one observer update" of a whole model: one pass per layer, reductions only
(per-layer temporaries at most: no copy of all the weights at once).

Example:
    >>> from torch import nn
    >>> from lightning_compress.layers.quantization import QuantConfig, prepare_qat
    >>> net = nn.Sequential(nn.Linear(4, 3))
    >>> prepare_qat(net, ["0"], QuantConfig(weight_bits=8, activation_bits=None, granularity="per_tensor"))
    >>> observe_weights(net)
    1
    >>> bool(torch.allclose(net[0].weight_quant.scale * 127, net[0].weight.abs().max()))
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_compress import _sharding as sh
from lightning_compress.functional import formats as ff
from lightning_compress.functional import quantization as qf

__all__ = ["attach_input_groups", "check_tensor_parallel", "gathered", "observe_weight", "observe_weights", "reduce_input_max", "reduce_input_range", "tensor_range"]

_GROUP_KEY = "_lc_input_group"  # on an ActivationFakeQuantize's __dict__: the process group its inputs are split over


def tensor_range(piece: torch.Tensor, like: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of the full tensor whose rank-local piece is ``piece`` (laid out like ``like``), per output
    channel (dim 0, shape ``(C,)``) or per tensor (shape ``(1,)``), the same on every rank.

    Per channel each rank reduces its own rows and the ``C``-vectors are gathered; per tensor the scalars are
    all-reduced (min/max). A plain ``like`` (one process, DDP) reduces ``piece`` alone.

    Example:
        >>> w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
        >>> tensor_range(w, w, per_channel=True), tensor_range(w, w, per_channel=False)
        ((tensor([-2.0000,  0.5000]), tensor([1., 3.])), (tensor([-2.]), tensor([3.])))
    """
    x = piece.detach()
    if per_channel and x.dim() > 1:
        rows = x.reshape(x.shape[0], -1)
        lo, hi = torch.aminmax(rows, dim=1) if rows.numel() else (rows.new_zeros(x.shape[0]),) * 2
        return sh.full(lo.float(), like), sh.full(hi.float(), like)
    if x.numel():
        lo, hi = torch.aminmax(x.reshape(-1))
    else:  # a rank holding no rows (fewer rows than ranks)
        lo, hi = x.new_tensor(math.inf), x.new_tensor(-math.inf)
    return sh.all_reduce(lo.reshape(1).float(), like, "min"), sh.all_reduce(hi.reshape(1).float(), like, "max")


def _abs_stat(piece: torch.Tensor, like: torch.Tensor, per_channel: bool, kind: str) -> torch.Tensor:
    """Mean (``kind="mean"``) or max (``"max"``) of ``|x|`` over the full tensor, per channel or per tensor; a
    reduction kernel, no ``|x|`` temporary."""
    x = piece.detach().float()
    order = 1 if kind == "mean" else math.inf
    if per_channel and x.dim() > 1:
        rows = x.reshape(x.shape[0], -1)
        stat = torch.linalg.vector_norm(rows, order, dim=1) if rows.numel() else rows.new_zeros(x.shape[0])
        return sh.full(stat / (rows.shape[1] if kind == "mean" else 1), like)
    stat = torch.linalg.vector_norm(x.reshape(-1), order).reshape(1) if x.numel() else x.new_zeros(1)
    stat = sh.all_reduce(stat, like, "sum" if kind == "mean" else "max")
    return stat / like.numel() if kind == "mean" else stat


def _uniform(
    piece: torch.Tensor, like: torch.Tensor, per_channel: bool, bits: int, symmetric: bool, lsq: bool,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max step and zero point (:func:`qf.uniform_qparams`, on the grid ``full_range`` says), with LSQ's
    initial step ``2 * mean|x| / sqrt(qmax)`` in place of the step when ``lsq``, over the full tensor."""
    lo, hi = tensor_range(piece, like, per_channel)
    scale, zp = qf.range_qparams(lo, hi, bits, symmetric, full_range)
    if lsq:
        _, qmax = qf.int_range(bits, symmetric)
        scale = (2.0 * _abs_stat(piece, like, per_channel, "mean") / math.sqrt(qmax)).clamp(min=1e-8)
    return scale, zp


def _store(target: torch.Tensor, full_value: torch.Tensor) -> None:
    """Write ``full_value`` into ``target``: all of it into a plain buffer, this rank's rows into a sharded one."""
    if sh.is_sharded(target):
        sh.local(target).copy_(sh.local_like(full_value.reshape(target.shape), target))
    else:
        target.copy_(full_value.reshape(target.shape))


def _local_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(piece, like)``: this rank's rows of the weight the quantizer sees (times a folded BatchNorm's factor)."""
    w = layer.weight
    piece = sh.local(w).detach()
    bn = layer.__dict__.get("_bn")
    if bn is not None:
        start, stop = sh.rows_of(w)
        var = bn.running_var[start:stop]
        gamma = sh.local(bn.weight).detach() if bn.weight is not None else torch.ones_like(var)
        piece = piece * (gamma / torch.sqrt(var + bn.eps)).reshape([-1] + [1] * (piece.dim() - 1))
    return piece, w


@torch.no_grad()
def observe_weight(quantizer: nn.Module, piece: torch.Tensor, like: torch.Tensor) -> None:
    """Set the grid of a ``WeightFakeQuantize`` from the full weight whose local piece is ``piece`` (laid out like
    ``like``): min/max steps and zero points, power-of-two tops, fp8 amax scales or LSQ initial steps, computed
    as :meth:`WeightFakeQuantize._observe` computes them on the full weight. Collective when ``like`` is sharded."""
    c = quantizer.config
    per_channel, full = c.per_channel, bool(quantizer.full_range)
    if c.is_mx:  # scales are computed per block as it is quantized: nothing stored
        pass
    elif c.scheme == "power_of_two":
        _store(quantizer.scale, _abs_stat(piece, like, per_channel, "max").clamp(min=1e-12))
    elif c.is_fp8:
        amax = _abs_stat(piece, like, per_channel, "max")
        _store(quantizer.scale, (amax / ff.ELEMENTS[c.scheme].max_value).clamp(min=1e-12))
    elif c.per_group:  # every rank holds whole rows, so whole groups: computed locally, then gathered
        groups = piece.detach().reshape(-1, c.group_size)
        scale, zp = _uniform(groups, groups, True, c.weight_bits, c.symmetric, c.learn_scale, full)
        shape = (piece.shape[0], piece.shape[1] // c.group_size)
        _store(quantizer.scale, sh.full(scale.reshape(shape), like))
        _store(quantizer.zero_point, sh.full(zp.reshape(shape), like))
    else:
        scale, zp = _uniform(piece, like, per_channel, c.weight_bits, c.symmetric, c.learn_scale, full)
        _store(quantizer.scale, scale)
        _store(quantizer.zero_point, zp)
    quantizer.initialized.fill_(1)


def observe_weights(model: nn.Module, uninitialized_only: bool = False) -> int:
    """One weight-observer update of every fake-quantized layer of ``model`` (sharded or not); returns how many.

    Each layer is reduced in turn (extra memory: one layer's temporaries at most, none for per-tensor and
    per-channel min/max). ``uninitialized_only``: only quantizers that have not set their grid yet (an LSQ step's
    one-time initialisation). Under FSDP2 every rank must call it (it all-reduces).
    """
    from lightning_compress.layers.quantization import is_qat_module

    count = 0
    for layer in model.modules():
        if is_qat_module(layer) and not (uninitialized_only and bool(layer.weight_quant.initialized)):
            observe_weight(layer.weight_quant, *_local_weight(layer))
            count += 1
    return count


def attach_input_groups(model: nn.Module, owner: str, data_parallel: bool = False) -> int:
    """Let each input quantizer of a sharded fake-quantized layer of ``model`` reduce its observed range over the
    processes its layer is sharded over, and with ``data_parallel`` (DDP: every process sees part of each batch)
    every other input quantizer over all processes, so that the range is the one a single process observes on the
    whole batch. Returns how many sharded layers there are. Raises ``ValueError`` (naming ``owner``) for a layout
    other than row sharding. :func:`detach_input_groups` undoes it."""
    from lightning_compress.layers.quantization import is_qat_module

    count = 0
    world = data_parallel and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for name, layer in model.named_modules():
        if not is_qat_module(layer):
            continue
        if not sh.is_sharded(layer.weight):
            if world and layer.input_quant is not None:
                layer.input_quant.__dict__[_GROUP_KEY] = dist.group.WORLD
            continue
        sh.check_supported(layer.weight, f"{name}.weight", owner)
        if layer.input_quant is not None:
            layer.input_quant.__dict__[_GROUP_KEY] = sh.group_of(layer.weight)
        count += 1
    return count


def detach_input_groups(model: nn.Module) -> None:
    """Input quantizers of ``model`` observe their own process's inputs again (after a fit: no collective in a
    forward that one process may run alone)."""
    for module in model.modules():
        module.__dict__.pop(_GROUP_KEY, None)


def _input_group(quantizer: nn.Module) -> Any:
    """The process group :func:`attach_input_groups` gave ``quantizer``, or ``None`` (not attached / no process group)."""
    return quantizer.__dict__.get(_GROUP_KEY) if dist.is_initialized() else None


def reduce_input_max(quantizer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` reduced by elementwise max over the processes ``quantizer`` was attached to by
    :func:`attach_input_groups` (``t`` itself otherwise)."""
    group = _input_group(quantizer)
    if group is None:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def reduce_input_range(quantizer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of one batch, reduced (min, max) over the processes ``quantizer`` was attached to by
    :func:`attach_input_groups` (unchanged otherwise)."""
    if _input_group(quantizer) is None:
        return lo, hi
    both = reduce_input_max(quantizer, torch.cat([-lo.reshape(1), hi.reshape(1)]))  # one all-reduce for both ends
    return -both[:1], both[1:]


def _unwrapped_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` as its own class (not FSDP2's ``FSDP<Class>`` wrapper class, whose hooks and
    ``__new__`` belong to the sharded original)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without distributed support
        FSDPModule = ()  # type: ignore[assignment,misc]  # noqa: N806
    cls = next(c for c in type(module).__mro__ if not (FSDPModule and issubclass(c, FSDPModule)))
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _plain(module: nn.Module) -> nn.Module:
    """``module``, or a shallow copy of it whose sharded parameters are full plain tensors (an all-gather each)."""
    params = module.__dict__["_parameters"]
    if not any(sh.is_sharded(p) for p in params.values() if p is not None):
        return module
    new = _unwrapped_copy(module)
    new.__dict__["_parameters"] = {
        k: (p.detach().full_tensor() if sh.is_sharded(p) else p) for k, p in params.items()
    }
    return new


@torch.no_grad()
def gathered(layer: nn.Module) -> nn.Module:
    """A fake-quantized ``layer`` with full tensors, for conversion: ``layer`` itself when nothing in it is sharded,
    else a shallow copy (its quantizers' buffers shared, so what conversion observes lands in ``layer``) whose
    weight, bias, LSQ step and folded BatchNorm parameters are gathered from every rank (a collective: every
    rank converts the same layers in the same order). One layer's full weight at a time."""
    wq, bn = layer.weight_quant, layer.__dict__.get("_bn")
    new_wq, new_bn = _plain(wq), (None if bn is None else _plain(bn))
    new = _plain(layer)
    if new is layer and new_wq is wq and new_bn is bn:
        return layer
    if new is layer:
        new = _unwrapped_copy(layer)
    new.__dict__["_modules"] = {**layer.__dict__["_modules"], "weight_quant": new_wq}
    if bn is not None:
        new.__dict__["_bn"] = new_bn
    return new


def check_tensor_parallel(strategy: Any, owner: str) -> None:
    """Raise ``ValueError`` (naming ``owner``) under ``ModelParallelStrategy`` with tensor parallelism: weights split
    by columns or rows outside FSDP2's all-gather, which fake-quantized layers are not made for. The other sharding
    strategies (FSDP1, DeepSpeed) are refused by the callback's declared ``_sharding_refusal`` (see
    :mod:`lightning_compress.callbacks._strategies`)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return
    try:
        mesh = strategy.device_mesh
    except RuntimeError:  # processes not started yet: nothing to check against
        return
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    if tp > 1:
        raise ValueError(
            f"{owner}: cannot run under ModelParallelStrategy with tensor_parallel_size={tp}: tensor parallelism "
            "splits weights outside FSDP2's all-gather. Supported: a single device, DDP, "
            "ModelParallelStrategy(tensor_parallel_size=1) with `fully_shard` (FSDP2) in configure_model"
        )
