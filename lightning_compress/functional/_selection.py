"""Exact selection of the ``k`` lowest scores over several tensors, in chunks, across the shards of a mesh.

The pruning functions rank entries (or units, or N:M groups) and prune exactly ``k`` of them, ties broken by
position: as if every score were concatenated in order (tensor after tensor, each flattened) and the ``k`` first
of a stable ascending sort pruned. Nothing is concatenated or sorted here, and no score tensor as large as a
weight is built:

- every float32 score maps to an ``int32`` key with the same order (:func:`ordered_keys`; ``-0.0 == +0.0``);
- the ``k``-th smallest key is found by a two-digit radix select (16 high bits, then 16 low bits): each digit is a
  65,536-bin histogram of the keys (``torch.bincount``), summed over the tensors and, for rank-local pieces of
  sharded parameters (FSDP2 ``DTensor``, ``Shard(0)``), over the ranks (``_sharding.all_reduce``);
- a last pass writes the keep-masks: keys above the cut stay, keys below go, and of the keys equal to it the first
  ``k - below`` in the concatenated order go. Under sharding the order is the full tensors' flattened order (a
  rank's piece is a block of whole rows: rank 0's rows first), so the tie counts per (tensor, rank) are reduced
  first and the result is the same masks, piece for piece, as one process computes on the full tensors.

Scores are computed chunk by chunk (``|w|`` of a weight slice, already-pruned entries set below every live one),
so the extra memory is the output masks (1 byte per entry) plus a few chunk-sized buffers. Three passes over the
data (four when a tie straddles the cut), no Python loop over elements.

Example:
    >>> parts = [Scores(torch.tensor([0.5, -2.0, 0.1]), magnitude=True), Scores(torch.tensor([1.0, 0.0]))]
    >>> keep = lowest_pruned(parts, 2)
    >>> [m.tolist() for m in keep]
    [[True, True, False], [True, False]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_compress import _sharding

__all__ = ["Scores", "lowest_pruned", "masked_scores", "ordered_keys"]

CHUNK = 1 << 18  # entries scored at a time: a few MB of buffers, whatever the model's size
_BINS = 1 << 16
_SIGNED_FLOOR = -1e30  # below any signed score, finite (quantiles interpolate), and summable over a group


def masked_scores(scores: torch.Tensor, mask: torch.Tensor | None, signed: bool = False) -> torch.Tensor:
    """Scores (as float32) where already-pruned entries rank below every live one; ``mask`` is bool or 0/1 float.

    Scores are >= 0 unless ``signed`` (movement scores): pruned entries then score ``-1e30``, else ``-1``.

    Example:
        >>> masked_scores(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
        tensor([ 2., -1.])
    """
    scores = scores.float()
    if mask is None:
        return scores
    if signed:
        return torch.where(mask.to(device=scores.device, dtype=torch.bool), scores, _SIGNED_FLOOR)
    keep = mask.to(device=scores.device, dtype=scores.dtype)
    # (keep - 1) + scores * keep: exactly the score where kept, -1 where pruned; float ops are the fastest here
    return (keep - 1.0).addcmul_(scores, keep)


def ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """``int32`` keys that order like the float32 values of ``x`` (``-0.0`` and ``+0.0`` get the same key).

    Example:
        >>> k = ordered_keys(torch.tensor([-2.0, -0.0, 0.0, 1.5, -1e30]))
        >>> (k.argsort(stable=True).tolist(), bool(k[1] == k[2]))
        ([4, 0, 1, 2, 3], True)
    """
    bits = (x.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse the order of their magnitude bits


_PRUNED_KEY = {False: int(ordered_keys(torch.tensor(-1.0))), True: int(ordered_keys(torch.tensor(_SIGNED_FLOOR)))}


@dataclass
class Scores:
    """One tensor to rank: ``values`` scored as ``|values|`` (``magnitude``) or as they are, entries ``False`` in
    ``mask`` ranked below every live one, ``like`` the (possibly ``DTensor``) parameter whose rank-local rows
    ``values`` holds (``None``: a plain tensor, the same on every rank), ``total`` the entries of all ranks' pieces
    together when they are not ``like``'s (e.g. one score per row or per group)."""

    values: torch.Tensor
    mask: torch.Tensor | None = None
    magnitude: bool = False
    signed: bool = False
    like: torch.Tensor | None = None
    total: int | None = None

    def numel(self) -> int:
        """Entries of the full tensor (all ranks' pieces together)."""
        if not self.piece():
            return self.values.numel()
        return self.total if self.total is not None else self.like.numel()  # type: ignore[union-attr]

    def piece(self) -> bool:
        """Whether ``values`` is this rank's row block of a sharded tensor (else every rank holds all of it)."""
        like = self.like
        return like is not None and _sharding.group_of(like) is not None and any(
            isinstance(p, _sharding.Shard) for p in like.placements
        )

    def chunks(self, size: int) -> list[tuple[int, int]]:
        n = self.values.numel()
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    def keys(self, start: int, stop: int) -> torch.Tensor:
        """Ordered keys of the masked scores of entries ``[start, stop)`` of the flattened piece (the keys of
        :func:`masked_scores`, computed without a float copy: ``|w|``'s key is ``w``'s bits without the sign)."""
        raw = self.values.detach().reshape(-1)[start:stop]
        if self.magnitude and raw.dtype == torch.float32:
            keys = raw.view(torch.int32) & 0x7FFFFFFF
        else:
            keys = ordered_keys(raw.abs() if self.magnitude else raw)
        if self.mask is None:
            return keys
        mask = self.mask.reshape(-1)[start:stop].to(keys.device)
        ones = (mask if mask.dtype == torch.bool else mask != 0).to(torch.int32).neg_()  # kept: all bits set, else 0
        pruned = _PRUNED_KEY[self.signed]  # ((keys ^ p) & ones) ^ p: the key where kept, p where pruned (4x a where)
        return keys.bitwise_xor_(pruned).bitwise_and_(ones).bitwise_xor_(pruned)


def _group_like(parts: Sequence[Scores]) -> torch.Tensor | None:
    likes = [p.like for p in parts if p.piece()]
    if not likes:
        return None
    group = _sharding.group_of(likes[0])
    if any(_sharding.group_of(like) is not group for like in likes[1:]):
        raise ValueError("tensors ranked together must be sharded over the same process group")
    return likes[0]


def _digit(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the ``k``-th smallest (1-based) of a histogram, and how many entries lie in lower bins."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)))
    return b, int(cum[b - 1]) if b else 0


def lowest_pruned(parts: Sequence[Scores], k: int, chunk: int = CHUNK) -> list[torch.Tensor]:
    """Keep-masks (``bool``, shaped like each part's ``values``) pruning exactly the ``k`` lowest scores of all
    ``parts`` together (over every rank's pieces), ties: earlier part, then earlier position in the full tensor.

    Every rank holding pieces must call it (collectives: two histograms and, on a straddling tie, a count).
    """
    total = sum(p.numel() for p in parts)
    if k <= 0 or k >= total:
        return [torch.full(p.values.shape, k <= 0, dtype=torch.bool, device=p.values.device) for p in parts]
    like = _group_like(parts)
    rank = 0 if like is None else dist.get_rank(_sharding.group_of(like))
    world = 1 if like is None else _sharding.world_of(like)
    counted = [p.piece() or rank == 0 for p in parts]  # a plain tensor counts once, on the first rank
    device, half = parts[0].values.device, _BINS >> 1
    hist = torch.zeros(_BINS, dtype=torch.long, device=device)
    for part, count in zip(parts, counted, strict=True):
        for s, e in part.chunks(chunk) if count else []:
            hist += torch.bincount((part.keys(s, e) >> 16) + half, minlength=_BINS).to(device)
    high, below = _digit(hist if like is None else _sharding.all_reduce(hist, like), k)
    if int(hist[high]) <= max(chunk, total >> 4):  # (the same on every rank) few keys share the cut's high digit
        return _cut_in_bin(parts, counted, k - below, high - half, like, rank, world, chunk)
    hist.zero_()
    for part, count in zip(parts, counted, strict=True):
        for s, e in part.chunks(chunk) if count else []:
            keys = part.keys(s, e)
            hist += torch.bincount(keys[(keys >> 16) == high - half] & 0xFFFF, minlength=_BINS).to(device)
    hist = hist if like is None else _sharding.all_reduce(hist, like)
    low, lower = _digit(hist, k - below)
    cut, below, ties = ((high - half) << 16) | low, below + lower, int(hist[low])
    room = k - below  # of the `ties` entries equal to the cut (1 <= room <= ties), the first `room` go
    offsets = [0] * len(parts)
    if room < ties:  # the tie straddles the cut: where each rank's piece starts in the order of the tied entries
        counts = torch.zeros(len(parts), world, dtype=torch.long, device=device)
        for i, (part, count) in enumerate(zip(parts, counted, strict=True)):
            if count:
                n = sum(int(torch.count_nonzero(part.keys(s, e) == cut)) for s, e in part.chunks(chunk))
                counts[i, rank if part.piece() else 0] = n
        counts = (counts if like is None else _sharding.all_reduce(counts, like)).cpu()
        before = counts.sum(1).cumsum(0) - counts.sum(1)
        offsets = [int(before[i]) + int(counts[i, : rank if p.piece() else 0].sum()) for i, p in enumerate(parts)]
    out = []
    for part, offset in zip(parts, offsets, strict=True):
        keep = torch.empty(part.values.numel(), dtype=torch.bool, device=part.values.device)
        left = room - offset if room < ties else None  # ties of this piece still to prune (None: all of them)
        for s, e in part.chunks(chunk):
            keys = part.keys(s, e)
            if left is None:
                keep[s:e] = keys > cut
            elif left <= 0:
                keep[s:e] = keys >= cut
            else:
                tied = keys == cut
                keep[s:e] = ~((keys < cut) | (tied & (torch.cumsum(tied, 0) <= left)))
                left -= int(torch.count_nonzero(tied))
        out.append(keep.view(part.values.shape))
    return out


def _cut_in_bin(parts: Sequence[Scores], counted: list[bool], k: int, high: int, like: torch.Tensor | None, rank: int,
                world: int, chunk: int) -> list[torch.Tensor]:
    """The masks of :func:`lowest_pruned` in one more pass, when the keys whose high 16 bits are ``high`` (the cut's)
    are few: keys above them stay, keys below go, and the positions and low 16 bits of the ones in between are
    collected (12 bytes each, at most 1/16 of the entries or one chunk) to prune their ``k`` lowest, ties by
    position: the same masks as the histogram of the low digit, the comparison pass and the tie count."""
    out, found = [], []
    for part in parts:
        keep = torch.empty(part.values.numel(), dtype=torch.bool, device=part.values.device)
        at = [torch.empty(0, dtype=torch.long, device=keep.device)]
        lows = [torch.empty(0, dtype=torch.int32, device=keep.device)]
        for s, e in part.chunks(chunk):
            keys = part.keys(s, e)
            top = keys >> 16
            torch.gt(top, high, out=keep[s:e])
            inside = _positions(top == high)
            at.append(inside + s)
            lows.append(keys[inside] & 0xFFFF)
        out.append(keep)
        found.append((torch.cat(at), torch.cat(lows)))
    device = out[0].device
    hist = torch.zeros(_BINS, dtype=torch.long, device=device)
    for (_, lows), count in zip(found, counted, strict=True):
        if count and lows.numel():
            hist += torch.bincount(lows, minlength=_BINS).to(device)
    hist = hist if like is None else _sharding.all_reduce(hist, like)
    low, lower = _digit(hist, k)
    room, ties = k - lower, int(hist[low])  # of the `ties` keys equal to the cut (1 <= room <= ties), the first `room` go
    offsets = [0] * len(parts)
    if room < ties:  # the tie straddles the cut: where each rank's piece starts in the order of the tied entries
        counts = torch.zeros(len(parts), world, dtype=torch.long, device=device)
        for i, ((_, lows), part, count) in enumerate(zip(found, parts, counted, strict=True)):
            if count:
                counts[i, rank if part.piece() else 0] = int(torch.count_nonzero(lows == low))
        counts = (counts if like is None else _sharding.all_reduce(counts, like)).cpu()
        before = counts.sum(1).cumsum(0) - counts.sum(1)
        offsets = [int(before[i]) + int(counts[i, : rank if p.piece() else 0].sum()) for i, p in enumerate(parts)]
    for keep, (at, lows), offset in zip(out, found, offsets, strict=True):
        kept = lows > low
        if room < ties:
            tied, left = lows == low, room - offset  # ties of this piece still to prune
            kept |= tied if left <= 0 else tied & (torch.cumsum(tied, 0) > left)
        keep[at.to(keep.device)] = kept.to(keep.device)
    return [keep.view(part.values.shape) for keep, part in zip(out, parts, strict=True)]


def _positions(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the ``True`` entries of a sparse 1-D ``bool`` tensor, ascending: ``torch.nonzero`` over its bytes
    read 8 at a time (a quarter of the time on a 256k chunk), then over the words that hold one."""
    n = flags.numel()
    whole = n - n % 8
    if flags.storage_offset() % 8 or not flags.is_contiguous():
        return torch.nonzero(flags).view(-1)
    words = torch.nonzero(flags[:whole].view(torch.int64)).view(-1)
    inside = (words.unsqueeze(1) * 8 + torch.arange(8, device=flags.device)).view(-1)
    found = inside[flags[inside]]
    return found if whole == n else torch.cat([found, torch.nonzero(flags[whole:]).view(-1) + whole])
