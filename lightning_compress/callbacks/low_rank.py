"""LowRankFactorization: replace layers by truncated-SVD factors in the middle of training, then keep training."""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_compress import claims
from lightning_compress._validation import check_number, check_state_version
from lightning_compress.callbacks._base import _ReleasesModelOnException
from lightning_compress.callbacks._low_rank_layers import choose_layers
from lightning_compress.callbacks._pruning_reconstruct import InputGram
from lightning_compress.callbacks._pruning_stats import check_token_mask
from lightning_compress.callbacks._replace_params import rewrap_ddp, swap_in_optimizers
from lightning_compress.functional.low_rank import (
    dense_params,
    factorized_params,
    kept_energy,
    rank_for_energy,
    rank_for_params,
    rank_for_ratio,
    singular_values,
    whitening,
)
from lightning_compress.layers.low_rank import (
    factorize,
    is_factorized,
    rebuild_from_state_dict,
    replace_module,
)
from lightning_compress.schedules import check_starts_in_run, epochs_to_steps
from lightning_compress.targets import match, validate_patterns

__all__ = ["LowRankFactorization"]

log = logging.getLogger(__name__)

_VERSION = 1
_COUNTER = itertools.count(1)


class LowRankFactorization(_ReleasesModelOnException):
    """Factorize ``Linear``/``Conv2d`` layers by truncated SVD at a scheduled step, then fine-tune the factors.

    At optimizer step ``start_step`` (or epoch ``start_epoch``) each targeted ``nn.Linear`` becomes
    ``LowRankLinear`` (``down``: ``in -> r``, ``up``: ``r -> out``) and each ``nn.Conv2d`` becomes ``LowRankConv2d``
    (a ``k x k`` conv to ``r`` channels, then a ``1 x 1`` conv), initialized from the truncated SVD ``U_r S_r V_r^T``
    of the trained weight, so the model's outputs change only by the truncation error (see
    :mod:`lightning_compress.layers.low_rank`). The rank of a layer comes from ``ranks`` (by layer pattern), else from
    ``rank_ratio``, ``energy`` or ``param_ratio``. A layer is left dense, with a log line, when its factors would not
    have fewer parameters than its weight.

    **Whitened** (``whiten=True``, Linear layers; SVD-LLM, Wang et al. 2024): forward pre-hooks sum each layer's
    input Gram matrix ``X^T X`` over the training batches before ``start`` (added across DDP ranks, checkpointed),
    and the SVD is of ``W L`` (``L L^T`` the damped Gram, :func:`~lightning_compress.functional.low_rank.whitening`)
    mapped back by ``L^-1``: the rank kept minimizes the error of the layer's *outputs* on those inputs, not of its
    weights (``energy``/``kept_energy`` count the output spectrum). all-MiniLM-L6-v2, feed-forward layers at 0.4 of
    their parameters, before fine-tuning: 0.84 cosine fidelity to the original whitened, 0.50 plain.

    **Optimizers.** The optimizers are edited in place (``param_groups``), not rebuilt: in each parameter group that
    held a replaced weight, the weight is replaced by the two factor weights at the same position, so the factors
    train with that group's settings (learning rate, weight decay). The optimizer state of the replaced weight
    (momentum, Adam moments and step count) is dropped: the factors start with fresh state. The bias is kept as the
    same ``Parameter`` (now ``up.bias``) with its state; every other parameter, every other parameter group (e.g.
    ones added by other callbacks) and the LR schedulers (same optimizer objects) carry on unchanged. Under
    ``strategy="ddp"`` the model is wrapped again in ``DistributedDataParallel`` (by the strategy's
    ``configure_ddp``) so the new parameters are synchronized; ranks are chosen on rank zero and broadcast.
    With ``start`` at step 0 the layers are factorized in ``setup``, before ``configure_optimizers``.

    **Checkpoints.** A checkpoint written after the factorization holds the factor weights
    (``<layer>.down.weight``, ``<layer>.up.weight``, ``<layer>.up.bias``). Resuming it with ``ckpt_path=`` (with this
    callback in the Trainer) works on the original model: a ``load_state_dict`` pre-hook that the callback puts on the
    LightningModule during each run rebuilds the factorized layers from the checkpoint's shapes before the weights
    load (Lightning loads the weights after ``setup``, and ``trainer.ckpt_path`` is not yet set in ``setup``).
    Resuming reproduces an uninterrupted run exactly when ``configure_optimizers`` builds its groups from
    ``self.parameters()`` in module order (the factors then sit where this callback put them). To evaluate without
    the callback, use :func:`lightning_compress.checkpoints.load_factorized_checkpoint`.

    **Composition.** The original weights are claimed (``"factorize"``): pruning, quantizing or sharing the same
    layers in the same run raises before training. To quantize the factors with ``QuantizationAwareTraining``,
    factorize at step 0 and list this callback *before* it (its ``setup`` then sees the factors); or factorize in
    one run and quantize in a second. ``KnowledgeDistillation`` composes in any order (its projections keep their
    own parameter group, and its ``feature_pairs`` hooks move to a layer factorized mid-fit).

    Logged once, at the factorization (rank zero, to every logger): ``lowrank/rank/<layer>``,
    ``lowrank/kept_energy/<layer>``, ``lowrank/params_before/<layer>``, ``lowrank/params_after/<layer>`` and the totals
    ``lowrank/params_before``, ``lowrank/params_after``. ``CompressionMonitor`` counts the factors' weights.

    Args:
        rank_ratio: rank as a fraction of the layer's full rank ``min(out, in*kh*kw)``, in (0, 1].
        energy: keep the smallest rank whose singular values hold this fraction of the squared spectrum, in (0, 1].
        param_ratio: the largest rank whose factor weights hold at most this fraction of the layer's weight
            parameters, in (0, 1] (``0.25``: 4x fewer parameters in the factorized layers).
        ranks: explicit rank per layer pattern (name, glob or ``"re:"``), e.g. ``{"net.1": 16}``; it takes precedence
            over the rule above. Give one of ``rank_ratio``/``energy``/``param_ratio``, or ``ranks`` covering every
            targeted layer.
        start_epoch: epoch at which to factorize (fractions allowed); or give ``start_step``. Default: step 0.
        start_step: optimizer step at which to factorize.
        targets: layers to factorize (names, globs or ``"re:"`` regexes); ``None``: every ``nn.Linear`` and
            ``nn.Conv2d`` (``groups=1``; subclasses, frozen layers and layers whose weight is tied to another
            module's are skipped; named in ``targets`` they are an error).
        exclude: layers to leave alone.
        whiten: truncate the SVD whitened by the layers' input statistics (see above); every target must be an
            ``nn.Linear`` and ``start`` at least one step in.
        token_mask: with ``whiten``, the key of the (mapping) batch's ``(batch, tokens)`` mask, e.g.
            ``"attention_mask"``: the Gram matrices count its nonzero tokens only, not padding.

    Raises:
        ValueError: a ratio or energy outside (0, 1], none or several of the rules, a non-integer or non-positive
            rank, a start given in steps and epochs, ``whiten`` with a start at step 0 (in ``__init__``); a
            ``whiten`` target that is not an ``nn.Linear``, a rank larger than the layer allows, a
            target that is not ``Linear``/``Conv2d``, a pattern that matches nothing, a layer with no rule (in
            ``setup``); a start after the last optimizer step (at train start).
        TypeError: ``ranks`` is not a mapping, or a pattern list given as a single string.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> lowrank = LowRankFactorization(param_ratio=0.25, start_epoch=10, targets=["net.1", "net.3"])
        >>> trainer = Trainer(callbacks=[lowrank], max_epochs=30, logger=False)
        >>> LowRankFactorization(energy=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `energy` must be a number in (0, 1], got 1.5
    """
    _sharding_refusal = "it replaces layers mid-training, which sharded parameters cannot follow"

    def __init__(
        self,
        rank_ratio: float | None = None,
        energy: float | None = None,
        param_ratio: float | None = None,
        ranks: dict[str, int] | None = None,
        start_epoch: float | None = None,
        start_step: int | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        whiten: bool = False,
        token_mask: str | None = None,
    ) -> None:
        super().__init__()
        rules = {"rank_ratio": rank_ratio, "energy": energy, "param_ratio": param_ratio}
        for name, value in rules.items():
            check_number(value, name, low=0, low_open=True, high=1, optional=True)
        given = [n for n, v in rules.items() if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of `rank_ratio`, `energy`, `param_ratio`, got {given}")
        if ranks is not None:
            if not isinstance(ranks, dict):
                raise TypeError(f"`ranks` must map layer patterns to ranks, got {ranks!r}")
            validate_patterns(list(ranks), "ranks")
            for pattern, r in ranks.items():
                check_number(r, f"ranks[{pattern!r}]", low=1, integer=True)
        if not given and not ranks:
            raise ValueError("give a rank rule: `rank_ratio`, `energy`, `param_ratio` or `ranks`")
        if start_step is not None and start_epoch is not None:
            raise ValueError("give `start_step` or `start_epoch`, not both")
        check_number(start_step, "start_step", low=0, integer=True, optional=True)
        check_number(start_epoch, "start_epoch", low=0, optional=True)
        validate_patterns(targets, "targets")
        validate_patterns(exclude, "exclude")
        if not isinstance(whiten, bool):
            raise ValueError(f"`whiten` must be True or False, got {whiten!r}")
        if whiten and not start_step and not start_epoch:
            raise ValueError(f"`whiten`=True needs the inputs of some training batches before it factorizes: give "
                             f"`start_step` >= 1 or `start_epoch` > 0, got start_step={start_step!r}, "
                             f"start_epoch={start_epoch!r}")
        self.rank_ratio, self.energy, self.param_ratio, self.ranks = rank_ratio, energy, param_ratio, ranks
        self.start_epoch, self.start_step = start_epoch, start_step
        self.targets, self.exclude, self.whiten = targets, exclude, whiten
        check_token_mask(token_mask, whiten, "whiten=True")
        # the inputs' Gram matrices until the factorization
        self.token_mask, self._gram = token_mask, InputGram(token_mask) if whiten else None
        self._strategy: Any = None
        self._owner = f"LowRankFactorization#{next(_COUNTER)}"
        self._names: list[str] = []  # layers to factorize (chosen in setup)
        self._start: int | None = None
        self._hook: Any = None
        # state
        self._done = False
        self._step: int | None = None
        self._layers: dict[str, dict[str, Any]] = {}  # layer -> rank, full_rank, kept_energy, params before/after
        self._skipped: dict[str, str] = {}  # layer -> why it was left dense
        self._model_ref: weakref.ref | None = None  # the model that state describes

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model_ref"] = None  # a weak reference does not pickle
        return state

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(targets=self.targets, exclude=self.exclude)

    @property
    def factorized(self) -> bool:
        """Whether the layers have been factorized."""
        return self._done

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """Per factorized layer: ``rank``, ``full_rank``, ``kept_energy``, ``params_before``, ``params_after``."""
        return {k: dict(v) for k, v in self._layers.items()}

    # -- setup -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._model_ref is not None and self._model_ref() is not pl_module:
            # a callback reused for another model starts over (a checkpoint it resumes loads its state after setup)
            self._done, self._step, self._layers, self._skipped, self._names = False, None, {}, {}, []
        self._model_ref = weakref.ref(pl_module)
        if self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(_rebuild_before_load)
        if stage != "fit":
            return
        if self._done:  # a second fit of the same model with the same callback: nothing left to choose
            missing = [n for n in self._layers if not is_factorized(pl_module.get_submodule(n))]
            if missing:
                raise ValueError(f"LowRankFactorization: the state says {missing} are factorized, the model's are not")
        else:
            rule = any(v is not None for v in (self.rank_ratio, self.energy, self.param_ratio))
            self._names = choose_layers(pl_module, self.targets, self.exclude, self.ranks, has_rule=rule)
        claims.claim(pl_module, [f"{n}.weight" for n in self._names or self._layers], "factorize", self._owner)
        self._strategy = trainer.strategy
        if self._gram is not None and not self._done:
            not_linear = {n: type(m).__name__ for n in self._names if type(m := pl_module.get_submodule(n)) is not nn.Linear}
            if not_linear:
                raise ValueError(f"LowRankFactorization(whiten=True) whitens nn.Linear layers only (a conv's inputs "
                                 f"would need unfolding); {not_linear} are not: leave them out with `exclude`")
            self._gram.attach({n: [pl_module.get_submodule(n)] for n in self._names})
        if not self._done and self.start_step in (None, 0) and self.start_epoch in (None, 0):
            self.factorize_now(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start_step is not None:
            self._start = self.start_step
        else:
            self._start = epochs_to_steps(self.start_epoch, trainer) if self.start_epoch is not None else 0
        if not self._done:
            given = "start_step" if self.start_step is not None else "start_epoch"
            check_starts_in_run(trainer, self._start, given, "factorizes", "the layers would never be factorized")
        model = trainer.strategy.model
        if not self._done and model is not pl_module and not isinstance(model, DistributedDataParallel):
            raise ValueError(
                f"LowRankFactorization replaces modules during fit, which works with single-device and DDP strategies, "
                f"not with {type(trainer.strategy).__name__}; factorize at step 0 instead"
            )
        if self._done:  # resumed: the factors must be in the model (rebuilt before the weights loaded)
            missing = [n for n in self._layers if not is_factorized(pl_module.get_submodule(n))]
            if missing:
                raise ValueError(f"LowRankFactorization: the checkpoint says {missing} are factorized, the model's are not")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._gram is not None and not self._done:
            self._gram.see_batch(batch)
        if not self._done and self._start is not None and trainer.global_step >= self._start:
            self.factorize_now(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._gram is not None:
            self._gram.remove()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        claims.release(pl_module, self._owner)

    # -- the factorization -------------------------------------------------------------------------
    @torch.no_grad()
    def factorize_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Factorize the chosen layers now, hand the factors to the optimizers and log what was done."""
        plan: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        whiten = self._whitening()
        for name in self._names:
            module = pl_module.get_submodule(name)
            s = singular_values(module, whiten.get(name))
            rank = self._rank_for(name, module, s)
            before, after = dense_params(module), factorized_params(module, rank)
            if after >= before:
                skipped[name] = f"rank {rank} would need {after:,} parameters, the layer has {before:,}"
                continue
            plan[name] = {"type": type(module).__name__, "rank": rank, "full_rank": len(s),
                          "kept_energy": kept_energy(s, rank), "params_before": before, "params_after": after}
        plan, skipped = trainer.strategy.broadcast((plan, skipped), src=0)  # one decision for every process
        replaced: dict[int, list[nn.Parameter]] = {}
        for name, info in plan.items():
            module = pl_module.get_submodule(name)
            new = factorize(module, info["rank"], whiten.get(name))
            replace_module(pl_module, name, new)
            replaced[id(module.weight)] = [new.down.weight, new.up.weight]
        swap_in_optimizers(trainer, replaced, "LowRankFactorization")
        rewrap_ddp(trainer, pl_module)
        self._layers, self._skipped = plan, skipped
        self._done, self._step = True, trainer.global_step
        self._report(trainer)

    def _whitening(self) -> dict[str, torch.Tensor]:
        """Per layer, the Cholesky factor of its inputs' Gram matrix (``whiten=True``; the hooks go, the sums too)."""
        if self._gram is None:
            return {}
        grams = self._gram.grams(self._strategy)
        missing = [n for n in self._names if n not in grams]
        self._gram.clear()
        if missing:
            raise RuntimeError(f"LowRankFactorization(whiten=True): {missing} saw no training input with gradients on "
                               "before the factorization; they cannot be whitened. Use whiten=False or make them "
                               "part of the training forward.")
        return {n: whitening(grams[n]) for n in self._names}

    def _rank_for(self, name: str, module: nn.Module, s: torch.Tensor) -> int:
        for pattern, rank in (self.ranks or {}).items():
            if match(pattern, name):
                return rank
        if self.rank_ratio is not None:
            return rank_for_ratio(len(s), self.rank_ratio)
        if self.energy is not None:
            return rank_for_energy(s, self.energy)
        return rank_for_params(module, self.param_ratio)

    def _report(self, trainer: pl.Trainer) -> None:
        for name, why in self._skipped.items():
            rank_zero_info(f"LowRankFactorization: leaving {name!r} dense: {why}")
        for name, info in self._layers.items():
            rank_zero_info(
                f"LowRankFactorization: {name!r} rank {info['rank']}/{info['full_rank']}, "
                f"{info['params_before']:,} -> {info['params_after']:,} parameters, "
                f"kept energy {info['kept_energy']:.4f} (step {trainer.global_step})"
            )
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics: dict[str, float] = {}
        for name, info in self._layers.items():
            for key in ("rank", "kept_energy", "params_before", "params_after"):
                metrics[f"lowrank/{key}/{name}"] = float(info[key])
        metrics["lowrank/params_before"] = float(sum(i["params_before"] for i in self._layers.values()))
        metrics["lowrank/params_after"] = float(sum(i["params_after"] for i in self._layers.values()))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- reporting ---------------------------------------------------------------------------------
    def compression_targets(self) -> dict[str, float]:
        """For ``CompressionMonitor``: parameters of the factorized layers after / before (once factorized)."""
        before = sum(i["params_before"] for i in self._layers.values())
        return {"lowrank_param_fraction": sum(i["params_after"] for i in self._layers.values()) / before} if before else {}

    # -- state -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "factorized": self._done,
            "factorized_step": self._step,
            "factorized_layers": {k: dict(v) for k, v in self._layers.items()},
            "skipped_layers": dict(self._skipped),
            "input_gram": self._gram.state_dict(self._strategy) if self._gram is not None and not self._done else {},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, _VERSION, "LowRankFactorization")
        self._done = bool(state_dict.get("factorized", False))
        self._step = state_dict.get("factorized_step")
        self._layers = {k: dict(v) for k, v in state_dict.get("factorized_layers", {}).items()}
        self._skipped = dict(state_dict.get("skipped_layers", {}))
        if self._gram is not None:
            self._gram.load_state_dict(state_dict.get("input_gram", {}))


def _rebuild_before_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: give each layer whose factors are in ``state_dict`` the factorized shape."""
    rebuild_from_state_dict(module, state_dict, prefix)
