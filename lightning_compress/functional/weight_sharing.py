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
- :func:`assign_codes`: every value's nearest centroid as ``uint8`` codes, in chunks: 1 byte per value of extra
  memory whatever the size (the assignment step at scale).

**Sharded weights (FSDP2).** Give ``like=`` the sharded parameter and pass its rank-local piece as the values:
:func:`init_centroids`, :func:`kmeans_1d`, :func:`share` and :func:`tie_gradient_` then reduce their statistics
(minimum/maximum, order statistics for ``density``, the distinct values for ``random``, per-centroid sums and
counts, per-cluster gradients) across the shards with :mod:`lightning_compress._sharding`, so every rank gets
the codebook of the whole tensor and the assignments of its own piece. Every rank must make the call (they are
collectives). Codebooks equal the one-process ones up to the float64 summation order of the per-centroid sums.

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
import torch.distributed as dist

from lightning_compress import _sharding
from lightning_compress._validation import check_number

__all__ = [
    "INITS",
    "assign",
    "assign_codes",
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
    values: torch.Tensor,
    k: int,
    method: str = "linear",
    generator: torch.Generator | None = None,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """``k`` initial centroids (sorted) for the 1-D ``values``; ``like``: see the module docstring (sharded).

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
    if _sharding.group_of(like) is not None:
        return _sharded_init(values.float(), k, method, generator, like)
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
    like: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster 1-D ``values`` into at most ``k`` groups; return ``(centroids, labels)``.

    Centroids are sorted ascending and every one has members (empty clusters are dropped). Stops when no label
    changes or after ``max_iter`` iterations. Centroids are computed in float64 and returned in ``values.dtype``.
    ``like``: a sharded parameter whose local piece ``values`` come from: centroids of all pieces, labels of these.

    Example:
        >>> c, labels = kmeans_1d(torch.tensor([1.0, 1.2, 5.0, 5.2, 5.4]), 2)
        >>> [round(x, 3) for x in c.tolist()], labels.tolist()
        ([1.1, 5.2], [0, 0, 1, 1, 1])
    """
    if max_iter < 1:
        raise ValueError(f"`max_iter` must be >= 1, got {max_iter}")
    v = values.detach().reshape(-1)
    # sorted once, every cluster is a run of the sorted values: an iteration is a binary search per centroid and
    # two lookups in the prefix sums, O(k log n) instead of O(n); per-centroid sums and counts are reduced over
    # the shards when ``like`` is sharded (a no-op otherwise)
    xs, order = torch.sort(v.double())
    csum = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
    centroids = init_centroids(v, k, init, generator, like).double()
    bounds = _run_bounds(xs, centroids)
    counts, sums = _cluster_stats(csum, bounds, like)
    for _ in range(max_iter):
        keep = counts > 0
        centroids = (sums[keep] / counts[keep]).sort().values
        new = _run_bounds(xs, centroids)
        new_counts, new_sums = _cluster_stats(csum, new, like)
        if len(centroids) == len(counts) and torch.equal(new_counts, counts):
            break
        bounds, counts, sums = new, new_counts, new_sums
    # final compaction: a centroid may have lost all its members in the last assignment
    keep = counts > 0
    remap = torch.cumsum(keep.long(), 0) - 1
    labels = torch.empty(len(xs), dtype=torch.int64)
    labels[order] = torch.repeat_interleave(remap, bounds[1:] - bounds[:-1])
    return centroids[keep].to(v.dtype), labels


def _cluster_stats(
    csum: torch.Tensor, bounds: torch.Tensor, like: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members and sum of members of each run (float64), over every shard of ``like``."""
    both = torch.cat([(bounds[1:] - bounds[:-1]).double(), csum[bounds[1:]] - csum[bounds[:-1]]])
    if like is not None:
        _sharding.all_reduce(both, like)
    return both.chunk(2)


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
    like: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook (at most ``2**bits`` values) and assignments of ``weight``'s non-zero entries.

    Returns ``(codebook, assignments)``: ``assignments`` has ``weight``'s shape, dtype ``int64``, ``-1`` where
    ``weight`` is zero. A tensor without non-zeros gets an empty codebook. ``like``: the sharded parameter whose
    local piece ``weight`` is (the codebook is then the whole tensor's, the same on every rank).
    """
    check_number(bits, "bits", low=1, integer=True)
    w = weight.detach()
    flat = w.reshape(-1)
    nz = torch.nonzero(flat, as_tuple=True)[0]
    assignments = torch.full(flat.shape, -1, dtype=torch.int64, device=flat.device)
    nonzero = nz.numel()
    if _sharding.group_of(like) is not None:  # every rank decides alike: on the count over all pieces
        nonzero = int(_sharding.all_reduce(torch.tensor([nonzero], dtype=torch.int64), like))
    if nonzero == 0:
        return flat.new_zeros(0), assignments.reshape(w.shape)
    centroids, labels = kmeans_1d(flat[nz].cpu(), 2**bits, init, max_iter, generator, like)
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
    like: torch.Tensor | None = None,
    zero_rest: bool = True,
) -> torch.Tensor:
    """:func:`cluster_gradient` in place on a contiguous ``grad``, from :func:`members`; returns ``grad``.
    ``like``: the sharded parameter whose local gradient piece ``grad`` is (cluster sums over all pieces).
    ``zero_rest=False`` leaves the entries of no cluster (pruned ones) as they are instead of zeroing them.

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
    sharded = _sharding.group_of(like) is not None
    if sharded:
        _sharding.all_reduce(per, like)
    if reduce == "mean":
        counts = torch.bincount(labels, minlength=k)
        per = per / (_sharding.all_reduce(counts, like) if sharded else counts).clamp(min=1).to(per.dtype)
    (flat.zero_() if zero_rest else flat).scatter_(0, positions, per.take(labels))
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


def assign_codes(values: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 1 << 20) -> torch.Tensor:
    """:func:`assign` for every entry of ``values`` (any shape) as ``uint8`` codes (at most 256 sorted centroids),
    ``chunk_size`` entries at a time: the only memory beyond ``values`` is the codes (1 byte per entry) and one
    chunk's indices. The step that maps a whole model onto its codebooks, at any size.

    Example:
        >>> assign_codes(torch.tensor([[-3.0, 0.4], [0.6, 9.0]]), torch.tensor([0.0, 1.0]), chunk_size=3).tolist()
        [[0, 0], [1, 1]]
    """
    if not 1 <= len(centroids) <= 256:
        raise ValueError(f"`centroids` must hold 1 to 256 values for uint8 codes, got {len(centroids)}")
    check_number(chunk_size, "chunk_size", low=1, integer=True)
    flat = values.detach().reshape(-1)
    c = centroids.to(flat.device, flat.dtype)
    mid = (c[1:] + c[:-1]) / 2
    codes = torch.empty(flat.shape, dtype=torch.uint8, device=flat.device)
    for start in range(0, flat.numel(), chunk_size):
        stop = start + chunk_size
        codes[start:stop] = torch.bucketize(flat[start:stop], mid, right=False)
    return codes.reshape(values.shape)


# -- sharded statistics (FSDP2): exact over all pieces, each rank holding only its own ---------------------------


def _sharded_init(
    v: torch.Tensor, k: int, method: str, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """:func:`init_centroids` over the pieces of ``like``; ``v``: this rank's (float32, possibly empty)."""
    if method == "linear":
        lo = _sharding.all_reduce(v.min().reshape(1) if v.numel() else torch.tensor([float("inf")]), like, "min")
        hi = _sharding.all_reduce(v.max().reshape(1) if v.numel() else torch.tensor([float("-inf")]), like, "max")
        if not torch.isfinite(lo).all():
            raise ValueError("cannot initialise centroids from an empty set of values")
        return torch.linspace(float(lo), float(hi), k, dtype=torch.float32)
    if method == "density":  # exact quantiles of all pieces (torch.quantile's linear interpolation)
        n = int(_sharding.all_reduce(torch.tensor([v.numel()], dtype=torch.int64), like))
        if n == 0:
            raise ValueError("cannot initialise centroids from an empty set of values")
        pos = (torch.arange(k, dtype=torch.float32) + 0.5) / k * (n - 1)  # as torch.quantile computes them
        lower, upper = pos.long(), pos.ceil().long()
        stats = _order_statistics(v, torch.cat([lower, upper]), like)
        return torch.lerp(stats[:k], stats[k:], pos - lower).sort().values
    distinct = _sharded_unique(v, like)  # random: the distinct values of all pieces, drawn as one process would
    if distinct.numel() == 0:
        raise ValueError("cannot initialise centroids from an empty set of values")
    pick = torch.randperm(distinct.numel(), generator=generator)[: min(k, distinct.numel())]
    return distinct[pick].sort().values


def _ordered_keys(v: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 values that sort as the values do (IEEE bits, negatives flipped)."""
    bits = v.float().contiguous().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _order_statistics(v: torch.Tensor, ranks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The values at 0-based ``ranks`` of all pieces sorted: bisection on the float32 keys, each step one
    all-reduce of a count per rank asked (32 steps), no piece leaving its process."""
    keys = _ordered_keys(v).sort().values
    lo = torch.full(ranks.shape, -(1 << 31), dtype=torch.int64)
    hi = torch.full(ranks.shape, (1 << 31) - 1, dtype=torch.int64)
    while bool((lo < hi).any()):  # the same on every rank: the counts are reduced
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        below = _sharding.all_reduce(torch.searchsorted(keys, mid, right=True), like)
        enough = below >= ranks + 1
        hi, lo = torch.where(enough, mid, hi), torch.where(enough, lo, mid + 1)
    bits = torch.where(lo < 0, lo ^ 0x7FFFFFFF, lo).to(torch.int32)
    return bits.view(torch.float32)


def _sharded_unique(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sorted distinct values over all pieces (gathers each rank's distinct values: ``init="random"`` only)."""
    mine = torch.unique(v)
    group = _sharding.group_of(like)
    size = _sharding.all_reduce(torch.tensor([mine.numel()], dtype=torch.int64), like, "max")
    padded = torch.full((int(size),), float("nan"), dtype=mine.dtype)
    padded[: mine.numel()] = mine
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    every = torch.cat(parts)
    return torch.unique(every[~torch.isnan(every)])
