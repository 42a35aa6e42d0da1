"""``GradualPruning(reconstruct=True)``: after each mask update, the weights that stay absorb what the pruned ones did.

The update is SparseGPT's (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"), with the mask given by the callback's criterion and schedule (``reconstruct=True``) or, with
``reconstruct="adaptive"``, chosen inside the sweep as SparseGPT chooses it, in the numbers the criterion's mask
sets for each row and run of 128 columns (or each N:M group), so that scope, schedule and pattern hold (see
:func:`sweep`):
for a Linear layer with weight ``W`` and the Gram matrix ``H = sum_x x x^T`` of its inputs, the columns are visited
in order; when column ``j`` loses its pruned entries, the error ``(w_j - q_j) / [H^-1]_jj`` is spread over the
columns not yet visited through the row ``j`` of the upper Cholesky factor of ``H^-1`` (the Optimal Brain Surgeon
update), so that ``W' X`` stays close to ``W X`` on the inputs seen. ``H`` is damped by 1 % of its mean diagonal,
as SparseGPT does; the kept weights of an input channel that never carried signal stay as they are (SparseGPT
zeroes them; here the mask alone decides what is zero).

``H`` is summed by forward pre-hooks from the training batches the model sees anyway (forwards with gradients on),
from the previous mask update (or the start of training) to the next, added across DDP ranks when the masks are
computed, and checkpointed: ``in_features ** 2`` floats per pruned layer (MiniLM: 74 MB in all). Cost: one
``x^T x`` per pruned layer and training batch while updates are to come (nothing after the last one), and one
sweep of ``O(in_features^3 + out_features * in_features^2)`` per layer and update.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> w, x = torch.randn(4, 8), torch.randn(64, 8) @ torch.randn(8, 8)
    >>> keep = torch.rand(4, 8) > 0.5
    >>> new = reconstruct_weight(w, x.T @ x, keep)
    >>> bool((new[~keep] == 0).all())
    True
    >>> bool((x @ new.T - x @ w.T).norm() < (x @ (w * keep).T - x @ w.T).norm())
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_compress.callbacks._pruning_stats import CriterionStats

__all__: list[str] = []  # private to the callbacks (GradualPruning; InputGram also LowRankFactorization)


@torch.no_grad()
def reconstruct_weight(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, block: int = 128,
                       damp: float = 0.01) -> torch.Tensor:
    """``weight`` (out x in) with its ``~keep`` entries zero and the kept ones updated by the OBS sweep over the
    input Gram matrix ``gram`` (in x in); float32, on ``weight``'s device."""
    return sweep(weight, gram, keep, block=block, damp=damp)[0]


