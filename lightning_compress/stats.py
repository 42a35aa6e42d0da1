"""Counting what a model holds: sparsity, non-zeros and bytes, straight from its tensors.

Everything here reads the weights themselves, so it is right whatever made them sparse or small
(this package's callbacks, ``torch.nn.utils.prune``, Lightning's ``ModelPruning``, or a hand edit).

The compressed size is an estimate of a simple, real storage format: each layer weight is stored
either densely at its bit width, or as a one-bit-per-entry occupancy bitmap plus its non-zero values
at that bit width, whichever is smaller; every other tensor (biases, norms) densely at its bit width.
Exporters write their own artefacts; their exact byte counts are what the benchmarks report.

Sharded parameters (FSDP2 ``DTensor``) are counted whole: each rank counts the non-zeros of its piece and the
counts are summed over the shards (:func:`nonzero_counts`), so the figures equal the one-process ones. That makes
:func:`layer_stats` and :func:`model_stats` collectives for a sharded model: call them from every rank.

Example:
    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(10, 10, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.zero_(); lin.weight[0, :5] = 1.0
    >>> s = layer_stats(nn.Sequential(lin))
    >>> s[0].name, s[0].numel, s[0].nonzero, s[0].sparsity
    ('0', 100, 5, 0.95)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_compress import _sharding

__all__ = ["LayerStats", "ModelStats", "layer_stats", "model_stats", "nonzero_counts", "weight_storage_bytes"]


@dataclass(frozen=True)
class LayerStats:
    """Counts for one layer's ``weight``: ``name`` is the module's fully-qualified name."""

    name: str
    numel: int
    nonzero: int
    bits: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class ModelStats:
    """Counts for a whole model's parameters (layer weights also listed per layer); buffers are not counted.

    ``dense_fp32_bytes`` is the model as it was before compression: factorized layers count as the layers they
    replaced.
    """

    layers: tuple[LayerStats, ...]
    total_params: int
    nonzero_params: int
    dense_fp32_bytes: int
    compressed_bytes: int

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all layer weights (the tensors pruning acts on)."""
        total = sum(layer.numel for layer in self.layers)
        nz = sum(layer.nonzero for layer in self.layers)
        return 1.0 - nz / total if total else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.dense_fp32_bytes / self.compressed_bytes if self.compressed_bytes else float("inf")


def _layer_weights(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(module name, parameter fqn, tensor) of every module's ``weight`` with at least 2 dims, each tensor once."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and id(w) not in seen:
            seen.add(id(w))
            out.append((name, f"{name}.weight" if name else "weight", w))
    return out


def weight_storage_bytes(numel: int, nonzero: int, bits: int) -> int:
    """Bytes to store a tensor densely or as bitmap + non-zero values at ``bits``, whichever is smaller.

    Example:
        >>> weight_storage_bytes(1000, 1000, 32), weight_storage_bytes(1000, 10, 32)
        (4000, 165)
    """
    dense = math.ceil(numel * bits / 8)
    sparse = math.ceil(numel / 8) + math.ceil(nonzero * bits / 8)
    return min(dense, sparse)


def layer_stats(model: nn.Module, bits: Mapping[str, int] | None = None) -> list[LayerStats]:
    """Per-layer counts for every module ``weight`` with at least 2 dimensions.

    ``bits`` maps a parameter's fully-qualified name (``"fc1.weight"``) to its storage bit width
    (default: the tensor's own element size).
    """
    return _layer_stats(_layer_weights(model), bits or {})


def nonzero_counts(tensors: list[torch.Tensor]) -> list[int]:
    """Non-zeros of each tensor, whole: a sharded tensor's pieces are counted where they are and the counts summed
    over the shards in one all-reduce per process group (every rank must call it with the same tensors).

    Example:
        >>> nonzero_counts([torch.tensor([0.0, 1.0]), torch.eye(3)])
        [1, 3]
    """
    with torch.no_grad():
        counts = [int(torch.count_nonzero(_sharding.local(t).detach())) for t in tensors]
    groups: dict[object, list[int]] = {}
    for i, t in enumerate(tensors):
        if _sharding.group_of(t) is not None:
            groups.setdefault(_sharding.group_of(t), []).append(i)
    for members in groups.values():
        total = _sharding.all_reduce(torch.tensor([counts[i] for i in members], dtype=torch.int64), tensors[members[0]])
        for i, c in zip(members, total.tolist(), strict=True):
            counts[i] = int(c)
    return counts


def _layer_stats(weights: list[tuple[str, str, torch.Tensor]], bits: Mapping[str, int]) -> list[LayerStats]:
    counts = nonzero_counts([w for _, _, w in weights])
    return [
        LayerStats(name, w.numel(), nz, int(bits.get(fqn, w.element_size() * 8)))
        for (name, fqn, w), nz in zip(weights, counts, strict=True)
    ]


def model_stats(model: nn.Module, bits: Mapping[str, int] | None = None) -> ModelStats:
    """Counts for the whole model: see :class:`ModelStats`. ``bits`` as in :func:`layer_stats`.

    Layer weights count whether they are parameters or not: a layer converted to integers keeps its weight codes
    (and bias) in buffers, exposed as ``weight``/``bias`` properties, and is counted as the layer it stands for.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[:4] = 0  # half of the first layer's weights
        >>> stats = model_stats(net)
        >>> stats.total_params, stats.nonzero_params, round(stats.sparsity, 3)
        (58, 42, 0.333)
    """
    bits = bits or {}
    # one call: a property returns a new tensor each time, and the ids below must stay valid
    weights = _layer_weights(model)
    layers = _layer_stats(weights, bits)
    total = sum(layer.numel for layer in layers)
    nonzero = sum(layer.nonzero for layer in layers)
    compressed = sum(weight_storage_bytes(layer.numel, layer.nonzero, layer.bits) for layer in layers)
    seen = {id(w) for _, _, w in weights}
    extra: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    for name, fqn, w in weights:  # the bias of a layer whose weight is not a parameter is not one either
        bias = getattr(model.get_submodule(name), "bias", None) if not isinstance(w, nn.Parameter) else None
        if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
            extra.append((fqn.removesuffix("weight") + "bias", bias))
    rest = []
    for fqn, p in extra:
        if id(p) not in seen:
            seen.add(id(p))
            rest.append((fqn, p))
    for (fqn, p), nz in zip(rest, nonzero_counts([p for _, p in rest]), strict=True):
        total += p.numel()
        nonzero += nz
        compressed += math.ceil(p.numel() * int(bits.get(fqn, p.element_size() * 8)) / 8)
    return ModelStats(tuple(layers), total, nonzero, 4 * (total + _grown_by_compression(model)), compressed)


def _grown_by_compression(model: nn.Module) -> int:
    """Parameters a model had before structural compression minus those it has now: a layer that stands for a
    bigger one (a factorized layer) tells the size of the original with a ``dense_numel`` attribute."""
    extra = 0
    for module in model.modules():
        dense = getattr(module, "dense_numel", None)
        if isinstance(dense, int):
            extra += dense - sum(p.numel() for p in module.parameters())
    return extra
