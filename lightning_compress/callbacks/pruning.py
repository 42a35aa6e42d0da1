"""GradualPruning: scheduled magnitude (or unit-norm) pruning while the model trains."""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress import claims
from lightning_compress.functional import pruning as masks
from lightning_compress.callbacks._base import _ReleasesModelOnException
from lightning_compress.callbacks._step_hooks import AfterOptimizerStep
from lightning_compress.graph import output_layers
from lightning_compress.schedules import Schedule, resolve_window, validate_kind, validate_window
from lightning_compress.targets import match, select_modules, validate_patterns

__all__ = ["GradualPruning"]

log = logging.getLogger(__name__)

_UNSTRUCTURED_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "Embedding")
_STRUCTURED_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
_COUNTER = itertools.count(1)


class GradualPruning(_ReleasesModelOnException):
    """Raise the sparsity of the targeted layers step by step while training, then hold it.

    The sparsity follows a schedule over optimizer steps (by default the cubic one of Zhu & Gupta 2017,
    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``). Every ``update_every`` steps inside the window the
    masks are recomputed from the current weights (entries by ``|w|``, or whole output units by their L1/L2 norm),
    never reviving what is already pruned. The model is not rewritten: ``weight`` stays a plain parameter whose
    pruned entries are exactly zero. Gradients of pruned entries are zeroed before every optimizer step (in
    ``on_before_optimizer_step``, so before gradient clipping) and the weights are masked right after it (a step
    hook on each optimizer), so momentum cannot revive them, and a
    checkpoint's ``state_dict`` loads with ``strict=True`` into the unmodified module.

    The masks and the schedule position are in the callback's state: resuming from a checkpoint continues exactly,
    and fitting the same model again keeps its masks; the same callback given another model starts over.
    Under DDP every rank computes the same masks from its (synchronized) weights.

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
            or ``layer`` (every layer pruned to the scheduled sparsity).
        targets: layers to prune (names, globs or ``"re:"`` regexes); ``None``: every Linear/Conv layer.
            ``Embedding`` layers are pruned (``unstructured`` mode) only when named here.
            Layers with frozen weights are skipped with a warning unless ``targets`` is given.
        exclude: layers to leave dense.
        layer_sparsity: per-layer final sparsity by pattern, e.g. ``{"net.5": 0.5}``; such layers are ranked on
            their own (outside the global pool) and follow the same schedule to their own final sparsity.
        prune_bias: in ``structured`` mode, also zero the bias of pruned units (so they output exactly zero).

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
        scope: Literal["global", "layer"] = "global",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        layer_sparsity: dict[str, float] | None = None,
        prune_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_sparsity("final_sparsity", final_sparsity, upper=1.0)
        _check_sparsity("initial_sparsity", initial_sparsity, upper=1.0)
        if initial_sparsity > final_sparsity:
            raise ValueError(
                f"`initial_sparsity` must be <= `final_sparsity`, got {initial_sparsity} > {final_sparsity}"
            )
        validate_window(start_step, end_step, start_epoch, end_epoch)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` must be an integer >= 1, got {update_every!r}")
        validate_kind(schedule)
        _check_choice("mode", mode, ("unstructured", "structured"))
        _check_choice("norm", norm, (1, 2))
        _check_choice("scope", scope, ("global", "layer"))
        validate_patterns(targets, "targets")
        validate_patterns(exclude, "exclude")
        if layer_sparsity is not None:
            if not isinstance(layer_sparsity, dict):
                raise TypeError(f"`layer_sparsity` must map layer patterns to sparsities, got {layer_sparsity!r}")
            validate_patterns(list(layer_sparsity), "layer_sparsity")
            for pattern, value in layer_sparsity.items():
                _check_sparsity(f"layer_sparsity[{pattern!r}]", value, upper=1.0)
        self.final_sparsity = final_sparsity
        self.initial_sparsity = initial_sparsity
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.start_step = start_step
        self.end_step = end_step
        self.update_every = update_every
        self.schedule = schedule
        self.mode = mode
        self.norm = norm
        self.scope = scope
        self.targets = targets
        self.exclude = exclude
        self.layer_sparsity = layer_sparsity
        self.prune_bias = prune_bias
        self._owner = f"GradualPruning#{next(_COUNTER)}"
        self._reset_runtime()
        self._masks: dict[str, torch.Tensor] = {}  # weight fqn -> keep mask (bool); empty until the first update
        self._last_update_step = -1
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
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # fqn -> 0/1 weight, bias factors
        self._step_hooks = AfterOptimizerStep(self._apply_masks)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            mode=self.mode, final_sparsity=self.final_sparsity, targets=self.targets, exclude=self.exclude
        )

    # -- setup -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_runtime()
        if self._model_ref is not None and self._model_ref() is not pl_module:
            # a callback reused for another model: that model's masks come from its own weights (or from the
            # checkpoint it resumes, whose state Lightning loads after `setup`), not from the previous model's
            self._masks, self._last_update_step = {}, -1
        self._model_ref = weakref.ref(pl_module)
        types = _STRUCTURED_TYPES if self.mode == "structured" else _UNSTRUCTURED_TYPES
        if self.targets is None:  # by default Linear/Conv layers only; an Embedding is pruned when named
            types = tuple(t for t in types if t != "Embedding")
        modules = select_modules(pl_module, self.targets, self.exclude, types=types)
        if self.mode == "structured":
            modules = self._without_output_layers(pl_module, modules)
        names = {id(p): n for n, p in pl_module.named_parameters(remove_duplicate=False)}
        overrides = dict(self.layer_sparsity or {})
        unmatched = [p for p in overrides if not any(match(p, m) for m in modules)]
        if unmatched:
            raise ValueError(f"`layer_sparsity`: pattern(s) {unmatched} match no pruned layer; pruned layers: {list(modules)}")
        seen: set[int] = set()
        for module_name, module in modules.items():
            weight = module.weight
            if id(weight) in seen:  # tied weights: prune the tensor once
                continue
            seen.add(id(weight))
            if not weight.requires_grad and self.targets is None:
                rank_zero_warn(
                    f"GradualPruning: skipping {module_name!r}, its weight is frozen (requires_grad=False); "
                    "name it in `targets` to prune it anyway"
                )
                continue
            fqn = names[id(weight)]
            self._weights[fqn] = weight
            bias = getattr(module, "bias", None)
            if self.mode == "structured" and self.prune_bias and isinstance(bias, nn.Parameter):
                self._biases[fqn] = bias
            pattern = next((p for p in overrides if match(p, module_name)), None)
            layer_final = None if pattern is None else overrides[pattern]
            self._final[fqn] = self.final_sparsity if layer_final is None else float(layer_final)
            if layer_final is None and self.scope == "global":
                self._pooled.append(fqn)
            elif self.mode == "structured":  # ranked on its own: no global keep-one-unit rule
                argument = "final_sparsity" if pattern is None else f"layer_sparsity[{pattern!r}]"
                _check_keeps_a_unit(argument, self._final[fqn], module_name, weight.shape[0])
        if not self._weights:
            raise ValueError(f"GradualPruning: every targeted layer has frozen weights: {list(modules)}")
        claimed = list(self._weights) + [names[id(b)] for b in self._biases.values()]
        claims.claim(pl_module, claimed, "prune", self._owner)
        self._model_layer_numel = sum(
            m.weight.numel() for m in {id(m.weight): m for m in pl_module.modules() if _is_layer(m)}.values()
        )

    def _without_output_layers(self, pl_module: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Structured mode leaves out the layers whose output units are the model's outputs (classes, ...)."""
        outputs = [name for name in output_layers(pl_module) if name in modules]
        if outputs and self.targets is not None:
            raise ValueError(
                f"GradualPruning: `targets` {self.targets} select {outputs}, whose output units are the output of "
                "the model: structured pruning would remove them (whole classes); leave them out of `targets` or add them "
                "to `exclude`"
            )
        if outputs:
            rank_zero_info(f"GradualPruning: structured mode leaves the model's output layer(s) {outputs} whole")
        return {name: module for name, module in modules.items() if name not in outputs}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.end_step is None and self.end_epoch is None:  # default: ramp over the first half of the run
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise ValueError("GradualPruning: the run has no fixed length; give `end_step` or `end_epoch`")
            start, _ = resolve_window(trainer, self.start_step, None, self.start_epoch, None)
            self._window = (start, max(start, int(total) // 2))
        else:
            self._window = resolve_window(trainer, self.start_step, self.end_step, self.start_epoch, self.end_epoch)
        if self._masks:  # restored from a checkpoint: they must fit this model
            expected = set(self._weights)
            if set(self._masks) != expected:
                raise ValueError(
                    f"GradualPruning: the checkpoint's masks are for {sorted(self._masks)}, but this run prunes "
                    f"{sorted(expected)}; resume with the same `targets`/`exclude`"
                )
            for fqn, mask in self._masks.items():
                if mask.shape != self._weights[fqn].shape:
                    raise ValueError(f"GradualPruning: mask for {fqn!r} has shape {tuple(mask.shape)}, weight has "
                                     f"{tuple(self._weights[fqn].shape)}")
            self._set_masks(self._masks)
            self._apply_masks()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_hooks.attach(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_hooks.attach(trainer)  # no-op unless the optimizers were rebuilt (e.g. by another callback)
        step = trainer.global_step
        if self._due(step):
            self.update_masks(step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # zero the gradients of pruned entries before gradient clipping and the step (automatic and manual
        # optimization both pass here), so that neither the clipping norm nor the momentum sees them
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for fqn, (weight_keep, bias_keep) in self._factors.items():
                weight = self._weights[fqn]
                if id(weight) in params and weight.grad is not None:
                    weight.grad.mul_(weight_keep)
                bias = self._biases.get(fqn)
                if bias_keep is not None and id(bias) in params and bias.grad is not None:
                    bias.grad.mul_(bias_keep)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._step_hooks.remove()
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
        if step < start or self._last_update_step >= min(step, end):
            return False
        return (step - start) % self.update_every == 0 or step >= end

    @torch.no_grad()
    def update_masks(self, step: int) -> None:
        """Recompute every mask for the sparsity scheduled at ``step`` and apply it to the weights."""
        previous = {fqn: weight_keep for fqn, (weight_keep, _) in self._factors.items()}  # 0/1 floats: fastest
        new: dict[str, torch.Tensor] = {}
        if self._pooled:
            pool = {fqn: self._weights[fqn] for fqn in self._pooled}
            target = self.sparsity_at(step)
            if self.mode == "structured":
                new.update(masks.global_structured_masks(pool, target, self.norm, previous))
            else:
                new.update(masks.global_unstructured_masks(pool, target, previous))
        for fqn, weight in self._weights.items():
            if fqn in new:
                continue
            target = self.sparsity_at(step, self._final[fqn])
            if self.mode == "structured":
                new[fqn] = masks.structured_mask(weight, target, self.norm, previous.get(fqn))
            else:
                new[fqn] = masks.unstructured_mask(weight, target, previous.get(fqn))
        self._set_masks(new)
        self._last_update_step = step
        self._apply_masks()
        log.debug("GradualPruning: step %d, masks updated to %.4f", step, self.current_sparsity())

    def _set_masks(self, new: dict[str, torch.Tensor]) -> None:
        """Keep the bool masks (the state) and 0/1 multipliers in each parameter's dtype (a float multiply is
        several times faster than a masked fill or a multiply by a bool tensor)."""
        self._masks = {fqn: mask.to(self._weights[fqn].device) for fqn, mask in new.items()}
        self._factors = {}
        for fqn, mask in self._masks.items():
            weight = self._weights[fqn]
            bias = self._biases.get(fqn)
            bias_keep = None if bias is None else mask.reshape(mask.shape[0], -1)[:, 0].to(bias.dtype)
            self._factors[fqn] = (mask.to(weight.dtype), bias_keep)

    @torch.no_grad()
    def _apply_masks(self, params: set[int] | None = None) -> None:
        for fqn, (weight_keep, bias_keep) in self._factors.items():
            weight = self._weights[fqn]
            if params is None or id(weight) in params:
                weight.mul_(weight_keep)
            bias = self._biases.get(fqn)
            if bias_keep is not None and (params is None or id(bias) in params):
                bias.mul_(bias_keep)

    # -- reporting ----------------------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current keep-masks, parameter name -> ``bool`` tensor (empty before pruning starts)."""
        return dict(self._masks)

    def current_sparsity(self) -> float:
        """Fraction of the pruned weights' entries that the current masks remove."""
        total = sum(m.numel() for m in self._masks.values())
        return 1.0 - sum(int(torch.count_nonzero(m)) for m in self._masks.values()) / total if total else 0.0

    def compression_targets(self) -> dict[str, float]:
        """Scheduled sparsity of the masks in effect, over all layer weights of the model.

        Comparable with the monitor's ``compression/sparsity``: it is the value the schedule gave at the last mask
        update (``initial_sparsity`` before the first), weighted by the pruned layers' share of the model.
        """
        if self._window is None or not self._model_layer_numel:
            return {}
        step = self._last_update_step
        pruned = sum(self.sparsity_at(step, self._final[f]) * w.numel() for f, w in self._weights.items())
        return {"sparsity": pruned / self._model_layer_numel}

    # -- checkpointing ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "masks": {fqn: mask.detach().cpu().clone() for fqn, mask in self._masks.items()},
            "last_update_step": self._last_update_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._masks = {fqn: mask.bool() for fqn, mask in state_dict.get("masks", {}).items()}
        self._last_update_step = int(state_dict.get("last_update_step", -1))


def _is_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2


def _check_keeps_a_unit(argument: str, sparsity: float, layer: str, units: int) -> None:
    if masks.num_to_prune(sparsity, units) >= units:
        raise ValueError(
            f"`{argument}`={sparsity} in structured mode would prune all {units} output units of {layer!r} "
            f"(round({sparsity} * {units}) = {units}), cutting the network there; at most {(units - 1) / units:g} "
            "keeps one: lower it, leave the layer out with `exclude`, or give it its own `layer_sparsity`"
        )


def _check_sparsity(name: str, value: Any, upper: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < upper:
        raise ValueError(f"`{name}` must be a number in [0, {upper:g}), got {value!r}")


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed or isinstance(value, bool):
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")