@torch.no_grad()
def sweep(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, *, previous: torch.Tensor | None = None,
          segment: int | None = None, block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS sweep of :func:`reconstruct_weight`, returning the new weight and the keep-mask it used.

    With ``segment`` (``reconstruct="adaptive"``) the mask is chosen during the sweep, as SparseGPT chooses it:
    ``keep`` only says how many entries of each row go in each run of ``segment`` columns (the block of 128 for
    unstructured masks, ``M`` for N:M); when the sweep reaches a run, the entries that go are those of least OBS
    error ``w^2 / [U]_jj^2`` (``U`` the upper Cholesky factor of ``H^-1``) on the weights as updated so far, the
    entries already pruned (``~previous``) going first (a pruned weight never comes back)."""
    w = weight.detach().float().clone()
    h = gram.to(w.device, torch.float32).clone()
    keep = keep.to(w.device).clone()
    previous = None if previous is None else previous.to(w.device)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0  # a channel that never carried signal: its kept weights stay as they are, nothing spreads
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    if segment is not None:
        block = max(segment, block - block % segment)  # runs never straddle two blocks
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if segment is not None and i % segment == 0:
                _choose(keep[:, i1 + i:i1 + min(i + segment, i2 - i1)], w1[:, i:i + segment],
                        torch.diagonal(h1)[i:i + segment], None if previous is None else previous[:, i1 + i:i1 + i + segment])
            kept = w1[:, i] * keep[:, i1 + i]
            err = (w1[:, i] - kept) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)  # the later columns of this block absorb it
            w1[:, i] = kept
            errors[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return w * keep, keep


def _choose(keep: torch.Tensor, w: torch.Tensor, d: torch.Tensor, previous: torch.Tensor | None) -> None:
    """Re-choose, in place, which entries of each row of the run ``keep`` go: as many as go now (or as were
    already pruned, if more), those of least ``w^2 / d^2``, already-pruned ones first."""
    score = w**2 / d**2
    count = (~keep).sum(1)
    if previous is not None:
        score = score.masked_fill(~previous, -float("inf"))
        count = torch.maximum(count, (~previous).sum(1))
    ranks = score.argsort(dim=1, stable=True).argsort(dim=1)
    keep.copy_(ranks >= count.unsqueeze(1))


class InputGram(CriterionStats):
    """Sums of ``x^T x`` over the inputs of each pruned (or, for ``LowRankFactorization(whiten=True)``, factorized)
    Linear layer, with their hooks (summed for a weight used by several layers: the update then serves all of their
    inputs)."""

    def __init__(self, token_mask: str | None = None, cumulative: bool = False) -> None:
        super().__init__("activation", token_mask, cumulative)  # summed, reduced, reset and restored as the activation criterion's sums
        self.label, self.instead = "reconstruct=True", "reconstruct=False"

    def _hook(self, fqn: str, conv: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not torch.is_grad_enabled():
                return
            x = self.rows(args[0].detach(), fqn).float()
            total = self.sums.get(fqn)
            if total is None:
                self.sums[fqn] = x.T @ x
            else:
                total.addmm_(x.T, x)

        return hook

    def grams(self, strategy: Any) -> dict[str, torch.Tensor]:
        """The sums since the last update, added across ranks (with any restored from a checkpoint)."""
        return self._reduced(strategy)


@torch.no_grad()
def update_weights(weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor], grams: dict[str, torch.Tensor],
                   previous: dict[str, torch.Tensor] | None = None, nm: tuple[int, int] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Replace each weight by its :func:`sweep` under its mask (a weight whose layers saw no input since the last
    update is left as it is). With ``previous`` (the masks before this update; ``reconstruct="adaptive"``) the
    sweep chooses the entries, in runs of 128 columns or of ``M`` (``nm``), and the masks it chose are returned."""
    chosen = {}
    segment = None if previous is None else (nm[1] if nm is not None else 128)
    for fqn, weight in weights.items():
        if fqn in grams:
            before = None if previous is None else previous.get(fqn, torch.ones_like(masks[fqn]))
            new, keep = sweep(weight, grams[fqn], masks[fqn], previous=before, segment=segment)
            weight.copy_(new.to(weight.dtype))
            if previous is not None:
                chosen[fqn] = keep
    return chosen


def check_layers(layers: dict[str, list[nn.Module]], strategy: Any) -> None:
    """Raise unless every pruned weight belongs to ``nn.Linear`` layers only (the update needs a matrix input) and
    the weights are whole on each rank (not FSDP2's row shards: the sweep mixes a row's columns with the Gram)."""
    if type(strategy).__name__ == "ModelParallelStrategy":
        raise ValueError("GradualPruning: `reconstruct`=True cannot run under ModelParallelStrategy (FSDP2) yet (its "
                         "update needs whole weights); use DDP or reconstruct=False")
    for fqn, modules in layers.items():
        for module in modules:
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"GradualPruning(reconstruct=True) updates nn.Linear weights from their inputs' Gram matrix; "
                    f"{fqn!r} belongs to a {type(module).__name__}: leave it out with `exclude` or set reconstruct=False"
                )
