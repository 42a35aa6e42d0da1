"""GradualPruning: scheduled magnitude (or unit-norm) pruning while the model trains."""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress import claims
from lightning_compress._validation import check_choice, check_state_version
from lightning_compress.callbacks import _pruning_masking, _pruning_sharded, _pruning_stats
from lightning_compress.callbacks import _pruning_reconstruct as _recon
from lightning_compress.callbacks._base import _ReleasesModelOnException
from lightning_compress.callbacks._step_hooks import AfterOptimizerStep
from lightning_compress.schedules import Schedule, resolve_window, validate_kind, validate_window
from lightning_compress.targets import match, select_modules

__all__ = ["GradualPruning"]

log = logging.getLogger(__name__)

_UNSTRUCTURED_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "Embedding")
_STRUCTURED_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")  # also the types activation / N:M prune
_COUNTER = itertools.count(1)
_VERSION = 2  # 2: criterion statistics


class GradualPruning(_ReleasesModelOnException):
    """Raise the sparsity of the targeted layers step by step while training, then hold it.

    The sparsity follows a schedule over optimizer steps (by default the cubic one of Zhu & Gupta 2017,
    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``). Every ``update_every`` steps inside the window the
    masks are recomputed from the current weights (entries by ``|w|``, or whole output units by their L1/L2 norm),
    never reviving what is already pruned. The model is not rewritten: ``weight`` stays a plain parameter whose
    pruned entries are exactly zero. The weights are masked right after every optimizer step (one
    ``torch._foreach_mul_`` in a step hook on each optimizer), so momentum cannot revive them, and a checkpoint's
    ``state_dict`` loads with ``strict=True`` into the unmodified module. Gradients of pruned entries are zeroed
    before the step only when the trainer clips gradients, so that the clipping norm counts kept weights alone
    (the optimizer's state of pruned entries is then not zero: no effect on per-entry optimizers, SGD or Adam).

    The masks and the schedule position are in the callback's state: resuming from a checkpoint continues exactly,
    and fitting the same model again keeps its masks; the same callback given another model starts over.
    Under DDP every rank computes the same masks from its (synchronized) weights. Under FSDP2 (``ModelParallelStrategy``,
    ``fully_shard`` in ``configure_model``) each rank holds and applies the masks of its rows, ranked across the ranks
    to the same masks as one process computes (``_pruning_sharded``). FSDP1 and DeepSpeed are refused in ``setup``.

    Args:
        final_sparsity: fraction of weights (or units, in ``structured`` mode) pruned at the end, in [0, 1).
        initial_sparsity: sparsity at the start of the window, in [0, ``final_sparsity``].
        start_epoch: epoch (fractions allowed) at which pruning starts; or give ``start_step``.
        end_epoch: epoch at which ``final_sparsity`` is reached; or give ``end_step``. With neither end given the
            ramp ends halfway through the run, leaving the second half to fine-tune at the final sparsity.
        start_step: optimizer step at which pruning starts.
        end_step: optimizer step at which ``final_sparsity`` is reached.
        update_every: optimizer steps between mask updates inside the window (the last update is at the end).
        schedule: ``cubic``, ``linear``, ``exponential``, or ``constant``/``one_shot`` (all at once at the start).
        mode: ``unstructured`` (single weights by magnitude) or ``structured`` (whole output neurons of a
            ``Linear`` / filters of a ``Conv`` by the norm of their weights). ``structured`` leaves out the
            layers whose outputs are the model's outputs (the classifier: its units are the classes), found by
            tracing the forward (:func:`~lightning_compress.graph.output_layers`); naming one in ``targets`` is
            an error.
        norm: 1 or 2, the norm that ranks units in ``structured`` mode.
        scope: ``global`` (one ranking across all targeted layers, so layers end with different sparsities)
            or ``layer`` (every layer pruned to the scheduled sparsity) or ``row`` (every output unit of every layer
            pruned to it, its entries ranked among themselves: Wanda's comparison group; ``unstructured`` only).
        targets: layers to prune (names, globs or ``"re:"`` regexes); ``None``: every Linear/Conv layer.
            ``Embedding`` layers are pruned (``unstructured`` mode) only when named here.
            Layers with frozen weights are skipped with a warning unless ``targets`` is given.
        exclude: layers to leave dense.
        layer_sparsity: per-layer final sparsity by pattern, e.g. ``{"net.5": 0.5}``; such layers are ranked on
            their own (outside the global pool) and follow the same schedule to their own final sparsity.
        prune_bias: in ``structured`` mode, also zero the bias of pruned units (so they output exactly zero).
        criterion: what ranks weights: ``magnitude`` ``|w|`` (from scratch), ``activation`` ``|w| * ||x_j||_2``
            from the training batches' input norms (Wanda, Sun et al. 2023; pretrained, short fine-tuning; Linear
            and Conv only) or ``movement`` ``-sum_t w * dL/dw`` (Sanh et al. 2020); see ``_pruning_stats``.
        pattern: ``"N:M"`` (e.g. ``"2:4"``): at most N of every M consecutive weights along the input dimension
            stay; the fraction of groups held to it follows the schedule from 0 to 1 (``final_sparsity`` and
            ``scope`` unused: every layer ends at (M - N) / M).
        reconstruct: after each mask update, move the kept weights so that each layer's output on the training
            inputs since the previous update changes least (SparseGPT's sweep, Frantar & Alistarh 2023, on the mask
            chosen; ``nn.Linear`` only, unstructured; ``in_features**2`` floats a layer, see ``_pruning_reconstruct``);
            ``"adaptive"``: the sweep also picks which entries go (SparseGPT's mask), as many per row and run of 128
            columns (or N:M group) as the criterion's mask.
        token_mask: key of the (mapping) batch's ``(batch, tokens)`` mask, e.g. ``"attention_mask"``: the inputs that
            ``criterion="activation"`` and ``reconstruct`` gather count its nonzero tokens only (not padding).
        statistics: which training batches the activation criterion's input norms and ``reconstruct``'s Gram
            matrices sum over at a mask update: ``since_update`` (those since the previous update) or ``cumulative``
            (all since the first: more inputs behind each update, as SparseGPT's calibration set, including some
            from before the latest masks; measured on the pretrained MiniLM in the README). Movement scores always
            add up over the run.

    Raises:
        ValueError: a sparsity outside [0, 1), a window that ends before it starts or after the run,
            a pattern that matches no layer, ``structured`` mode on a layer type it cannot handle, or a
            ``structured`` sparsity that would prune every output unit of a layer ranked on its own (``layer``
            scope or ``layer_sparsity``; the ``global`` ranking always keeps one unit per layer).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> pruning = GradualPruning(final_sparsity=0.9, start_epoch=1, end_epoch=10, update_every=5)
        >>> trainer = Trainer(callbacks=[pruning], max_epochs=20, logger=False)
    """

    _sharding_refusal, _sharding_support = "its masks follow FSDP2 (DTensor) row shards only", ("ModelParallelStrategy",)

    def __init__(
        self,
        final_sparsity: float = 0.9,
        initial_sparsity: float = 0.0,
        start_epoch: float | None = None,
        end_epoch: float | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        update_every: int = 10,
        schedule: Literal["cubic", "linear", "exponential", "constant", "one_shot"] = "cubic",
        mode: Literal["unstructured", "structured"] = "unstructured",
        norm: Literal[1, 2] = 1,
        scope: Literal["global", "layer", "row"] = "global",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        layer_sparsity: dict[str, float] | None = None,
        prune_bias: bool = True,
        criterion: Literal["magnitude", "activation", "movement"] = "magnitude",
        pattern: str | None = None,
        reconstruct: bool | Literal["adaptive"] = False,
        token_mask: str | None = None,
        statistics: Literal["since_update", "cumulative"] = "since_update",
    ) -> None:
        super().__init__()
        _pruning_stats.check_arguments(final_sparsity, initial_sparsity, update_every, mode, norm, scope, targets,
                                       exclude, layer_sparsity, reconstruct)
        validate_window(start_step, end_step, start_epoch, end_epoch)
        validate_kind(schedule)
        check_choice(criterion, "criterion", ("magnitude", "activation", "movement"))
        _pruning_stats.check_token_mask(token_mask, criterion == "activation" or bool(reconstruct),
                                        "criterion='activation' or reconstruct")
        _pruning_stats.check_statistics(statistics, criterion, reconstruct)
        self._nm = _pruning_stats.check_pattern(pattern, mode, layer_sparsity)
        self.final_sparsity, self.initial_sparsity, self.update_every = final_sparsity, initial_sparsity, update_every
        self.start_epoch, self.end_epoch, self.start_step, self.end_step = start_epoch, end_epoch, start_step, end_step
        self.mode, self.norm, self.scope, self.targets, self.exclude = mode, norm, scope, targets, exclude
        self.schedule, self.layer_sparsity, self.prune_bias = schedule, layer_sparsity, prune_bias
        self.criterion, self.pattern, self.token_mask = criterion, pattern, token_mask
        self.statistics, cumulative = statistics, statistics == "cumulative"
        self._stats = _pruning_stats.CriterionStats(criterion, token_mask, cumulative)
        self.reconstruct = reconstruct
        self._gram = _recon.InputGram(token_mask, cumulative) if reconstruct else None
        self._owner = f"GradualPruning#{next(_COUNTER)}"
        self._reset_runtime()
        self._masks: dict[str, torch.Tensor] = {}  # weight fqn -> keep mask (bool); empty until the first update
        self._whole = False  # `_masks` are whole (restored, or kept after a fit), not yet cut to this rank's pieces
        self._last_update_step = -1
        self._counts: tuple[int, int] | None = None  # (kept, total) of the masks over all ranks
        self._model_ref: weakref.ref | None = None  # the model the masks were computed for

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model_ref"] = None  # a weak reference does not pickle
        return state

    def _reset_runtime(self) -> None:
        self._weights: dict[str, nn.Parameter] = {}  # weight fqn -> parameter
        self._biases: dict[str, nn.Parameter] = {}  # weight fqn -> bias of the same layer (structured only)
        self._final: dict[str, float] = {}  # weight fqn -> final sparsity
        self._pooled: list[str] = []  # weight fqns ranked together (global scope)
        self._window: tuple[int, int] | None = None
        self._model_layer_numel = 0
        self._masking = _pruning_masking.Masking()  # the masks as 0/1 factors, applied after every step
        self._step_hooks = AfterOptimizerStep(self._masking.apply)
        self._layers: dict[str, list[nn.Module]] = {}  # weight fqn -> modules using it (activation statistics)
        self._strategy: Any = None
        self._clips = self._deferred = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, final_sparsity=self.final_sparsity, targets=self.targets,
                                        exclude=self.exclude)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_runtime()
        if self._model_ref is not None and self._model_ref() is not pl_module:
            # a callback reused for another model: that model's masks come from its own weights (or from the
            # checkpoint it resumes, whose state Lightning loads after `setup`), not from the previous model's
            self._masks, self._last_update_step, self._counts = {}, -1, None
            for stats in self._gathering():
                stats.clear()
        self._model_ref = weakref.ref(pl_module)
        self._strategy, self._clips = trainer.strategy, bool(trainer.gradient_clip_val)
        narrow = self.mode == "structured" or self.criterion == "activation" or self._nm is not None
        types = _STRUCTURED_TYPES if narrow else _UNSTRUCTURED_TYPES
        if self.targets is None:  # by default Linear/Conv layers only; an Embedding is pruned when named
            types = tuple(t for t in types if t != "Embedding")
        modules = select_modules(pl_module, self.targets, self.exclude, types=types)
        if self.mode == "structured":
            modules = _pruning_stats.without_output_layers(pl_module, modules, self.targets)
        names = {id(p): n for n, p in pl_module.named_parameters(remove_duplicate=False)}
        overrides = _pruning_stats.matched_overrides(self.layer_sparsity, modules)
        seen: set[int] = set()
        for module_name, module in modules.items():
            weight = module.weight
            _pruning_stats.check_pattern(self.pattern, self.mode, None, module_name, weight)
            if id(weight) in seen:  # tied weights: prune the tensor once
                self._layers[names[id(weight)]].append(module)
                continue
            seen.add(id(weight))
            if not weight.requires_grad and self.targets is None:
                rank_zero_warn(f"GradualPruning: skipping {module_name!r}, its weight is frozen "
                               "(requires_grad=False); name it in `targets` to prune it anyway")
                continue
            fqn = names[id(weight)]
            self._weights[fqn], self._layers[fqn] = weight, [module]
            bias = getattr(module, "bias", None)
            if self.mode == "structured" and self.prune_bias and isinstance(bias, nn.Parameter):
                self._biases[fqn] = bias
            pattern = next((p for p in overrides if match(p, module_name)), None)
            self._final[fqn] = self.final_sparsity if pattern is None else float(overrides[pattern])
            if pattern is None and self.scope == "global" and self._nm is None:
                self._pooled.append(fqn)
            elif self.mode == "structured":  # ranked on its own: no global keep-one-unit rule
                argument = "final_sparsity" if pattern is None else f"layer_sparsity[{pattern!r}]"
                _pruning_stats.check_keeps_a_unit(argument, self._final[fqn], module_name, weight.shape[0])
        if not self._weights:
            raise ValueError(f"GradualPruning: every targeted layer has frozen weights: {list(modules)}")
        if self.reconstruct:
            _recon.check_layers(self._layers, self._strategy)
        claimed = list(self._weights) + [names[id(b)] for b in self._biases.values()]
        claims.claim(pl_module, claimed, "prune", self._owner)
        self._model_layer_numel = _pruning_stats.layer_numel(pl_module)

    def window(self, trainer: pl.Trainer, check_fits: bool = True) -> tuple[int, int]:
        """Optimizer steps ``(start, end)`` of the ramp in this run (default end: its middle; last update at ``end``)."""
        if self.end_step is None and self.end_epoch is None:  # default: ramp over the first half of the run
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise ValueError("GradualPruning: the run has no fixed length; give `end_step` or `end_epoch`")
            start, _ = resolve_window(trainer, self.start_step, None, self.start_epoch, None, check_fits=check_fits)
            return start, max(start, int(total) // 2)
        return resolve_window(trainer, self.start_step, self.end_step, self.start_epoch, self.end_epoch, check_fits=check_fits)

    def _gathering(self) -> list[_pruning_stats.CriterionStats]:  # what the hooks gather from training
        return [self._stats] + ([self._gram] if self._gram is not None else [])

    @property
    def pruned_weights(self) -> list[str]:
        """Fully-qualified names of the weights this callback prunes (chosen in ``setup``; empty before)."""
        return list(self._weights)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window = self.window(trainer)
        self._weights, self._biases = _pruning_sharded.resolve(pl_module, self._layers, self._weights, self._biases, self.criterion)
        self._localize()

    def _localize(self) -> None:
        # whole masks and movement scores (restored, or kept from the last fit) cut to this rank's pieces, once
        self._stats.localize(self._weights)
        if self._masks and self._whole:  # they must fit this model
            self._set_masks(_pruning_sharded.local_masks(self._masks, self._weights))
            self._masking.apply()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._masks, self._whole = self._whole_masks(), True  # sharded: keep whole masks after the fit
        self._stats.sums = self._stats.full(self._weights)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._localize()  # restored after `on_fit_start` by strategies that load checkpoints after their setup
        self._step_hooks.attach(trainer)
        if self._window is not None and self._last_update_step < self._window[1]:  # updates to come: gather
            for stats in self._gathering():
                stats.attach(self._layers)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_hooks.attach(trainer)  # no-op unless the optimizers were rebuilt (e.g. by another callback)
        for stats in self._gathering():
            stats.see_batch(batch)
        step = trainer.global_step
        if self._due(step):
            self.update_masks(step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # movement scores from this step's (DDP-averaged) gradients; then, when clipping is on, zero the gradients
        # of pruned entries so that the clipping norm does not count them (automatic and manual optimization)
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if self._window is not None and self._last_update_step < self._window[1]:
            self._stats.accumulate({f: w for f, w in self._weights.items() if id(w) in params})
        if self._clips:
            self._masking.apply(params, grads=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._step_hooks.remove()
        for stats in self._gathering():
            stats.remove()
        claims.release(pl_module, self._owner)
        self._reset_runtime()  # drop references to the model and trainer; masks and step stay

    # -- schedule and masks -------------------------------------------------------------------------
    def sparsity_at(self, step: int, final: float | None = None) -> float:
        """Scheduled sparsity at optimizer ``step`` (for a layer whose final sparsity is ``final``)."""
        if self._window is None:
            raise RuntimeError("GradualPruning: the schedule is known once fit has started")
        final = self.final_sparsity if final is None else final
        start, end = self._window
        return Schedule(self.schedule, min(self.initial_sparsity, final), final, start, end).value_at(step)

    def _due(self, step: int) -> bool:
        if self._window is None:
            return False
        start, end = self._window
        due = (step - start) % self.update_every == 0 or step >= end or self._deferred
        return start <= step and self._last_update_step < min(step, end) and due

    @torch.no_grad()
    def update_masks(self, step: int) -> None:
        """Recompute every mask for the sparsity scheduled at ``step`` and apply it to the weights (``activation``
        and ``movement``: an update due before any statistic was gathered waits for the next step)."""
        self._deferred = not self._stats.ready(step) or (self._gram is not None and not self._gram.ready(step))
        if self._deferred:
            return
        previous = {f: self._masks[f] for f in self._weights if f in self._masks}  # rank-local pieces
        sparsity = {f: self.sparsity_at(step, self._final[f]) for f in self._weights}
        new = _pruning_sharded.compute_masks(self._weights, self._layers, self._pooled, previous,
                            self._stats.all_statistics(list(self._weights), self._strategy), self.criterion,
                            self.mode, self.norm, self._nm, sparsity, self._group_fraction(step), self.scope == "row")
        last = self._window is not None and step >= self._window[1]
        if self._gram is not None:  # the kept weights absorb what the pruned ones did (then masked as ever)
            new.update(_recon.update_weights(self._weights, new, self._gram.grams(self._strategy),
                                             previous if self.reconstruct == "adaptive" else None, self._nm))
            self._gram.updated(last)
        self._set_masks(new)
        self._last_update_step = step
        self._masking.apply()
        self._stats.updated(last)
        log.debug("GradualPruning: step %d, masks updated to %.4f", step, self.current_sparsity())

    def _group_fraction(self, step: int) -> float:  # N:M: the fraction of groups held, scheduled from 0 to 1
        return Schedule(self.schedule, 0.0, 1.0, *(self._window or (0, 0))).value_at(step)

    def _set_masks(self, new: dict[str, torch.Tensor]) -> None:
        self._masks, self._whole = {fqn: new[fqn].to(weight.device) for fqn, weight in self._weights.items()}, False
        self._masking.update(self._masks, self._weights, self._biases)
        self._counts = _pruning_sharded.kept_counts(self._masks, self._weights)

    def _whole_masks(self) -> dict[str, torch.Tensor]:
        return dict(self._masks) if self._whole else _pruning_sharded.full_masks(self._masks, self._weights)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current keep-masks, parameter name -> ``bool`` tensor (empty before pruning starts; during a sharded
        fit each rank's rows, whole after it)."""
        return dict(self._masks)

    def current_sparsity(self) -> float:
        """Fraction of the pruned weights' entries that the current masks remove."""
        kept, total = self._counts if self._counts is not None else _pruning_sharded.kept_counts(self._masks, {})
        return 1.0 - kept / total if total else 0.0

    def compression_targets(self) -> dict[str, float]:
        """Scheduled sparsity of the masks in effect over all layer weights of the model, comparable with the
        monitor's ``compression/sparsity``: the schedule's value at the last mask update (``initial_sparsity`` before
        the first), weighted by the pruned layers' share of the model (the same on every rank)."""
        if self._window is None or not self._model_layer_numel:
            return {}
        step, (n, m) = self._last_update_step, self._nm or (0, 0)
        pruned = sum((self._group_fraction(step) * (m - n) / m if m else self.sparsity_at(step, self._final[f]))
                     * w.numel() for f, w in self._weights.items())
        return {"sparsity": pruned / self._model_layer_numel}

    def compression_pattern(self) -> dict[str, tuple[int, int]]:
        """Weight name -> ``(N, M)`` for the layers held to an N:M pattern (read by ``CompressionMonitor``)."""
        return {fqn: self._nm for fqn in self._weights} if self._nm is not None else {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "masks": {f: m.detach().cpu().clone() for f, m in self._whole_masks().items()},
            "last_update_step": self._last_update_step,
            "criterion_stats": self._stats.state_dict(self._strategy, self._weights),  # version 2
            "reconstruct_gram": self._gram.state_dict(self._strategy) if self._gram is not None else {},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, _VERSION, "GradualPruning")
        self._masks, self._counts, self._whole = {f: m.bool() for f, m in state_dict.get("masks", {}).items()}, None, True
        self._last_update_step = int(state_dict.get("last_update_step", -1))
        self._stats.load_state_dict(state_dict.get("criterion_stats", {}))
        if self._gram is not None:
            self._gram.load_state_dict(state_dict.get("reconstruct_gram", {}))
