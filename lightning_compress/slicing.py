"""Slicing channels out of modules: the indices each module keeps for a choice of channels per group of a
:class:`~lightning_compress.graph.ChannelGraph` (:func:`index_plan`), and the modules cut to them
(:func:`slice_modules`). Used by the structured exporters (``thin``, ``slice_width``, ``scale``) and, for the
indices, by ``SlimmableTraining``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_compress.graph import analyze
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> plan = index_plan(analyze(net), {0: torch.tensor([1, 5])})
    >>> plan["2"].inputs
    tensor([1, 5])
    >>> slice_modules(net, plan); net[0].out_features, net[2].in_features
    (2, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_compress.graph import ChannelGraph, Segments

__all__ = ["ModuleIndex", "index_plan", "slice_modules"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class ModuleIndex:
    """Channels one module keeps: ``outputs`` (producer/BatchNorm) and ``inputs`` (consumer); ``None`` = all."""

    outputs: torch.Tensor | None = None
    inputs: torch.Tensor | None = None


def _segment_index(
    cg: ChannelGraph, segments: Segments, keep: dict[int, torch.Tensor]
) -> torch.Tensor | None:
    parts, offset, changed = [], 0, False
    for g, size in segments:
        idx = keep.get(cg.root(g))
        changed = changed or idx is not None
        parts.append(torch.arange(size) if idx is None else idx.long() + 0)
        parts[-1] = parts[-1] + offset
        offset += size
    return torch.cat(parts) if changed else None


def index_plan(cg: ChannelGraph, keep: dict[int, torch.Tensor]) -> dict[str, ModuleIndex]:
    """Per module, the channel indices it keeps when each group ``g`` keeps ``keep[g]`` (sorted, by root group).

    Groups missing from ``keep`` keep all their channels; pinned groups must not be in it.
    """
    for g in keep:
        reason = cg.pin_reason(g)
        if reason is not None:
            raise ValueError(f"group {g} may not change: it {reason}")
    keep = {cg.root(g): idx for g, idx in keep.items()}
    plan: dict[str, ModuleIndex] = {}
    for name, g in cg.producers.items():
        plan.setdefault(name, ModuleIndex()).outputs = keep.get(cg.root(g))
    for name, segments in cg.followers.items():
        plan.setdefault(name, ModuleIndex()).outputs = _segment_index(cg, segments, keep)
    for name, consumer in cg.consumers.items():
        idx = _segment_index(cg, consumer.segments, keep)
        if idx is not None and consumer.spatial > 1:
            idx = (idx[:, None] * consumer.spatial + torch.arange(consumer.spatial)[None, :]).reshape(-1)
        plan.setdefault(name, ModuleIndex()).inputs = idx
    return {n: p for n, p in plan.items() if p.outputs is not None or p.inputs is not None}


@torch.no_grad()
def slice_modules(model: nn.Module, plan: dict[str, ModuleIndex]) -> None:
    """Physically keep only the planned channels of each module of ``model`` (in place, same classes)."""
    modules = dict(model.named_modules())
    for name, idx in plan.items():
        module = modules[name]
        if isinstance(module, _NORMS):
            if idx.outputs is None:
                continue
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _select(module, attr, idx.outputs, 0)
            module.num_features = len(idx.outputs)
            continue
        if idx.outputs is not None:
            _select(module, "weight", idx.outputs, 0)
            _select(module, "bias", idx.outputs, 0)
        if idx.inputs is not None:
            _select(module, "weight", idx.inputs, 1)
        out_size, in_size = module.weight.shape[0], module.weight.shape[1]
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = out_size, in_size
        else:
            module.out_channels, module.in_channels = out_size, in_size


def _select(module: nn.Module, attr: str, idx: torch.Tensor, dim: int) -> None:
    value = getattr(module, attr, None)
    if value is None:
        return
    new = value.detach().index_select(dim, idx.to(value.device)).clone()
    if isinstance(value, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=value.requires_grad))
    else:
        setattr(module, attr, new)
