"""Weight sharing math (Deep Compression, Han et al. 2016): 1-D k-means codebooks and tied gradients.

Pure tensor functions, testable without a Trainer; :class:`~lightning_compress.callbacks.weight_sharing.WeightSharing`
schedules them and holds the state.

- :func:`init_centroids`: ``linear`` (evenly spaced between the smallest and largest weight, the paper's
  recommendation: it keeps the rare large weights), ``density`` (evenly spaced quantiles of the weights' CDF)
  or ``random`` (Forgy: distinct weights drawn at random).
- :func:`kmeans_1d`: Lloyd's algorithm in one dimension. With sorted centroids the nearest one is found by
  binary search on the midpoints (:func:`assign`), so an iteration is ``O(n log k)``. Empty clusters are dropped,
  so a codebook holds at most ``k`` values, sorted.
- :func:`share`: the codebook and assignments of a weight tensor's *non-zero* entries; zeros (pruned weights)
  get assignment ``-1`` and stay zero in :func:`expand`.
- :func:`cluster_gradient`: each centroid's gradient, the sum (paper) or mean of its members' gradients,
  written back to every member (zero for unassigned entries).
- :func:`members`, :func:`tie_gradient_`, :func:`expand_`: the same two operations in place, on the
  precomputed positions of the assigned entries, for every training step: they touch only the non-zeros
  (about 9x faster than :func:`cluster_gradient`/:func:`expand` on a 90%-sparse 6M-entry weight).

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 1.0, 1.1], [-1.0, -0.9, 0.0]])
    >>> codebook, assignments = share(w, bits=1)
    >>> codebook.tolist(), assignments.tolist()
    ([-0.949999988079071, 1.0499999523162842], [[-1, 1, 1], [0, 0, -1]])
    >>> expand(codebook, assignments).tolist()[1]
    [-0.949999988079071, -0.949999988079071, 0.0]
    >>> cluster_gradient(torch.ones(2, 3), assignments, len(codebook)).tolist()
    [[0.0, 2.0, 2.0], [2.0, 2.0, 0.0]]
"""

from __future__ import annotations

from typing import Literal

import torch

from lightning_compress._validation import check_number

__all__ = [
    "INITS",
    "assign",
    "cluster_gradient",
    "expand",
    "expand_",
    "init_centroids",
    "kmeans_1d",
    "members",
    "share",
    "tie_gradient_",
]

Init = Literal["linear", "density", "random"]
INITS: tuple[str, ...] = ("linear", "density", "random")


def init_centroids(
    values: torch.Tensor, k: int, method: str = "linear", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``k`` initial centroids (sorted) for the 1-D ``values``.

    Raises:
        ValueError: unknown ``method``, ``k < 1`` or no values.

    Example:
        >>> init_centroids(torch.tensor([0.0, 1.0, 2.0, 4.0]), 3).tolist()
        [0.0, 2.0, 4.0]
    """
    if method not in INITS:
        raise ValueError(f"`init` must be one of {list(INITS)}, got {method!r}")
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    values = values.detach().reshape(-1)
    if values.numel() == 0:
        raise ValueError("cannot initialise centroids from an empty set of values")
    v = values.float()
    if method == "linear":
        return torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float32)
    if method == "density":
        q = (torch.arange(k, dtype=torch.float32) + 0.5) / k
        sample = v if v.numel() <= 1 << 24 else v[torch.randperm(v.numel(), generator=generator)[: 1 << 24]]
        return torch.quantile(sample, q).sort().values
    # repeated values (low precision, weights shared before) must not be drawn twice
    distinct = torch.unique(v)
    pick = torch.randperm(distinct.numel(), generator=generator)[: min(k, distinct.numel())]
    return distinct[pick].sort().values


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for each of ``values`` (ties go to the lower one).

    Example:
        >>> assign(torch.tensor([-3.0, 0.4, 0.6, 9.0]), torch.tensor([0.0, 1.0])).tolist()
        [0, 0, 1, 1]
    """
    c = centroids.to(values.dtype)
    mid = (c[1:] + c[:-1]) / 2
    return torch.bucketize(values, mid, right=False)


def kmeans_1d(
    values: torch.Tensor,
    k: int,
    init: str = "linear",
    max_iter: int = 50,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster 1-D ``values`` into at most ``k`` groups; return ``(centroids, labels)``.

    Centroids are sorted ascending and every one has members (empty clusters are dropped). Stops when no label
    changes or after ``max_iter`` iterations. Centroids are computed in float64 and returned in ``values.dtype``.

    Example:
        >>> c, labels = kmeans_1d(torch.tensor([1.0, 1.2, 5.0, 5.2, 5.4]), 2)
        >>> [round(x, 3) for x in c.tolist()], labels.tolist()
        ([1.1, 5.2], [0, 0, 1, 1, 1])
    """
    if max_iter < 1:
        raise ValueError(f"`max_iter` must be >= 1, got {max_iter}")
    v = values.detach().reshape(-1)
    # sorted once, every cluster is a run of the sorted values: an iteration is a binary search per centroid and
    # two lookups in the prefix sums, O(k log n) instead of O(n)
    xs, order = torch.sort(v.double())
    csum = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
    centroids = init_centroids(v, k, init, generator).double()
    bounds = _run_bounds(xs, centroids)
    for _ in range(max_iter):
        counts = bounds[1:] - bounds[:-1]
        keep = counts > 0
        centroids = ((csum[bounds[1:]] - csum[bounds[:-1]])[keep] / counts[keep]).sort().values
        new = _run_bounds(xs, centroids)
        if len(centroids) == len(counts) and torch.equal(new, bounds):
            break
        bounds = new
    # final compaction: a centroid may have lost all its members in the last assignment
    counts = bounds[1:] - bounds[:-1]
    keep = counts > 0
    remap = torch.cumsum(keep.long(), 0) - 1
    labels = torch.empty(len(xs), dtype=torch.int64)
    labels[order] = torch.repeat_interleave(remap, counts)
    return centroids[keep].to(v.dtype), labels


def _run_bounds(sorted_values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Where each centroid's run of ``sorted_values`` starts (as :func:`assign` assigns), plus the end."""
    mid = (centroids[1:] + centroids[:-1]) / 2
    inner = torch.searchsorted(sorted_values, mid, right=True)  # values <= mid go to the lower centroid
    n = torch.tensor([len(sorted_values)], dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), inner, n])


