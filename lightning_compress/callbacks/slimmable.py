"""SlimmableTraining: one network trained to run at several widths (sandwich rule, in-place distillation)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress import claims
from lightning_compress._validation import check_number, check_state_version
from lightning_compress.callbacks._base import _ReleasesModelOnException
from lightning_compress.callbacks._wrap_step import TrainingStepWrapper, logging_off
from lightning_compress.functional.distillation import kd_loss
from lightning_compress.functional.slimmable import (
    WidthIndex,
    channel_count,
    forward_at,
    fresh_stats,
    width_key,
    width_plan,
)
from lightning_compress.graph import analyze

__all__ = ["SlimmableTraining"]

log = logging.getLogger(__name__)
_VERSION = 1
_COUNTER = itertools.count(1)


class SlimmableTraining(_ReleasesModelOnException):
    """Train one network that runs at several widths (Yu et al., Slimmable Neural Networks, ICLR 2019).

    At width ``w`` every hidden layer keeps its first ``round(w * n)`` output units (and the next layers the
    matching inputs); the first layer's inputs and the last layer's outputs stay full. Which channels go together
    (BatchNorm, flatten, residual adds, concatenations) is found by tracing the model with ``torch.fx``
    (:mod:`lightning_compress.graph`): the user's ``LightningModule`` is not rewritten. During fit the targeted
    ``Linear``/``Conv``/``BatchNorm`` modules get a forward that reads the callback's current width (an instance
    attribute, removed at teardown); at width 1 it is their own forward.

    Each training step follows the sandwich rule of Universally Slimmable Networks (Yu & Huang, ICCV 2019): the
    callback wraps ``training_step`` and runs it at the largest width, at ``num_random`` widths drawn from the
    intermediate ones, and at the smallest, summing the losses into the one loss Lightning backpropagates (so DDP,
    gradient accumulation and clipping are unchanged). With ``distill`` the smaller widths learn from the full
    width's detached predictions (in-place distillation: ``T^2 KL`` at temperature ``T``) instead of the labels;
    their ``training_step`` calls do not log. The widths drawn depend only on ``seed`` and the step, so every DDP
    process and a resumed run draw the same ones.

    BatchNorm statistics are private per width: width 1 uses the module's own buffers (so the checkpoint's
    ``state_dict`` is the ordinary full model), every other width has its own running mean/variance, kept in
    the callback's state (saved in checkpoints, broadcast from rank 0 under DDP at each validation start).

    At each validation during ``fit`` the callback evaluates every width on the validation batches and logs
    ``val/acc@<w>`` (e.g. ``val/acc@0.5``): batches must be ``(inputs, targets, ...)`` and ``model(inputs)`` class
    logits. ``Trainer.validate``/``test`` run the full width only (the model's own forward); evaluate a smaller
    width by exporting it with :func:`~lightning_compress.export.slimmable.slice_width`.

    Export a width with :func:`lightning_compress.export.slimmable.slice_width` and :meth:`bn_stats`. Limits: a
    forward that ``torch.fx`` cannot trace is refused; layers behind operations that cannot be sliced
    (see :mod:`lightning_compress.graph`) keep their full width; grouped convs are not slimmed.

    Args:
        widths: the widths to train, fractions in (0, 1]; must include 1.0 and one other.
        num_random: intermediate widths drawn per step besides the largest and the smallest (capped at how many
            there are; with all of them every width trains every step, as in the original slimmable networks).
        distill: in-place distillation: smaller widths learn the full width's predictions instead of the labels.
        temperature: softening temperature of the distillation.
        log_accuracy: evaluate and log ``val/acc@<w>`` for every width at each validation during ``fit``.
        seed: seed of the random widths.

    Raises:
        ValueError: a width outside (0, 1], no 1.0 among the widths, fewer than two widths, a negative
            ``num_random`` or a non-positive ``temperature``; in ``setup``, a model with no hidden layer to slim,
            a forward that cannot be traced, or manual optimization (``automatic_optimization = False``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> slim = SlimmableTraining(widths=[0.25, 0.5, 0.75, 1.0], num_random=1)
        >>> trainer = Trainer(callbacks=[slim], max_epochs=1, logger=False)
        >>> slim.sandwich(step=0)[0], slim.sandwich(step=0)[-1], len(slim.sandwich(step=0))
        (1.0, 0.25, 3)
    """
    _sharding_refusal = "it slices weights to narrower widths, which sharded parameters do not allow"

    def __init__(
        self,
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        num_random: int = 1,
        distill: bool = True,
        temperature: float = 1.0,
        log_accuracy: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
            raise ValueError(f"`widths` must be a list of fractions in (0, 1], got {widths!r}")
        for w in widths:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < w <= 1.0:
                raise ValueError(f"`widths` must hold fractions in (0, 1], got {w!r} in {list(widths)}")
        if 1.0 not in [float(w) for w in widths] or len(set(widths)) < 2:
            raise ValueError(f"`widths` must include 1.0 and at least one smaller width, got {list(widths)}")
        check_number(num_random, "num_random", low=0, integer=True)
        check_number(temperature, "temperature", low=0, low_open=True)
        self.widths = list(widths)
        self.num_random = num_random
        self.distill = distill
        self.temperature = temperature
        self.log_accuracy = log_accuracy
        self.seed = seed
        self._sorted = sorted({float(w) for w in widths}, reverse=True)
        self._owner = f"SlimmableTraining#{next(_COUNTER)}"
        self._stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # width key -> BN name -> statistics
        self.val_accuracy: dict[float, float] = {}
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._plans: dict[float, dict[str, WidthIndex]] = {}
        self._modules: dict[str, nn.Module] = {}
        self._private_norms: set[str] = set()  # BatchNorms with private statistics at every width < 1
        self._module: pl.LightningModule | None = None
        self._wrapper: TrainingStepWrapper | None = None
        self._width = 1.0
        self._captured: torch.Tensor | None = None
        self._capturing = False
        self._handles: list[Any] = []
        self._counts: dict[float, list[int]] = {}
        self._warned_batch = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(widths=self._sorted)

    # -- widths ------------------------------------------------------------------------------------
    def sandwich(self, step: int) -> list[float]:
        """Widths trained at optimizer ``step``: largest, ``num_random`` drawn intermediate ones, smallest."""
        middle = self._sorted[1:-1]
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(step))
        drawn = [
            middle[int(i)]
            for i in torch.randperm(len(middle), generator=g)[: min(self.num_random, len(middle))]
        ]
        return [self._sorted[0], *sorted(drawn, reverse=True), self._sorted[-1]]

    @property
    def width(self) -> float:
        """The width the slimmed layers run at right now (1.0 outside the callback's own passes)."""
        return self._width

    def bn_stats(self, width: float) -> dict[str, dict[str, torch.Tensor]]:
        """This width's private BatchNorm statistics: BatchNorm name -> ``running_mean``/``running_var``/...

        Pass them to :func:`~lightning_compress.export.slimmable.slice_width` to export that width.
        """
        key = width_key(width)
        if float(width) not in self._sorted:
            raise ValueError(f"`width` must be one of the trained widths {self._sorted}, got {width!r}")
        return {n: {k: v.detach().clone() for k, v in s.items()} for n, s in self._stats.get(key, {}).items()}

    # -- setup -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_runtime()
        if not pl_module.automatic_optimization:
            raise ValueError(
                "SlimmableTraining needs automatic optimization: it sums the losses of every width into the loss "
                f"`training_step` returns; {type(pl_module).__name__} sets `automatic_optimization = False`, "
                "so only the full width would train"
            )
        cg = analyze(pl_module)
        if not cg.free_groups():
            reasons = {names[0]: cg.pin_reason(g) for g, names in cg.groups().items()}
            raise ValueError(
                f"SlimmableTraining: {type(pl_module).__name__} has no hidden layer whose width can "
                f"change; its layers' outputs: {reasons}"
            )
        self._plans = {w: width_plan(cg, w) for w in self._sorted if w < 1.0}
        modules = dict(pl_module.named_modules())
        self._modules = {n: modules[n] for plan in self._plans.values() for n in plan}
        names = [f"{n}.{p}" for n, m in self._modules.items() for p, _ in m.named_parameters(recurse=False)]
        # a BatchNorm that keeps its channels may still sit behind a slimmed layer (its group is pinned further
        # on): it gets private statistics too, so that only the full width updates the module's own buffers
        self._private_norms = {n for n in cg.followers if modules[n].track_running_stats}
        for name in self._private_norms:
            self._modules.setdefault(name, modules[name])
        claims.claim(pl_module, names, "slim", self._owner)
        self._module = pl_module
        for name, module in self._modules.items():  # an instance attribute: teardown removes it
            module.forward = self._forward_for(name, module, module.forward)
        self._wrapper = TrainingStepWrapper(pl_module, self._sandwich_step)
        self._handles.append(pl_module.register_forward_hook(self._capture))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # statistics restored from a checkpoint: check them against this model and move them to its device
        for key, per_module in self._stats.items():
            plan = self._plans.get(float(key))
            for name, stats in per_module.items():
                module = self._modules.get(name)
                if plan is None or module is None or (name not in plan and name not in self._private_norms):
                    raise ValueError(
                        f"SlimmableTraining: the checkpoint has statistics for BatchNorm {name!r} at "
                        f"width {key}, which this model does not slim there"
                    )
                expected = channel_count(plan[name].outputs if name in plan else None, module.num_features)
                if stats["running_mean"].shape != (expected,):
                    raise ValueError(
                        f"SlimmableTraining: statistics of {name!r} at width {key} have "
                        f"{stats['running_mean'].numel()} channels, expected {expected}"
                    )
                # the module's own statistics give the device and (under a true-precision Trainer) the dtype
                like = module.running_mean if module.running_mean is not None else module.weight
                device = like.device if like is not None else pl_module.device
                per_module[name] = {
                    k: v.to(device, like.dtype)
                    if like is not None and v.is_floating_point()
                    else v.to(device)
                    for k, v in stats.items()
                }

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for module in self._modules.values():
            module.__dict__.pop("forward", None)
        if self._wrapper is not None:
            self._wrapper.remove()
        for handle in self._handles:
            handle.remove()
        claims.release(pl_module, self._owner)
        self._reset_runtime()

    # -- the slimmed forward -------------------------------------------------------------------------
    def _forward_for(self, name: str, module: nn.Module, original: Any) -> Any:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            width = self._width
            if width >= 1.0:
                return original(x, *args, **kwargs)
            index = self._plans[width].get(name)
            if index is None:
                if name not in self._private_norms:
                    return original(x, *args, **kwargs)
                index = WidthIndex()  # all channels, this width's own statistics
            stats = None
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                per_width = self._stats.setdefault(width_key(width), {})
                if name not in per_width:
                    per_width[name] = fresh_stats(module, channel_count(index.outputs, module.num_features))
                stats = per_width[name]
            return forward_at(module, x, index, stats)

        forward.lightning_compress_patch = True  # type: ignore[attr-defined]  # copy_model drops it from copies
        return forward

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capturing and self._captured is None and isinstance(output, torch.Tensor):
            self._captured = output

    def _sandwich_step(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """``training_step`` at the sandwich's widths, losses summed (wrapped around the user's during fit)."""
        module = self._module
        if module is None:
            return original(*args, **kwargs)
        trainer = module.trainer
        widths = self.sandwich(trainer.global_step)
        out, full = self._run_at(1.0, original, args, kwargs)
        loss = _loss(out)
        if loss is None:
            return out
        if self.distill and full is None:
            raise RuntimeError(
                "SlimmableTraining(distill=True): training_step did not call the module's "
                "forward (self(x)) with a tensor output; call it, or set distill=False"
            )
        total = loss
        with logging_off(module):  # the smaller widths' training_step calls do not log
            for width in widths[1:]:
                out_w, logits = self._run_at(width, original, args, kwargs)
                if self.distill:
                    total = total + kd_loss(logits, full.detach(), float(self.temperature))
                else:
                    total = total + _loss(out_w)
        module.log("train/slim_loss", total.detach())
        if isinstance(out, dict):
            return {**out, "loss": total}
        return total

    def _run_at(self, width: float, step: Any, args: Any, kwargs: Any) -> tuple[Any, torch.Tensor | None]:
        self._width, self._captured, self._capturing = width, None, True
        try:
            return step(*args, **kwargs), self._captured
        finally:
            self._width, self._captured, self._capturing = 1.0, None, False

    # -- per-width validation ------------------------------------------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counts = {w: [0, 0] for w in self._sorted}
        self._sync_stats(trainer)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.log_accuracy or not self._plans:
            return
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)):
            if not self._warned_batch:
                rank_zero_warn(
                    "SlimmableTraining: validation batches are not (inputs, targets); "
                    "val/acc@<width> is not logged"
                )
                self._warned_batch = True
            return
        x, y = batch[0], batch[1]
        with torch.no_grad():
            for width in self._sorted:
                self._width = width
                try:
                    logits = pl_module(x)
                finally:
                    self._width = 1.0
                counts = self._counts.setdefault(width, [0, 0])
                counts[0] += int((logits.argmax(dim=-1) == y).sum())
                counts[1] += int(y.numel())

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_accuracy or not self._counts or self._warned_batch:
            return
        sums = torch.tensor(
            [c for w in self._sorted for c in self._counts[w]], dtype=torch.float64, device=pl_module.device
        )
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        for i, width in enumerate(self._sorted):
            correct, total = float(sums[2 * i]), float(sums[2 * i + 1])
            if total:
                self.val_accuracy[width] = correct / total
                if not trainer.sanity_checking:
                    pl_module.log(f"val/acc@{width}", correct / total, sync_dist=True)  # same on every rank

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_stats(trainer)

    def _sync_stats(self, trainer: pl.Trainer) -> None:
        """Under DDP, every process takes rank 0's private statistics (as DDP does with module buffers)."""
        if trainer.world_size <= 1:
            return
        cpu = {
            k: {n: {s: t.cpu() for s, t in v.items()} for n, v in m.items()} for k, m in self._stats.items()
        }
        cpu = trainer.strategy.broadcast(cpu, src=0)
        for key, per_module in cpu.items():
            for name, stats in per_module.items():
                device = self._modules[name].running_mean.device  # a BatchNorm(affine=False) has no weight
                self._stats.setdefault(key, {})[name] = {s: t.to(device) for s, t in stats.items()}

    # -- checkpointing -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "widths": list(self._sorted),
            "bn_stats": {
                k: {n: {s: t.detach().cpu().clone() for s, t in v.items()} for n, v in m.items()}
                for k, m in self._stats.items()
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, _VERSION, "SlimmableTraining")
        self._stats = {
            k: {n: dict(v) for n, v in m.items()} for k, m in state_dict.get("bn_stats", {}).items()
        }


def _loss(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out.get("loss")
    return None
