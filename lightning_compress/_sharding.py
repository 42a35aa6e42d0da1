"""Sharded parameters (FSDP2 ``DTensor``) in one place: local shards, where they sit, reductions over the mesh.

Under Lightning's ``ModelParallelStrategy`` the user's ``configure_model`` calls ``fully_shard``, which replaces each
parameter with a ``DTensor`` whose rank-local piece is a slice of rows (``Shard(0)``). A callback computes on its
rank's piece (:func:`local`, which writes through to the parameter), reduces what must be global (counts, sums,
ranges) with :func:`all_reduce`, and keeps its own per-element state (masks, assignments) the shape of the piece.
Its checkpoint state is full-size and the same on every rank (:func:`full`, a collective, called from every rank
while Lightning dumps a checkpoint; Lightning writes rank zero's copy), and a restored full tensor is cut back to
the piece with :func:`local_like`.

Parameters are resolved *after* ``configure_model`` (``on_fit_start`` or later): ``fully_shard`` replaces the
``nn.Parameter`` objects, so references taken in ``setup`` point at tensors the optimizer no longer updates.

Plain tensors pass through every function unchanged, so single-process and DDP code paths are the same calls.

Example:
    >>> w = torch.arange(6.0).view(3, 2)
    >>> local(w) is w, is_sharded(w), local_like(w, w).shape, rows_of(w)
    (True, False, torch.Size([3, 2]), (0, 3))
    >>> all_reduce(torch.tensor([2.0]), w)
    tensor([2.])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

try:  # torch >= 2.4 (the package requires more): public DTensor API
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - a torch without distributed support
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "all_reduce",
    "check_supported",
    "full",
    "group_of",
    "is_sharded",
    "local",
    "local_like",
    "rows_of",
    "sharded_parameters",
    "world_of",
]

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter that ``fully_shard`` or tensor parallelism distributed)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``t`` (``t`` itself when not sharded). Under ``torch.no_grad`` in-place writes to it
    write the parameter."""
    if not is_sharded(t):
        return t
    return t._local_tensor if not torch.is_grad_enabled() else t.to_local()  # noqa: SLF001 (same storage)


def group_of(t: torch.Tensor) -> Any | None:
    """The process group ``t`` is sharded over (``None``: not sharded, or over a single process)."""
    if not is_sharded(t) or not dist.is_initialized() or t.device_mesh.size() == 1:
        return None
    mesh = t.device_mesh
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group(_shard_mesh_dim(t))


def world_of(t: torch.Tensor) -> int:
    """How many processes hold a piece of ``t`` (1 when not sharded)."""
    return 1 if group_of(t) is None else dist.get_world_size(group_of(t))


def _shard_mesh_dim(t: torch.Tensor) -> int:
    dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    return dims[0] if dims else 0


def check_supported(t: torch.Tensor, name: str, owner: str) -> None:
    """Raise ``ValueError`` unless ``t`` is plain, replicated, or sharded by rows over one mesh dimension (FSDP2's
    ``Shard(0)``), the layouts the callbacks compute on. ``name``/``owner``: the parameter and callback to name."""
    if not is_sharded(t):
        return
    shards = [p for p in t.placements if isinstance(p, Shard)]
    others = [p for p in t.placements if not isinstance(p, (Shard, Replicate))]
    if others or len(shards) > 1 or (shards and shards[0].dim != 0):
        raise ValueError(
            f"{owner}: parameter {name!r} is a DTensor with placements {tuple(t.placements)}; supported are "
            "row-sharded (Shard(0), as fully_shard makes) and replicated parameters"
        )


def rows_of(t: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)``: the rows of the full tensor that this rank's piece of ``t`` holds (``torch.chunk``
    layout, as ``Shard(0)`` uses; all rows when not sharded)."""
    n = t.shape[0] if t.dim() else 1
    if not is_sharded(t) or group_of(t) is None or not any(isinstance(p, Shard) for p in t.placements):
        return 0, n
    world, rank = world_of(t), dist.get_rank(group_of(t))
    size = -(-n // world)  # ceil, as torch.chunk
    start = min(rank * size, n)
    return start, min(start + size, n)


def local_like(full_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full_tensor`` (shaped like the full ``like``), e.g. a mask restored from a checkpoint."""
    if tuple(full_tensor.shape) != tuple(like.shape):
        raise ValueError(f"shape {tuple(full_tensor.shape)} does not match the parameter's {tuple(like.shape)}")
    start, stop = rows_of(like)
    piece = full_tensor if (start, stop) == (0, full_tensor.shape[0] if full_tensor.dim() else 1) else full_tensor[start:stop]
    return piece.to(local(like).device).contiguous()


def full(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor whose rank-local piece is ``piece`` (laid out like ``like``): a collective all-gather over
    ``like``'s mesh, so every rank must call it. ``piece`` itself when ``like`` is not sharded."""
    group = group_of(like)
    if group is None or not any(isinstance(p, Shard) for p in like.placements):
        return piece
    world = dist.get_world_size(group)
    n = like.shape[0]
    size = -(-n // world)
    padded = piece.new_zeros((size, *piece.shape[1:]))
    padded[: piece.shape[0]] = piece
    parts = [torch.empty_like(padded) for _ in range(world)]
    work = padded if padded.dtype != torch.bool else padded.to(torch.uint8)
    out = parts if padded.dtype != torch.bool else [p.to(torch.uint8) for p in parts]
    dist.all_gather(out, work, group=group)
    return torch.cat(out)[:n].to(piece.dtype)


def all_reduce(t: torch.Tensor, like: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` (a plain tensor: counts, sums, ranges) in place over the processes that share ``like``'s
    shards, and return it. ``op``: ``"sum"``, ``"max"`` or ``"min"``. A no-op when ``like`` is not sharded."""
    if op not in _OPS:
        raise ValueError(f"`op` must be one of {sorted(_OPS)}, got {op!r}")
    group = group_of(like)
    if group is not None:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return t


def sharded_parameters(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s parameters that are ``DTensor`` (empty for a plain or DDP model)."""
    return [n for n, p in module.named_parameters() if is_sharded(p)]
