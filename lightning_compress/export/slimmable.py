"""slice_width: the physically smaller sub-network of a slimmable model at one of its widths.

At width ``w`` each hidden channel group keeps its first ``round(w * n)`` channels, exactly as
:class:`~lightning_compress.callbacks.slimmable.SlimmableTraining` ran it during training
(:mod:`lightning_compress.functional.slimmable`); the first layer's inputs and the last layer's outputs stay full.
BatchNorm layers need that width's own statistics: give ``bn_stats`` (from ``SlimmableTraining.bn_stats(w)`` or
:func:`~lightning_compress.callbacks.slimmable.load_bn_stats`), or ``calibration`` batches to recompute them
(post-hoc recalibration, as in Universally Slimmable Networks).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> half = slice_width(net, 0.5)
    >>> half[0].out_features, half[2].in_features, half[2].out_features
    (4, 4, 3)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress._validation import check_number
from lightning_compress.export._common import copy_model
from lightning_compress.functional.slimmable import keep_first
from lightning_compress.graph import analyze
from lightning_compress.slicing import index_plan, slice_modules

__all__ = ["slice_width"]


@torch.no_grad()
def slice_width(
    model: nn.Module,
    width: float,
    *,
    bn_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    calibration: Iterable[Any] | None = None,
) -> nn.Module:
    """A physically smaller copy of ``model`` running at ``width`` (a fraction in (0, 1]).

    Args:
        model: the full-width model (e.g. trained with ``SlimmableTraining``); it is not modified.
        width: the width to export.
        bn_stats: BatchNorm name -> that width's ``running_mean``/``running_var`` (``num_batches_tracked``
            optional); required when a BatchNorm is slimmed and ``width < 1`` unless ``calibration`` is given.
            BatchNorms that keep their channels take their statistics from it too when it has them.
        calibration: batches (tensors, or tuples whose first item is the input) over which to recompute the
            statistics of the sliced model's BatchNorms that follow a traced layer (cumulative average, in training
            mode, without gradients); other BatchNorms (e.g. on the input) keep theirs.

    Raises:
        ValueError: ``width`` outside (0, 1], missing or mis-shaped ``bn_stats``, or a model that cannot be traced.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> quarter = slice_width(net, 0.25)
        >>> quarter[0].out_features, quarter[2].in_features, quarter[2].out_features
        (2, 2, 3)
    """
    check_number(width, "width", low=0, low_open=True, high=1, noun="a fraction")
    cg = analyze(model)
    plan = index_plan(cg, keep_first(cg, float(width))) if width < 1.0 else {}
    out = copy_model(model)
    slice_modules(out, plan)
    modules = dict(out.named_modules())
    norms = [n for n in cg.followers if n in plan and modules[n].track_running_stats]
    # BatchNorms that keep their channels but sit behind a slimmed layer: SlimmableTraining keeps their statistics
    # per width too; installed when given (statistics saved without them leave the module's own)
    unsliced = (
        [n for n in cg.followers if n not in plan and modules[n].track_running_stats] if width < 1.0 else []
    )
    if calibration is not None:
        _calibrate(out, [modules[n] for n in cg.followers], calibration)
    elif norms or (unsliced and bn_stats is not None):
        if bn_stats is None:
            raise ValueError(
                f"`bn_stats` is required at width {width}: BatchNorm layers {norms} are slimmed and "
                "need this width's own statistics (SlimmableTraining.bn_stats(width)), or give "
                "`calibration` batches"
            )
        for name in norms + [n for n in unsliced if n in bn_stats]:
            stats = bn_stats.get(name)
            module = modules[name]
            if stats is None or stats["running_mean"].shape != (module.num_features,):
                got = None if stats is None else tuple(stats["running_mean"].shape)
                raise ValueError(
                    f"`bn_stats`: {name!r} needs running statistics of shape ({module.num_features},) "
                    f"at width {width}, got {got}"
                )
            module.running_mean.copy_(stats["running_mean"])
            module.running_var.copy_(stats["running_var"])
            if "num_batches_tracked" in stats and module.num_batches_tracked is not None:
                module.num_batches_tracked.copy_(stats["num_batches_tracked"])
    return out


def _calibrate(model: nn.Module, norms: list[nn.Module], batches: Iterable[Any]) -> None:
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    recomputed = {id(m) for m in norms}
    was_training = model.training
    model.train()
    for m in model.modules():  # BatchNorms the graph does not slice (e.g. on the input) keep their statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in recomputed:
            m.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
    finally:
        model.train(was_training)
        for m, momentum in saved:
            m.momentum = momentum
