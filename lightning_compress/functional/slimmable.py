"""Switchable widths: which channels each layer keeps at a width, and the layers' forward at that width.

At width ``w`` every free channel group (see :mod:`lightning_compress.graph`) keeps its first
``channels_at(w, n)`` channels; pinned groups (the model's inputs and outputs, and tensors that reach an operation
that cannot be sliced) stay full, so the first layer's inputs and the last layer's outputs never change.
The same plan serves the training-time forward (:func:`forward_at`, on the full-size parameters) and the
physical export (:func:`lightning_compress.export.slimmable.slice_width`), so both compute the same function.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_compress.graph import analyze
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> plan = width_plan(analyze(net), 0.5)
    >>> plan["0"].outputs, plan["2"].inputs
    (slice(0, 4, None), slice(0, 4, None))
    >>> forward_at(net[0], torch.zeros(2, 4), plan["0"]).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.graph import ChannelGraph, channels_at
from lightning_compress.slicing import index_plan

__all__ = ["WidthIndex", "forward_at", "width_key", "width_plan"]

Index = slice | torch.Tensor | None


@dataclass
class WidthIndex:
    """Channels a module keeps at one width: ``outputs`` and ``inputs`` as slices or index tensors (``None``: all)."""

    outputs: Index = None
    inputs: Index = None


def _compact(idx: torch.Tensor | None) -> Index:
    if idx is None:
        return None
    if torch.equal(idx, torch.arange(len(idx))):
        return slice(0, len(idx))
    return idx


def keep_first(cg: ChannelGraph, width: float) -> dict[int, torch.Tensor]:
    """Per free group, the indices of its first ``channels_at(width, size)`` channels."""
    return {g: torch.arange(channels_at(width, cg.sizes[g])) for g in cg.free_groups()}


def width_plan(cg: ChannelGraph, width: float) -> dict[str, WidthIndex]:
    """Per module that changes, what it keeps at ``width`` (contiguous ranges become slices)."""
    plan = index_plan(cg, keep_first(cg, width))
    return {n: WidthIndex(_compact(p.outputs), _compact(p.inputs)) for n, p in plan.items()}


def _take(t: torch.Tensor | None, idx: Index, dim: int) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    if isinstance(idx, slice):
        return t[idx] if dim == 0 else t[:, idx]
    return t.index_select(dim, idx.to(t.device))


def forward_at(
    module: nn.Module, x: torch.Tensor, index: WidthIndex, stats: dict[str, Any] | None = None
) -> Any:
    """``module``'s forward using only the channels of ``index``; gradients flow into the full parameters.

    For a ``BatchNorm``, ``stats`` holds this width's own ``running_mean``/``running_var``/``num_batches_tracked``
    (updated in place in training mode, as the module would update its buffers).
    """
    if isinstance(module, nn.Linear):
        weight = _take(_take(module.weight, index.outputs, 0), index.inputs, 1)
        return F.linear(x, weight, _take(module.bias, index.outputs, 0))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        weight = _take(_take(module.weight, index.outputs, 0), index.inputs, 1)
        return module._conv_forward(x, weight, _take(module.bias, index.outputs, 0))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        track = module.track_running_stats and stats is not None
        factor = 0.0 if module.momentum is None else module.momentum
        if module.training and track:
            stats["num_batches_tracked"].add_(1)
            if module.momentum is None:
                factor = 1.0 / float(stats["num_batches_tracked"])
        return F.batch_norm(
            x,
            stats["running_mean"] if track else None,
            stats["running_var"] if track else None,
            _take(module.weight, index.outputs, 0),
            _take(module.bias, index.outputs, 0),
            module.training or not track,
            factor,
            module.eps,
        )
    raise TypeError(f"cannot run {type(module).__name__} at a reduced width")


def fresh_stats(module: nn.Module, channels: int) -> dict[str, torch.Tensor]:
    """New running statistics for ``channels`` channels of BatchNorm ``module`` (mean 0, variance 1).

    They take the device and dtype of the module's own running statistics (``float64`` or ``bfloat16`` under a
    true-precision Trainer), not the default dtype of wherever they are first needed.

    Example:
        >>> stats = fresh_stats(nn.BatchNorm1d(8).double(), 4)
        >>> stats["running_var"].tolist(), stats["running_mean"].dtype
        ([1.0, 1.0, 1.0, 1.0], torch.float64)
    """
    like = module.running_mean if module.running_mean is not None else module.weight
    device = like.device if like is not None else None
    dtype = like.dtype if like is not None else None
    return {
        "running_mean": torch.zeros(channels, device=device, dtype=dtype),
        "running_var": torch.ones(channels, device=device, dtype=dtype),
        "num_batches_tracked": torch.zeros((), dtype=torch.long, device=device),
    }


def channel_count(index: Index, full: int) -> int:
    if index is None:
        return full
    if isinstance(index, slice):
        return len(range(*index.indices(full)))
    return len(index)


def width_key(width: float) -> str:
    """The key of a width's statistics in ``SlimmableTraining``'s state (``"0.5"``)."""
    return str(float(width))
