"""What :class:`~lightning_compress.LowRankFactorization` does around a factorization: the optimizers and DDP learn
the new parameters."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__: list[str] = []  # private to the callbacks


def swap_in_optimizers(trainer: pl.Trainer, replaced: dict[int, list[nn.Parameter]], owner: str) -> None:
    """Put the new parameters where the replaced ones (by ``id``) were, in every parameter group; drop their state."""
    found: set[int] = set()
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if id(p) in replaced:
                    params.extend(replaced[id(p)])
                    optimizer.state.pop(p, None)
                    found.add(id(p))
                else:
                    params.append(p)
            group["params"] = params
    if trainer.optimizers and len(found) < len(replaced):
        rank_zero_warn(f"{owner}: some replaced weights were in no optimizer; their replacements will "
                       "not train. Put every parameter in `configure_optimizers`.")


def rewrap_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Wrap the module in DDP again after its parameters changed (a no-op without DDP)."""
    # Lightning has no public "the parameters changed" call for DDP; the strategy's own `model` setter and
    # `configure_ddp` (what it runs at fit start) are the smallest public pieces that rebuild DDP's reducer
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel) and callable(getattr(strategy, "configure_ddp", None)):
        strategy.model = pl_module  # unwrap; DDP's reducer only knows the old parameters
        strategy.configure_ddp()  # wraps again (broadcasting rank zero's factors) and re-registers comm hooks