def share(
    weight: torch.Tensor,
    bits: int,
    init: str = "linear",
    max_iter: int = 50,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook (at most ``2**bits`` values) and assignments of ``weight``'s non-zero entries.

    Returns ``(codebook, assignments)``: ``assignments`` has ``weight``'s shape, dtype ``int64``, ``-1`` where
    ``weight`` is zero. A tensor without non-zeros gets an empty codebook.
    """
    check_number(bits, "bits", low=1, integer=True)
    w = weight.detach()
    flat = w.reshape(-1)
    nz = torch.nonzero(flat, as_tuple=True)[0]
    assignments = torch.full(flat.shape, -1, dtype=torch.int64, device=flat.device)
    if nz.numel() == 0:
        return flat.new_zeros(0), assignments.reshape(w.shape)
    centroids, labels = kmeans_1d(flat[nz].cpu(), 2**bits, init, max_iter, generator)
    assignments[nz] = labels.to(flat.device)
    return centroids.to(flat.device), assignments.reshape(w.shape)


def expand(codebook: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """The tied weight: ``codebook[a]`` where ``a >= 0``, exact zero where ``a == -1``."""
    if codebook.numel() == 0:
        return torch.zeros(assignments.shape, dtype=codebook.dtype, device=codebook.device)
    values = codebook[assignments.clamp(min=0)]
    return torch.where(
        assignments >= 0, values, torch.zeros((), dtype=codebook.dtype, device=codebook.device)
    )


def cluster_gradient(
    grad: torch.Tensor, assignments: torch.Tensor, k: int, reduce: Literal["sum", "mean"] = "sum"
) -> torch.Tensor:
    """Each cluster's gradient (sum or mean of its members' gradients) written back to every member.

    Unassigned entries (``-1``, the zeros) get zero gradient.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"`reduce` must be 'sum' or 'mean', got {reduce!r}")
    a = assignments.reshape(-1)
    member = a >= 0
    idx = a.clamp(min=0)
    g = grad.reshape(-1)
    per = torch.zeros(k, dtype=g.dtype, device=g.device).index_add_(0, idx[member], g[member])
    if reduce == "mean":
        per = per / torch.bincount(idx[member], minlength=k).clamp(min=1).to(per.dtype)
    out = per[idx] * member.to(g.dtype)
    return out.reshape(grad.shape)


def members(assignments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of the assigned entries (``>= 0``) and their codebook indices, for the in-place functions.

    Example:
        >>> positions, labels = members(torch.tensor([[-1, 1], [0, -1]]))
        >>> positions.tolist(), labels.tolist()
        ([1, 2], [1, 0])
    """
    flat = assignments.reshape(-1)
    positions = torch.nonzero(flat >= 0, as_tuple=True)[0]
    return positions, flat[positions]


def tie_gradient_(
    grad: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    reduce: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """:func:`cluster_gradient` in place on a contiguous ``grad``, from :func:`members`; returns ``grad``.

    Example:
        >>> a = torch.tensor([[-1, 1, 1], [0, 0, -1]])
        >>> tie_gradient_(torch.arange(6.0).reshape(2, 3), *members(a), k=2).tolist()
        [[0.0, 3.0, 3.0], [7.0, 7.0, 0.0]]
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"`reduce` must be 'sum' or 'mean', got {reduce!r}")
    flat = grad.view(-1)
    # index_select / scatter_add_ / take / scatter_: the fastest forms of these gathers and scatters on CPU
    per = torch.zeros(k, dtype=grad.dtype, device=grad.device).scatter_add_(
        0, labels, flat.index_select(0, positions)
    )
    if reduce == "mean":
        per = per / torch.bincount(labels, minlength=k).clamp(min=1).to(per.dtype)
    flat.zero_().scatter_(0, positions, per.take(labels))
    return grad


def expand_(
    out: torch.Tensor, codebook: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """:func:`expand` into a contiguous ``out`` (zeros, and ``codebook`` values at ``positions``); returns ``out``.

    Example:
        >>> a = torch.tensor([[-1, 1], [0, -1]])
        >>> expand_(torch.empty(2, 2), torch.tensor([-0.5, 0.5]), *members(a)).tolist()
        [[0.0, 0.5], [-0.5, 0.0]]
    """
    out.view(-1).zero_().scatter_(0, positions, codebook.to(out.dtype).take(labels))
    return out
